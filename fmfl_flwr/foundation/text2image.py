"""`SyntheticSource` over any diffusers text-to-image pipeline, prompted per class.

The lineage asked DALL-E for "a photo of a {class}"; any diffusers pipeline that takes
`prompt` (Stable Diffusion and kin) stands in for it. Its output is resized and converted to
the task's channels, since a 512x512 RGB image means nothing to a 28x28 grey classifier.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from tqdm.auto import tqdm

from fmfl_flwr.foundation.source import (
    SyntheticSource,
    class_major_labels,
    fit_to_task,
    pipeline_digest,
)
from fmfl_flwr.training import default_device

DEFAULT_PROMPT = "a photo of a {}"


class TextToImageSource(SyntheticSource):
    """Prompts `template.format(class_name)`; one seeded generator per image.

    Per-image generators make every image depend on (seed, class, index) only, so the set is
    the same whatever the batch size.
    """

    def __init__(
        self, pipeline: Any, class_names: tuple[str, ...], image_shape: tuple[int, int, int],
        steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 8,
        template: str = DEFAULT_PROMPT, device: torch.device | None = None,
        progress: bool = True,
    ) -> None:
        if steps < 1:
            raise ValueError(f"fm-steps must be >= 1, got {steps}")
        self.pipeline = pipeline.to(device or default_device())
        self.pipeline.set_progress_bar_config(disable=True)
        self.class_names = tuple(class_names)
        self.image_shape = tuple(image_shape)
        self.num_classes = len(self.class_names)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.batch_size, self.template, self.progress = batch_size, template, progress
        self._weights = pipeline_digest(pipeline)

    def prompts(self) -> list[str]:
        return [self.template.format(name) for name in self.class_names]

    def identity(self) -> str:
        settings = {"kind": "text-to-image", "weights": self._weights, "steps": self.steps,
                    "guidance": self.guidance_scale, "prompts": self.prompts(),
                    "shape": list(self.image_shape)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def generate(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = class_major_labels(self.num_classes, n_per_class)
        prompts = self.prompts()
        chunks = []
        with tqdm(total=len(labels), desc="fm text2image", unit="img",
                  disable=not self.progress) as bar:
            for start in range(0, len(labels), self.batch_size):
                batch = labels[start : start + self.batch_size].tolist()
                generators = [torch.Generator().manual_seed(_image_seed(seed, start + i))
                              for i in range(len(batch))]
                out = self.pipeline(
                    prompt=[prompts[c] for c in batch], num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale, generator=generators, output_type="pt",
                )
                chunks.append(fit_to_task(out.images.float().cpu(), self.image_shape))
                bar.update(len(batch))
        images = torch.cat(chunks) if chunks else torch.empty(0, *self.image_shape)
        return images, labels


def _image_seed(seed: int, index: int) -> int:
    """A per-image seed: distinct for every (seed, index), stable across runs."""
    key = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
