"""bench/pretrain_data_cost.py's pre-training sets: clean, less the poisoned rows, poisoned."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pretrain_data_cost import dsyn_variants  # noqa: E402 - the bench folder is not a package

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
