"""The whole run config of the Flower app: the experiment's keys plus the rules' own keys."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fmfl_flwr.config import ConfigError, ExperimentConfig
from fmfl_flwr.defense import DEFENSES, BoundSettings
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


def bound_settings(config: ExperimentConfig) -> BoundSettings:
    """The activation-bounds knobs of a run config."""
    return replace(BoundSettings(), objective=config.bounds_objective,
                   granularity=config.bounds_granularity, epochs=config.bounds_epochs,
                   max_samples=config.bounds_samples, lr=config.bounds_lr, c0=config.bounds_c0,
                   init_quantile=config.bounds_init_quantile,
                   target_agreement=config.bounds_target_agreement, seed=config.seed)
