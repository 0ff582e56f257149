"""The whole run config of the Flower app: the experiment's keys plus the rules' own keys."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmfl_flwr.config import ConfigError, ExperimentConfig
from fmfl_flwr.data import cache_dir
from fmfl_flwr.defense import DEFENSES, BoundSettings
from fmfl_flwr.fusion import FusionSettings
from strategies import AGGREGATIONS, aggregation_params


def parse_app_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """Check every key of a run config, and that the named components exist."""
    config = ExperimentConfig.from_run_config(dict(run_config), tuple(aggregation_params()))
    try:
        AGGREGATIONS.check(config.aggregation)
        DEFENSES.check(config.defense)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return config


def with_default_fm(config: ExperimentConfig) -> ExperimentConfig:
    """`fm` empty means `$FMFL_FM_DIR/<dataset>`, then `<cache>/fm/<dataset>`.

    `fmfl run` and the launchers point FMFL_FM_DIR at this repository's `assets/fm`, where
    the trained pipelines live (a Flower app bundle carries no weights).
    """
    if config.fm:
        return config
    root = Path(os.environ["FMFL_FM_DIR"]) if os.environ.get("FMFL_FM_DIR") else \
        cache_dir() / "fm"
    return replace(config, fm=str(root.expanduser().resolve() / config.dataset))


def fusion_settings(config: ExperimentConfig) -> FusionSettings:
    """FM-FL fusion's knobs of a run config.

    `distill-unlearn-poison` (on by default) acts only with the activation-bounds defense:
    no other defense names a target, so the baselines' runs keep plain fusion.
    """
    return FusionSettings(config.pretrain_epochs, config.distill_epochs, config.distill_alpha,
                          config.distill_tau, config.distill_lr, config.distill_batch_size,
                          config.seed, through_bounds=config.distill_bounds,
                          relabel_target=config.distill_relabel_target,
                          relabel_cap=config.bounds_overrule_cap,
                          unlearn_poison=config.distill_unlearn_poison and
                          config.defense == "activation-bounds",
                          unlearn_to_teacher=config.distill_unlearn_teacher,
                          unlearn_restore_target=config.distill_unlearn_restore_target,
                          unlearn_cap=config.bounds_overrule_cap
                          if config.distill_unlearn_restore_target else 1.0,
                          requested_per_class=config.syn_per_class,
                          pretrain_lr_schedule=config.pretrain_lr_schedule)


def bound_settings(config: ExperimentConfig) -> BoundSettings:
    """The activation-bounds knobs of a run config."""
    return replace(BoundSettings(), objective=config.bounds_objective,
                   granularity=config.bounds_granularity, epochs=config.bounds_epochs,
                   warm_epochs=config.bounds_warm_epochs,
                   warm_min_agreement=config.bounds_warm_min_agreement,
                   max_samples=config.bounds_samples, lr=config.bounds_lr, c0=config.bounds_c0,
                   init_quantile=config.bounds_init_quantile,
                   target_agreement=config.bounds_target_agreement,
                   trim=config.bounds_trim,
                   class_gate=config.bounds_class_gate,
                   overrule_cap=config.bounds_overrule_cap,
                   overrule_cap_halvings=config.bounds_overrule_cap_halvings,
                   overrule_rank=config.bounds_overrule_rank,
                   overrule_target=config.bounds_overrule_target,
                   overrule_gate=config.bounds_overrule_gate,
                   overrule_source_max=config.bounds_overrule_source_max,
                   overrule_lift_max=config.bounds_overrule_lift_max,
                   overrule_confidence_min=config.bounds_overrule_confidence_min,
                   overrule_flip_min=config.bounds_overrule_flip_min,
                   overrule_flip_lift_min=config.bounds_overrule_flip_lift_min,
                   overrule_flip_count=config.bounds_overrule_flip_count,
                   overrule_gate_rounds=config.bounds_overrule_gate_rounds,
                   excuse_flips=config.bounds_excuse_flips,
                   gate_class_weight=config.bounds_gate_class_weight,
                   unsure_weight=config.bounds_unsure_weight,
                   invert_weight=config.bounds_invert_weight,
                   invert_share=config.bounds_invert_share,
                   invert_steps=config.bounds_invert_steps,
                   invert_mask_weight=config.bounds_invert_mask_weight, seed=config.seed)
