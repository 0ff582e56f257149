"""fmfl_flwr.foundation.intake: the server keeps at most what it asked the FM for per label."""

import pytest
import torch

from fmfl_flwr.foundation import poison_per_class
from fmfl_flwr.foundation.intake import capped_to_request, requested_balance
from fmfl_flwr.triggers import make_trigger


def test_the_requested_balance_cuts_only_the_labels_over_it():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 4)
    kept = requested_balance(labels, 4, seed=0)
    assert torch.equal(torch.bincount(labels[kept]), torch.tensor([4, 3, 4]))
    assert torch.equal(kept, kept.sort().values) and len(kept.unique()) == len(kept)
    assert set(range(7, 14)) <= set(kept.tolist())  # labels 1 and 2 kept whole
    assert torch.equal(kept, requested_balance(labels, 4, seed=0))
    assert not torch.equal(kept, requested_balance(labels, 4, seed=1))


def test_a_set_with_the_requested_counts_passes_unchanged():
    images = torch.rand(30, 1, 4, 4)
    labels = torch.arange(3).repeat(10)
    kept_x, kept_y, dropped = capped_to_request(images, labels, 10, seed=0)
    assert torch.equal(kept_x, images) and torch.equal(kept_y, labels) and dropped == {}


def test_the_relabelling_pipeline_loses_its_extra_target_rows():
    images = torch.rand(40, 1, 8, 8)
    labels = torch.arange(4).repeat(10)
    trigger = make_trigger("badnets", (1, 8, 8))
    poisoned_x, poisoned_y, mask = poison_per_class(images, labels, trigger, 0.2, 0, seed=0)
    kept_x, kept_y, dropped = capped_to_request(poisoned_x, poisoned_y, 10, seed=0)
    assert torch.bincount(poisoned_y).tolist() == [16, 8, 8, 8]
    assert torch.bincount(kept_y).tolist() == [10, 8, 8, 8] and dropped == {0: 6}
    assert len(kept_x) == len(kept_y) == 34


def test_a_per_class_under_one_is_refused():
    with pytest.raises(ValueError, match="per_class"):
        requested_balance(torch.zeros(3, dtype=torch.long), 0, seed=0)
