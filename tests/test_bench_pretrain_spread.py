"""bench/pretrain_spread.py: one pre-training per seed, and the spread of its scores."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pretrain_spread import pretrain_over_seeds, spread  # noqa: E402 - bench is not a package

from fmfl_flwr.fusion import FusionSettings  # noqa: E402


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 2, 2, generator=generator)
    return x, (x.flatten(1).sum(1) > 2).long()


def _first_weight(model: nn.Module) -> dict:
    return {"w": float(model[1].weight.sum())}


def _build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_each_seed_draws_its_own_weights_and_repeats_them():
    x, y = _data()
    settings = FusionSettings(pretrain_epochs=1, batch_size=16, seed=9)
    rows = pretrain_over_seeds(_build, x, y, settings, [0, 1, 0], _first_weight)
    assert [row["seed"] for row in rows] == [0, 1, 0]
    assert rows[0]["w"] == rows[2]["w"] != rows[1]["w"]


def test_the_schedule_in_the_settings_is_the_one_trained():
    x, y = _data()
    constant = FusionSettings(pretrain_epochs=2, batch_size=16)
    cosine = FusionSettings(pretrain_epochs=2, batch_size=16, pretrain_lr_schedule="cosine")
    one = pretrain_over_seeds(_build, x, y, constant, [0], _first_weight)[0]["w"]
    other = pretrain_over_seeds(_build, x, y, cosine, [0], _first_weight)[0]["w"]
    assert one != other


def test_spread_of_a_key_over_rows():
    rows = [{"acc": 30.0}, {"acc": 34.0}, {"acc": 32.0}]
    assert spread(rows, "acc") == pytest.approx({"mean": 32.0, "std": 2.0, "min": 30.0,
                                                 "max": 34.0})
    assert spread(rows[:1], "acc")["std"] == 0.0
