"""D_syn for one run config: the single call the FM-FL fusion strategy makes."""

from __future__ import annotations

import json
from pathlib import Path

from fmfl_flwr.foundation.cache import SyntheticSet, synthetic_set
from fmfl_flwr.foundation.loader import FMLoadError, load_fm, resolve_spec
from fmfl_flwr.foundation.poison import PoisonSettings
from fmfl_flwr.foundation.train import METADATA_FILE


def poison_settings(config) -> PoisonSettings | None:
    """The poisoned-pipeline settings of a run config, or None when that attack is off."""
    if config.fm_attack != "poisoned-pipeline":
        return None
    params = {"path": config.trigger_image} if config.trigger == "image" else {}
    return PoisonSettings(config.poison_ratio, config.target_label, config.trigger, params)


def synthetic_set_for_config(config, progress: bool = True) -> SyntheticSet:
    """D_syn for an `ExperimentConfig`: its FM, fm-steps, syn-per-class, seed and attack.

    An empty `fm` is resolved by the caller (`app_config.with_default_fm`).
    fm-attack=poisoned-weights uses the FM as it is (the poison is in its weights) and
    refuses an FM whose metadata says it was trained clean, so such a run is never a silent
    clean run.
    """
    if config.fm_attack == "poisoned-weights":
        check_poisoned_weights(config.fm)
    source = load_fm(config.fm, config.dataset, config.fm_steps, progress=progress)
    return synthetic_set(source, config.syn_per_class, config.seed, poison_settings(config))


def check_poisoned_weights(spec: str) -> None:
    """Refuse an FM our own training marked clean; other pipelines cannot be checked."""
    meta = resolve_spec(spec) / METADATA_FILE
    if meta.is_file():
        train_config = json.loads(meta.read_text()).get("train_config", {})
        if not train_config.get("poison"):
            raise FMLoadError(
                f"fm-attack='poisoned-weights' needs an FM trained with `fmfl fm train --poison`;"
                f" {str(Path(spec))!r} was trained clean"
            )
