"""The pre-trained model on disk: trained once per (initial weights, D_syn, settings).

Pre-training ResNet-18 on 10,000 synthetic images takes 45 s alone on a 2-core CPU,
minutes beside other runs and over an hour at eight epochs (stop 44), and every cell of a
grid that shares the model, seed and D_syn pre-trains the same weights. Training is seeded
and draws from no global RNG, so a cached copy is the model training would give on this
machine and device, and every later step sees the same RNG state. The key hashes
everything training reads; a copy that fails to load is trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fmfl_flwr.data import cache_dir
from fmfl_flwr.fusion import PRETRAIN_LR, FusionSettings, pretrain
from fmfl_flwr.training import default_device


def default_root() -> Path:
    return cache_dir() / "pretrained"


def pretrain_key(model: nn.Module, syn_x: torch.Tensor, syn_y: torch.Tensor,
                 settings: FusionSettings) -> str:
    """sha256 of the initial weights, D_syn, the training settings, torch and the device."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in (syn_x, syn_y):
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.cpu().contiguous().numpy().tobytes())
    sha.update(json.dumps({
        "epochs": settings.pretrain_epochs, "batch_size": settings.batch_size,
        "seed": settings.seed, "lr": PRETRAIN_LR, "torch": torch.__version__,
        "lr_schedule": settings.pretrain_lr_schedule,
        "device": default_device().type,
    }, sort_keys=True).encode())
    return sha.hexdigest()[:32]


def pretrain_cached(model: nn.Module, syn_x: torch.Tensor, syn_y: torch.Tensor,
                    settings: FusionSettings,
                    on_epoch: Callable[[int, float], None] | None = None,
                    root: Path | None = None) -> bool:
    """`pretrain` in place, or load its result from the cache; True when it was loaded."""
    if not settings.pretrain_epochs:
        return False
    root = Path(root) if root else default_root()
    path = root / f"{pretrain_key(model, syn_x, syn_y, settings)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return True
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
            warnings.warn(f"cached pre-trained model {path} failed to load ({error}); "
                          "training it again", stacklevel=2)
    pretrain(model, syn_x, syn_y, settings, on_epoch=on_epoch)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return False
