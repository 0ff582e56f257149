"""`load_fm`: one spec string (a pipeline folder or a hub id) to a `SyntheticSource`.

A folder saved by `fmfl fm train` holds a `ClassConditionalPipeline`; anything else is taken
for a text-to-image pipeline. Nothing is downloaded unless the hub is reachable and allowed
(`HF_HUB_OFFLINE` unset); every failure names what was tried.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fmfl_flwr.data import CLASS_NAMES, IMAGE_SHAPE
from fmfl_flwr.foundation.diffusion import DiffusionSource
from fmfl_flwr.foundation.pipeline import ClassConditionalPipeline
from fmfl_flwr.foundation.source import SyntheticSource
from fmfl_flwr.foundation.text2image import DEFAULT_PROMPT, TextToImageSource
from fmfl_flwr.foundation.train import METADATA_FILE


class FMLoadError(RuntimeError):
    """The FM spec names neither a usable pipeline folder nor a reachable hub id."""


def load_fm(
    spec: str, dataset: str, steps: int = 25, guidance_scale: float | None = None,
    batch_size: int | None = None, device: torch.device | None = None,
    prompt_template: str = DEFAULT_PROMPT, progress: bool = True,
) -> SyntheticSource:
    """The FM named by `spec`, sampling with `steps` denoising steps for `dataset`'s task.

    guidance_scale and batch_size default per kind: 1.0 / 250 for the class-conditional
    FM (guidance doubles its cost), 7.5 / 8 for text-to-image pipelines.
    """
    if dataset not in IMAGE_SHAPE:
        raise ValueError(f"dataset={dataset!r} is not known; accepted: {', '.join(IMAGE_SHAPE)}")
    folder = resolve_spec(spec)
    kind = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if kind == ClassConditionalPipeline.__name__:
        check_fm_dataset(folder, dataset)
        pipeline = ClassConditionalPipeline.from_pretrained(folder)
        return DiffusionSource(
            pipeline, IMAGE_SHAPE[dataset], steps, 1.0 if guidance_scale is None
            else guidance_scale, batch_size or 250, device, progress,
        )
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    return TextToImageSource(
        pipeline, CLASS_NAMES[dataset], IMAGE_SHAPE[dataset], steps,
        7.5 if guidance_scale is None else guidance_scale, batch_size or 8,
        prompt_template, device, progress,
    )


def resolve_spec(spec: str) -> Path:
    """A local pipeline folder for `spec`: the folder itself, or the hub snapshot."""
    if not spec:
        raise FMLoadError("no FM given: set fm to a pipeline folder (e.g. assets/fm/fashion-mnist)")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FMLoadError(f"FM {spec!r}: folder {path.resolve()} has no model_index.json, "
                              "so it is not a diffusers pipeline folder")
        return path
    if not _looks_like_hub_id(spec):
        raise FMLoadError(f"FM {spec!r}: no such folder ({path.resolve()}), and it is not a "
                          "hub id of the form 'owner/name'")
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        return Path(DiffusionPipeline.download(spec))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one clear message
        why = "HF_HUB_OFFLINE is set and it is not cached" if offline else "not reachable"
        detail = (str(err).strip().splitlines() or [""])[0]
        raise FMLoadError(
            f"FM {spec!r}: tried the local folder {path.resolve()} (does not exist) and the "
            f"hub id {spec!r} ({why}): {type(err).__name__}: {detail}"
        ) from err


def check_fm_dataset(folder: Path, dataset: str) -> None:
    """A class-conditional FM's labels mean its own data set's classes: refuse a mismatch."""
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        return
    trained_on = json.loads(meta_path.read_text()).get("dataset")
    if trained_on and trained_on != dataset:
        raise FMLoadError(f"FM {str(folder)!r} was trained on {trained_on!r}, not {dataset!r}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
