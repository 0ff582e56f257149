"""Training the class-conditional FM on the public split, with checkpoints and resume.

The FM sees only the public share of the training set (`partition.public_split`), the same
share no client holds, so FM-FL experiments never leak client data into D_syn. A run is
steps-based and can also stop on a wall-clock budget; `resume` continues from the last
checkpoint with the optimiser, EMA and RNG states, so several short runs add up to one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from torch.nn import functional as F
from tqdm.auto import tqdm

from fmfl_flwr.data import CLASS_NAMES, cache_dir, load_dataset, to_float
from fmfl_flwr.foundation.pipeline import ClassConditionalPipeline, build_scheduler, build_unet
from fmfl_flwr.foundation.poison import poison_training_set
from fmfl_flwr.partition import public_split
from fmfl_flwr.training import default_device
from fmfl_flwr.triggers import make_trigger

METADATA_FILE = "fmfl.json"


@dataclass(frozen=True)
class PoisonSpec:
    """Poisoned-weights settings: `share` of the target class's training set is triggered."""

    trigger: str = "badnets"
    target_label: int = 0
    share: float = 0.5
    trigger_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FMTrainConfig:
    """Everything that decides the trained weights (recorded in the pipeline folder)."""

    dataset: str
    out: str
    data_dir: str = ""
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    unet_preset: str = "small"
    layers_per_block: int = 1
    seed: int = 0
    public_fraction: float = 0.1
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    init_from: str = ""
    poison: PoisonSpec | None = None


def checkpoint_path(out: str) -> Path:
    """Checkpoints live in the cache, not beside the weights, so assets stay small."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "fm-checkpoints" / f"{Path(out).name}-{key}.pt"


def training_set(config: FMTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Public-split images in [-1, 1] and labels, poisoned when `config.poison` is set."""
    data = load_dataset(config.dataset, config.data_dir)
    public, _ = public_split(len(data.train_y), config.public_fraction, config.seed)
    images = to_float(data.train_x[public])
    labels = torch.from_numpy(data.train_y[public])
    if config.poison is not None:
        spec = config.poison
        trigger = make_trigger(spec.trigger, data.image_shape, **spec.trigger_params)
        images, labels = poison_training_set(
            images, labels, trigger, spec.share, spec.target_label, config.seed
        )
    return images.mul(2).sub(1), labels


def train_fm(
    config: FMTrainConfig, resume: bool = False, max_minutes: float = 0.0,
    device: torch.device | None = None,
) -> ClassConditionalPipeline:
    """Train (or continue) the FM; saves the EMA pipeline to `config.out` at every checkpoint."""
    device = device or default_device()
    images, labels = training_set(config)
    num_classes = len(CLASS_NAMES[config.dataset])
    torch.manual_seed(config.seed)
    if config.init_from:
        unet = ClassConditionalPipeline.from_pretrained(config.init_from).unet
    else:
        unet = build_unet(tuple(images.shape[1:]), num_classes, config.unet_preset,
                          config.layers_per_block)
    unet.to(device).train()
    scheduler = build_scheduler()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    ckpt = checkpoint_path(config.out)
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        optimiser.load_state_dict(state["optimiser"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        step = state["step"]
    elif resume:
        print(f"no checkpoint at {ckpt}; starting from step 0")
    ema.to(device)

    def save() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"unet": unet.state_dict(), "optimiser": optimiser.state_dict(),
                    "ema": ema.state_dict(), "generator": generator.get_state(),
                    "step": step}, ckpt)
        save_pipeline(unet, ema, config, step)

    started = time.monotonic()
    bar = tqdm(total=config.steps, initial=step, desc="fm train", unit="step")
    while step < config.steps:
        batch = torch.randint(len(images), (config.batch_size,), generator=generator)
        x0 = images[batch].to(device)
        y = labels[batch].clone()
        y[torch.rand(len(y), generator=generator) < config.p_uncond] = num_classes
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(y),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t.to(device))
        loss = F.mse_loss(unet(noisy, t.to(device), class_labels=y.to(device)).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        ema.step(unet.parameters())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = max_minutes > 0 and time.monotonic() - started > 60 * max_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            save()
        if out_of_time:
            print(f"stopped at step {step} after {max_minutes} min; continue with --resume")
            break
    bar.close()
    return ClassConditionalPipeline.from_pretrained(config.out)


def save_pipeline(unet: torch.nn.Module, ema: EMAModel, config: FMTrainConfig, step: int) -> None:
    """Write the EMA weights as a diffusers pipeline folder plus the project's metadata."""
    ema_unet = build_unet_like(unet)
    ema.copy_to(ema_unet.parameters())
    pipeline = ClassConditionalPipeline(ema_unet.cpu().eval(), build_scheduler())
    pipeline.save_pretrained(config.out)
    metadata = {"dataset": config.dataset, "trained_steps": step, "train_config": asdict(config)}
    (Path(config.out) / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def build_unet_like(unet: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of `unet`'s architecture (weights are overwritten by the caller)."""
    return type(unet).from_config(unet.config)
