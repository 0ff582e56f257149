"""PNG grids of FM samples, one per class: the quickest check that an FM is any good."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from fmfl_flwr.foundation.source import SyntheticSource


def save_class_grids(source: SyntheticSource, n_per_class: int, seed: int,
                     out_dir: Path) -> list[Path]:
    """`class-<k>.png` per class plus `all.png` (one row of up to 10 per class)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = source.generate(n_per_class, seed)
    paths = []
    for c in range(source.num_classes):
        path = out_dir / f"class-{c}.png"
        save_image(images[labels == c], path, nrow=8, padding=1)
        paths.append(path)
    per_row = min(n_per_class, 10)
    overview = torch.cat([images[labels == c][:per_row] for c in range(source.num_classes)])
    save_image(overview, out_dir / "all.png", nrow=per_row, padding=1)
    return [*paths, out_dir / "all.png"]
