"""The whole run config of the Flower app: the experiment's keys plus the rules' own keys."""

from __future__ import annotations

from typing import Any

from fmfl_flwr.config import ConfigError, ExperimentConfig


def parse_app_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """Check every key of a run config, and that the named components exist."""
    from strategies import AGGREGATIONS, aggregation_params

    config = ExperimentConfig.from_run_config(dict(run_config), tuple(aggregation_params()))
    try:
        AGGREGATIONS.check(config.aggregation)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return config
