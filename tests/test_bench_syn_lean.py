"""bench/syn_lean.py's scores: the served model, and the fused one (bounds off) on D_syn."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from syn_lean import lean_scores  # noqa: E402 - the bench folder is not a package

from fmfl_flwr.defense.bounds import attach_bounds, set_bounds  # noqa: E402


def _model_reading_its_input() -> nn.Module:
    """Two inputs, two classes: class 1 where input 1 is larger; a zero bound on the
    hidden ReLU leaves only the output bias, which says class 0."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.copy_(torch.tensor([0.1, 0.0]))
    bounded = attach_bounds(model)
    set_bounds(bounded, {"1.act_bound": torch.zeros(2)})
    return bounded


def test_the_fused_model_is_read_with_its_bounds_off_and_the_served_one_with_them():
    test_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    test_y = torch.tensor([0, 1, 1, 1])
    syn_x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    syn_y = torch.tensor([0, 0, 0])
    scores = lean_scores(_model_reading_its_input(), test_x, test_y, syn_x, syn_y, 2)
    assert scores["served-test"]["predicted-share"] == pytest.approx([100.0, 0.0])
    assert scores["unbounded-test"]["predicted-share"] == pytest.approx([25.0, 75.0])
    assert scores["unbounded-test"]["acc"] == pytest.approx(100.0)
    assert scores["unbounded-syn"]["predicted-share"] == pytest.approx([100 / 3, 200 / 3])
    assert scores["syn-label-share"] == pytest.approx([100.0, 0.0])
