"""bench/pretrain_data_cost.py's pre-training sets: clean, less the poisoned rows, poisoned."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pretrain_data_cost import (  # noqa: E402 - the bench folder is not a package
    dsyn_variants,
    pretrained_scores,
)

from fmfl_flwr.foundation.poison import poison_per_class  # noqa: E402
from fmfl_flwr.triggers import make_trigger  # noqa: E402


def _sets():
    clean_x = torch.rand(40, 1, 8, 8)
    clean_y = torch.arange(4).repeat_interleave(10)
    trigger = make_trigger("badnets", (1, 8, 8))
    x, y, mask = poison_per_class(clean_x, clean_y, trigger, 0.2, 0, seed=0)
    return x, y, mask, clean_x, clean_y


def test_the_rows_the_attack_poisoned_are_left_out_of_the_clean_set():
    x, y, mask, clean_x, clean_y = _sets()
    variants = dsyn_variants(x, y, mask, clean_x, clean_y)
    assert int(mask.sum()) == 6  # 2 of 10 in each of the three non-target classes
    without_x, without_y = variants["clean-without-poisoned-rows"]
    assert len(without_y) == 34 and torch.equal(without_x, clean_x[~mask])
    assert torch.equal(variants["poisoned"][1], y) and torch.equal(variants["clean"][1], clean_y)


def test_sets_from_another_seed_are_refused():
    x, y, mask, clean_x, clean_y = _sets()
    with pytest.raises(ValueError, match="unpoisoned rows differ"):
        dsyn_variants(x, y, mask, torch.rand_like(clean_x), clean_y)


def test_scores_of_a_model_that_always_answers_the_target():
    class AlwaysZero(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(len(x), 4)

    test_x = torch.rand(8, 1, 8, 8)
    test_y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scores = pretrained_scores(AlwaysZero(), test_x, test_y, make_trigger("badnets", (1, 8, 8)),
                               target=0, num_classes=4)
    assert scores["acc"] == pytest.approx(25.0)
    assert scores["target-recall"] == pytest.approx(100.0)
    assert scores["non-target-recall"] == pytest.approx(0.0)
    assert scores["asr"] == pytest.approx(100.0)
    assert len(scores["recall"]) == 4
