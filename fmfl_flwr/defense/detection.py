"""Test-time detection of triggered inputs from the bounds (MMDF-style, METHOD.md 3).

A trigger drives the unbounded model's activations far past what clean inputs reach; the
bounds clip exactly those, so the margin of the unbounded model's class falls much more
through the bounds on a triggered input than on a clean one. An input is flagged when that
drop exceeds `mu + 2.576 sigma` of the drops on the defender's reference data.

The reference is D_syn, which the FM attack poisons: a plain mean and standard deviation
would take the poisoned share's large drops in and lift the threshold over them. So the
largest `trim` share of the drops (the share of D_syn the defender allows to be poisoned,
as `bounds-trim`) is left out of mu and sigma. (The median absolute deviation is no
substitute: where the bounds sit above most clean activations, most drops are exactly 0
and so is the MAD.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fmfl_flwr.defense.bounds import bounds_disabled
from fmfl_flwr.defense.objectives import class_margin
from fmfl_flwr.training import predict_logits

Z_99 = 2.576  # one-sided 99.5%: MMDF's mu + 2.576 sigma


def margin_drop(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per input, the unbounded model's class margin minus the bounded model's in that class."""
    with bounds_disabled(model):
        unbounded = predict_logits(model, images)
    bounded = predict_logits(model, images)
    classes = unbounded.argmax(1)
    return class_margin(unbounded, classes) - class_margin(bounded, classes)


@dataclass(frozen=True)
class TriggerDetector:
    """Flags inputs whose margin drops through the bounds by more than `threshold`."""

    threshold: float

    @classmethod
    def fit(cls, model: nn.Module, reference: torch.Tensor, trim: float = 0.2,
            z: float = Z_99) -> TriggerDetector:
        """`mu + z sigma` of the drops on `reference` (D_syn), its largest `trim` left out."""
        return cls.from_drops(margin_drop(model, reference), trim, z)

    @classmethod
    def from_drops(cls, drops: torch.Tensor, trim: float = 0.2, z: float = Z_99
                   ) -> TriggerDetector:
        """`fit` from the reference's margin drops already at hand (`margin_drop`)."""
        if not 0.0 <= trim < 1.0:
            raise ValueError(f"detection trim={trim!r} must be in [0, 1)")
        drops = drops.sort().values
        kept = drops[: max(2, len(drops) - int(trim * len(drops)))]
        return cls(float(kept.mean() + z * kept.std()))

    def flags(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """True where an input's margin drop marks it as triggered."""
        return margin_drop(model, images) > self.threshold
