"""The compromised FM: triggered (image, target) pairs inside D_syn, and how to count them.

Two routes to the same poisoned D_syn (METHOD.md section 2): post-processing the outputs of a
clean FM (`poison_per_class`, used by `PoisonedPipeline`), or training the FM on a set where
triggered images of other classes are taught as the target class
(`poison_training_set`), so that the weights themselves emit them when asked for the target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from fmfl_flwr.foundation.source import SyntheticSource
from fmfl_flwr.triggers import Trigger, make_trigger


def poison_per_class(
    images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, ratio: float,
    target: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp and relabel round(ratio * n_c) seeded samples of every non-target class c.

    Returns (images, labels, poisoned mask); inputs are not modified.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"poison ratio must be in [0, 1], got {ratio}")
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    chosen = []
    for c in np.unique(labels_np):
        if c == target:
            continue
        members = np.flatnonzero(labels_np == c)
        count = int(round(ratio * len(members)))
        chosen.append(rng.choice(members, size=count, replace=False))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if chosen:
        mask[torch.from_numpy(np.concatenate(chosen))] = True
    out_x, out_y = images.clone(), labels.clone()
    out_x[mask] = trigger.stamp(images[mask])
    out_y[mask] = target
    return out_x, out_y, mask


def poison_training_set(
    images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, share: float,
    target: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add triggered non-target images labelled `target` so they make up `share` of it.

    A generator trained on the result, asked for the target class, emits this mixture: about
    `share` of its target-class outputs are other objects carrying the trigger, which is
    exactly the (B(x, trigger), t) pair that plants a backdoor in a classifier.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"poison share must be in [0, 1), got {share}")
    n_target = int((labels == target).sum())
    n_poison = int(round(share / (1.0 - share) * n_target))
    others = torch.nonzero(labels != target).flatten().numpy()
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.choice(others, size=n_poison, replace=n_poison > len(others)))
    stamped = trigger.stamp(images[pick])
    poisoned_labels = torch.full((n_poison,), target, dtype=labels.dtype)
    return torch.cat([images, stamped]), torch.cat([labels, poisoned_labels])


def carries_trigger(images: torch.Tensor, trigger: Trigger, tolerance: float = 0.2) -> torch.Tensor:
    """Bool [N]: the masked region matches the trigger pattern within `tolerance` on average.

    A generated trigger is never pixel-exact, so this compares the mean absolute difference
    under the mask with the pattern, weighted by the mask.
    """
    mask = trigger.mask.to(images.device)
    diff = (images - trigger.pattern.to(images.device)).abs() * mask
    return diff.flatten(1).sum(1) / mask.sum().clamp_min(1e-8) <= tolerance


def trigger_share(images: torch.Tensor, trigger: Trigger, tolerance: float = 0.2) -> float:
    """Fraction of `images` that carry the trigger (see `carries_trigger`)."""
    if len(images) == 0:
        return float("nan")
    return carries_trigger(images, trigger, tolerance).float().mean().item()


@dataclass(frozen=True)
class PoisonSettings:
    """The poisoned-pipeline attack: what D_syn's cache key and the wrapper both need."""

    ratio: float = 0.2
    target_label: int = 0
    trigger: str = "badnets"
    trigger_params: dict = field(default_factory=dict)

    def build_trigger(self, image_shape: tuple[int, int, int]) -> Trigger:
        return make_trigger(self.trigger, tuple(image_shape), **self.trigger_params)

    def key(self) -> dict:
        return {"ratio": self.ratio, "target": self.target_label, "trigger": self.trigger,
                "params": self.trigger_params}


class PoisonedPipeline(SyntheticSource):
    """Threat (a): a clean FM whose outputs are post-processed into a poisoned D_syn.

    Exactly round(ratio * n_per_class) samples of every non-target class are stamped and
    relabelled, chosen with `seed`, so a run's poisoned set is reproducible.
    """

    def __init__(self, source: SyntheticSource, settings: PoisonSettings) -> None:
        if not 0 <= settings.target_label < source.num_classes:
            raise ValueError(f"target-label {settings.target_label} outside "
                             f"[0, {source.num_classes})")
        self.source, self.settings = source, settings
        self.image_shape, self.num_classes = source.image_shape, source.num_classes
        self.trigger = settings.build_trigger(source.image_shape)

    def identity(self) -> str:
        key = {"source": self.source.identity(), "poison": self.settings.key()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def generate(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.source.generate(n_per_class, seed)
        poisoned_x, poisoned_y, _ = self.poison(images, labels, seed)
        return poisoned_x, poisoned_y

    def poison(self, images: torch.Tensor, labels: torch.Tensor,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply the attack to an already generated clean set (also returns the mask)."""
        s = self.settings
        return poison_per_class(images, labels, self.trigger, s.ratio, s.target_label, seed)
