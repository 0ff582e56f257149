"""Backdoor triggers as plain tensor functions, shared by client and FM attacks.

A trigger is a (mask, pattern) pair over one image: stamping computes
`x * (1 - mask) + pattern * mask`. A BadNets patch is a hard mask over a small square, a
blended trigger a constant soft mask over the whole image, DBA splits a trigger into k
disjoint pieces, and a user image becomes a patch or a blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TRIGGERS = ("badnets", "blended", "dba", "image")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass(frozen=True)
class Trigger:
    """mask and pattern are [C, H, W] float tensors in [0, 1]."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Triggered copy of float images [N, C, H, W] in [0, 1]."""
        mask, pattern = self.mask.to(images.device), self.pattern.to(images.device)
        return images * (1 - mask) + pattern * mask

    def pieces(self, k: int) -> list[Trigger]:
        """Split the mask's support into k disjoint pieces (DBA), in raster order of rows."""
        rows = torch.nonzero(self.mask.amax(0).amax(1) > 0).flatten()
        if k < 1 or len(rows) < k:
            raise ValueError(f"cannot split a trigger spanning {len(rows)} rows into {k} pieces")
        out = []
        for chunk in torch.tensor_split(rows, k):
            keep = torch.zeros_like(self.mask)
            keep[:, chunk] = 1
            out.append(Trigger(self.mask * keep, self.pattern))
        return out


def _corner_origin(position: str, height: int, width: int, size_h: int, size_w: int,
                   margin: int) -> tuple[int, int]:
    if position not in POSITIONS:
        raise ValueError(f"trigger position={position!r} is not known; accepted: {POSITIONS}")
    top = margin if position.startswith("top") else height - size_h - margin
    left = margin if position.endswith("left") else width - size_w - margin
    return top, left


def badnets(image_shape: tuple[int, int, int], size: int = 3, position: str = "bottom-right",
            value: float = 1.0, margin: int = 1) -> Trigger:
    """A solid `size` x `size` square of intensity `value` near a corner (lineage: 3x3 white)."""
    channels, height, width = image_shape
    top, left = _corner_origin(position, height, width, size, size, margin)
    mask = torch.zeros(image_shape)
    mask[:, top : top + size, left : left + size] = 1.0
    return Trigger(mask, torch.full(image_shape, float(value)))


def blended(image_shape: tuple[int, int, int], alpha: float = 0.2, seed: int = 0) -> Trigger:
    """A fixed seeded noise pattern alpha-blended over the whole image (Chen et al. 2017)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"blended alpha must be in (0, 1], got {alpha}")
    pattern = torch.rand(image_shape, generator=torch.Generator().manual_seed(seed))
    return Trigger(torch.full(image_shape, float(alpha)), pattern)


def dba_global(image_shape: tuple[int, int, int], pieces: int = 4, bar_width: int = 4,
               gap: int = 1, position: str = "top-left", margin: int = 1) -> Trigger:
    """DBA's global trigger: `pieces` white bars of 1 x bar_width, one row apart by `gap`."""
    channels, height, width = image_shape
    span = pieces + (pieces - 1) * gap
    top, left = _corner_origin(position, height, width, span, bar_width, margin)
    mask = torch.zeros(image_shape)
    for i in range(pieces):
        mask[:, top + i * (1 + gap), left : left + bar_width] = 1.0
    return Trigger(mask, torch.ones(image_shape))


def from_image(image_shape: tuple[int, int, int], path: str, size: int = 0,
               position: str = "bottom-right", alpha: float = 1.0, margin: int = 1) -> Trigger:
    """A user image as trigger: a `size` patch in a corner, or (size 0) blended over all."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if not Path(path).is_file():
        raise FileNotFoundError(f"trigger image {path!r} does not exist")
    channels, height, width = image_shape
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        target = (size, size) if size else (width, height)
        pixels = pil_to_tensor(img.resize(target)).float() / 255.0
    mask, pattern = torch.zeros(image_shape), torch.zeros(image_shape)
    top, left = (0, 0) if not size else _corner_origin(position, height, width, size, size, margin)
    h, w = pixels.shape[1:]
    pattern[:, top : top + h, left : left + w] = pixels
    mask[:, top : top + h, left : left + w] = float(alpha)
    return Trigger(mask, pattern)


def make_trigger(name: str, image_shape: tuple[int, int, int], **params) -> Trigger:
    """Build a trigger by name; `params` are the builder's keyword arguments."""
    builders = {"badnets": badnets, "blended": blended, "dba": dba_global, "image": from_image}
    if name not in builders:
        raise ValueError(f"trigger={name!r} is not known; accepted: {', '.join(TRIGGERS)}")
    return builders[name](image_shape, **params)
