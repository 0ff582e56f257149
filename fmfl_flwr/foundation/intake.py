"""What the server keeps of the D_syn the FM returned: at most what it asked for per label.

The server asks for `syn-per-class` images of every class. A compromised pipeline that
relabels a share of every other class as the target hands back more target rows than that
(CIFAR-10, 20% poison: 2,800 of class 0, 800 of each other class), and a model pre-trained
on that label prior leans on the target (docs/defense.md, "Where pre-training stops").
Keeping a seeded draw of the requested count per label undoes the prior at no cost where
the FM returned what was asked (a clean set passes unchanged); it cannot see a poison that
keeps the counts (`poisoned-weights`).
"""

from __future__ import annotations

import torch


def requested_balance(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted row indices keeping at most `per_class` rows of each label (a seeded draw)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for label in labels.unique():
        rows = torch.nonzero(labels == label).flatten()
        if len(rows) > per_class:
            rows = rows[torch.randperm(len(rows), generator=generator)[:per_class]]
        kept.append(rows)
    return torch.cat(kept).sort().values


def capped_to_request(images: torch.Tensor, labels: torch.Tensor, per_class: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """(images, labels) cut to `requested_balance`, and the rows dropped per label."""
    kept = requested_balance(labels, per_class, seed)
    dropped_mask = torch.ones(len(labels), dtype=torch.bool)
    dropped_mask[kept] = False
    dropped = {int(label): int(count) for label, count in
               zip(*labels[dropped_mask].unique(return_counts=True), strict=True)}
    return images[kept], labels[kept], dropped
