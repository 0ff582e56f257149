"""bench/class_recall.py's per-class scores: recall and predicted share per class."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from class_recall import class_scores  # noqa: E402 - the bench folder is not a package


def test_recall_and_predicted_share_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    scores = class_scores(predicted, labels, 3)
    assert scores["acc"] == pytest.approx(62.5)
    assert scores["recall"] == pytest.approx([50.0, 100.0, 50.0])
    assert scores["predicted-share"] == pytest.approx([37.5, 37.5, 25.0])
