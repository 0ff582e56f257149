"""The server's foundation model: a source of class-labelled synthetic images (D_syn).

Public API (see docs/foundation.md):

- `load_fm(spec, dataset, steps)` -> `SyntheticSource` (folder or hub id)
- `synthetic_set(source, n_per_class, seed, attack)` -> cached, verified `SyntheticSet`
- `synthetic_set_for_config(config)` -> D_syn for an `ExperimentConfig`
- `PoisonedPipeline`, `PoisonSettings`, `carries_trigger`, `trigger_share`: the FM threat
- `train_fm`, `evaluate_fm`, `save_class_grids`: what `fmfl fm train|eval|sample` run
"""

from fmfl_flwr.foundation.api import poison_settings, synthetic_set_for_config
from fmfl_flwr.foundation.cache import SyntheticSet, synthetic_set
from fmfl_flwr.foundation.diffusion import DiffusionSource
from fmfl_flwr.foundation.evaluate import evaluate_fm
from fmfl_flwr.foundation.loader import FMLoadError, load_fm
from fmfl_flwr.foundation.pipeline import ClassConditionalPipeline, build_scheduler, build_unet
from fmfl_flwr.foundation.poison import (
    PoisonedPipeline,
    PoisonSettings,
    carries_trigger,
    poison_per_class,
    trigger_share,
)
from fmfl_flwr.foundation.preview import save_class_grids
from fmfl_flwr.foundation.source import SyntheticSource
from fmfl_flwr.foundation.text2image import TextToImageSource
from fmfl_flwr.foundation.train import FMTrainConfig, PoisonSpec, train_fm

__all__ = [
    "ClassConditionalPipeline", "DiffusionSource", "FMLoadError", "FMTrainConfig",
    "PoisonSettings", "PoisonSpec", "PoisonedPipeline", "SyntheticSet", "SyntheticSource",
    "TextToImageSource", "build_scheduler", "build_unet", "carries_trigger", "evaluate_fm",
    "load_fm", "poison_per_class", "poison_settings", "save_class_grids", "synthetic_set",
    "synthetic_set_for_config", "train_fm", "trigger_share",
]
