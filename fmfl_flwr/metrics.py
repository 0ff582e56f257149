"""ACC and ASR of a model on the real test set (METHOD.md 4)."""

from __future__ import annotations

import torch
from torch import nn

from fmfl_flwr.training import accuracy, predict_logits
from fmfl_flwr.triggers import Trigger


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        trigger: Trigger, target: int) -> float:
    """Share of non-target test images that the triggered copy sends to `target`."""
    keep = labels != target
    if not keep.any():
        return float("nan")
    predictions = predict_logits(model, trigger.stamp(images[keep])).argmax(1)
    return (predictions == target).float().mean().item()


def acc_and_asr(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                trigger: Trigger, target: int) -> dict[str, float]:
    return {"acc": accuracy(model, images, labels),
            "asr": attack_success_rate(model, images, labels, trigger, target)}
