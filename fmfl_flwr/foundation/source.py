"""The one interface every FM offers the FL server: class-balanced images for a task.

The fusion strategy, the cache and the attacks only see `SyntheticSource`; whether the
images come from the project's class-conditional diffusion model, a text-to-image pipeline
or a poisoned wrapper is decided once, by `load_fm`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch.nn import functional as F


class SyntheticSource(ABC):
    """A generator of labelled images at the task's resolution and channel count."""

    image_shape: tuple[int, int, int]
    num_classes: int

    @abstractmethod
    def generate(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float [N, C, H, W] in [0, 1], labels int64 [N]), class-major order.

        The same (n_per_class, seed) gives the same images on the same machine.
        """

    @abstractmethod
    def identity(self) -> str:
        """A hash of the weights and every setting that changes the output (cache key)."""


def class_major_labels(num_classes: int, n_per_class: int) -> torch.Tensor:
    """[0]*n + [1]*n + ...: the label layout every source returns."""
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(n_per_class)


def fit_to_task(images: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize (antialiased) and convert channels so any FM's output fits the classifier."""
    channels, height, width = image_shape
    if images.shape[1] != channels:
        if channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype)
            images = (images[:, :3] * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot map {images.shape[1]} channels to {channels}")
    if tuple(images.shape[2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear",
                               antialias=True, align_corners=False)
    return images.clamp(0, 1).contiguous()


def digest(obj: Any) -> str:
    """sha256 of a pipeline component: module weights, a config, a vocabulary, or JSON."""
    sha = hashlib.sha256()
    if isinstance(obj, torch.nn.Module):
        for name, tensor in sorted(obj.state_dict().items()):
            sha.update(name.encode())
            sha.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif hasattr(obj, "get_vocab"):
        sha.update(json.dumps(sorted(obj.get_vocab().items())).encode())
    elif hasattr(obj, "config"):
        sha.update(json.dumps(dict(obj.config), sort_keys=True, default=str).encode())
    else:
        sha.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return sha.hexdigest()


def pipeline_digest(pipeline: Any) -> str:
    """sha256 over every component of a diffusers pipeline, in name order."""
    sha = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if component is not None:
            sha.update(f"{name}:{digest(component)}".encode())
    return sha.hexdigest()
