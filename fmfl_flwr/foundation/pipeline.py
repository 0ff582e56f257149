"""The project's class-conditional diffusion FM as a diffusers pipeline.

diffusers' own `DDPMPipeline`/`DDIMPipeline` take no class labels, so this is the smallest
pipeline that does: a `UNet2DModel` with a class embedding and a `DDIMScheduler`, saved and
loaded with `save_pretrained`/`from_pretrained` like any other pipeline folder. The embedding
has one extra row, the "no class" token, so samples can use classifier-free guidance.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

# UNet widths per preset: "small" is the measured CPU trade-off for 28x28 / 32x32 data.
UNET_PRESETS: dict[str, tuple[int, ...]] = {
    "tiny": (16, 32, 32),
    "small": (32, 64, 64),
    "base": (64, 128, 128),
}


def build_unet(
    image_shape: tuple[int, int, int], num_classes: int, preset: str = "small",
    layers_per_block: int = 1,
) -> UNet2DModel:
    """A fresh class-conditional UNet; two downsamplings, so H and W must divide by 4."""
    if preset not in UNET_PRESETS:
        accepted = ", ".join(UNET_PRESETS)
        raise ValueError(f"unet preset={preset!r} is not known; accepted: {accepted}")
    channels, height, width = image_shape
    if height % 4 or width % 4:
        raise ValueError(f"image size {height}x{width} must divide by 4 for this UNet")
    widths = UNET_PRESETS[preset]
    return UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=min(8, widths[0]),
        num_class_embeds=num_classes + 1,
    )


def build_scheduler() -> DDIMScheduler:
    """Linear-beta DDPM training schedule, sampled with deterministic DDIM (eta = 0)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


class ClassConditionalPipeline(DiffusionPipeline):
    """Images for given class labels from a class-conditional UNet and a DDIM scheduler."""

    unet: UNet2DModel
    scheduler: DDIMScheduler

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """Real classes; the last embedding row is the unconditional token."""
        return int(self.unet.config.num_class_embeds) - 1

    @torch.no_grad()
    def __call__(
        self,
        class_labels: torch.Tensor,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Float images in [0, 1], [N, C, H, W], on the CPU.

        `noise` (the initial latents) makes the output independent of batching; without it
        the noise comes from `generator`. guidance_scale > 1 uses classifier-free guidance.
        """
        config = self.unet.config
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes})")
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        if noise is None:
            noise = torch.randn(shape, generator=generator)
        device = self.unet.device
        sample = noise.to(device=device, dtype=self.unet.dtype)
        labels = labels.to(device)
        guided = guidance_scale != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if guided else sample
            eps = self.unet(model_in, t, class_labels=labels).sample
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(eps, t, sample, eta=0.0).prev_sample
        return sample.float().cpu().add(1).div(2).clamp(0, 1)
