"""`SyntheticSource` over the project's class-conditional diffusion pipeline."""

from __future__ import annotations

import hashlib
import json

import torch
from tqdm.auto import tqdm

from fmfl_flwr.foundation.pipeline import ClassConditionalPipeline
from fmfl_flwr.foundation.source import (
    SyntheticSource,
    class_major_labels,
    fit_to_task,
    pipeline_digest,
)
from fmfl_flwr.training import default_device


class DiffusionSource(SyntheticSource):
    """Samples a `ClassConditionalPipeline` in batches on the best device.

    All initial noise is drawn up front from one seeded generator, so the images depend on
    the seed and the counts only, not on the batch size or on which batches ran first.
    """

    def __init__(
        self, pipeline: ClassConditionalPipeline, image_shape: tuple[int, int, int],
        steps: int = 25, guidance_scale: float = 1.0, batch_size: int = 250,
        device: torch.device | None = None, progress: bool = True,
    ) -> None:
        if steps < 1:
            raise ValueError(f"fm-steps must be >= 1, got {steps}")
        self.pipeline = pipeline.to(device or default_device())
        self.pipeline.set_progress_bar_config(disable=True)
        self.image_shape = tuple(image_shape)
        self.num_classes = pipeline.num_classes
        self.steps, self.guidance_scale = steps, guidance_scale
        self.batch_size, self.progress = batch_size, progress
        self._weights = pipeline_digest(pipeline)

    def identity(self) -> str:
        settings = {"kind": "class-conditional-ddim", "weights": self._weights,
                    "steps": self.steps, "guidance": self.guidance_scale,
                    "shape": list(self.image_shape)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def generate(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = class_major_labels(self.num_classes, n_per_class)
        config = self.pipeline.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
        chunks = []
        with tqdm(total=len(labels), desc="fm sample", unit="img",
                  disable=not self.progress) as bar:
            for start in range(0, len(labels), self.batch_size):
                stop = start + self.batch_size
                chunks.append(self.pipeline(labels[start:stop], self.steps,
                                            self.guidance_scale, noise=noise[start:stop]))
                bar.update(len(chunks[-1]))
        images = torch.cat(chunks) if chunks else torch.empty(0, *self.image_shape)
        return fit_to_task(images, self.image_shape), labels
