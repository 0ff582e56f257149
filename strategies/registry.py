"""Aggregation rules by name: Flower's own strategies and this package's, in one registry.

    strategy = build_aggregation("flame", run_config, fraction_train=0.5, min_train_nodes=5)

Every rule declares the run-config keys it reads, with their defaults, in `PARAMS`: a key is
``<rule>-<argument>``, the constructor argument in kebab-case (`rlr-threshold` is RLR's
`threshold`). `aggregation_params()` gathers them all. Flower's strategies are reused as
they are; the rules Flower lacks are one decorated class each in this package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fmfl_flwr.registry import Registry

ParamValue = bool | int | float | str

AGGREGATIONS = Registry("aggregation")


@dataclass(frozen=True)
class FlowerRule:
    """One of Flower's strategies, reused as it is, with the run-config keys it reads."""

    factory: Callable[..., Strategy]
    PARAMS: Mapping[str, ParamValue]

    def __call__(self, **kwargs: Any) -> Strategy:
        return self.factory(**kwargs)


AGGREGATIONS.add("fedavg", FlowerRule(FedAvg, {}))
AGGREGATIONS.add("krum", FlowerRule(Krum, {"krum-num-malicious-nodes": 0}))
AGGREGATIONS.add(
    "multikrum",
    FlowerRule(MultiKrum, {"multikrum-num-malicious-nodes": 0, "multikrum-num-nodes-to-select": 1}),
)
AGGREGATIONS.add("bulyan", FlowerRule(Bulyan, {"bulyan-num-malicious-nodes": 0}))
AGGREGATIONS.add("median", FlowerRule(FedMedian, {}))
AGGREGATIONS.add("trimmed-mean", FlowerRule(FedTrimmedAvg, {"trimmed-mean-beta": 0.2}))


def build_aggregation(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    num_sampled_clients: int | None = None,
    root_update_fn: Callable[[ArrayRecord], ArrayRecord] | None = None,
    seed: int | None = None,
    **common: Any,
) -> Strategy:
    """Build the aggregation strategy `name` from run-config values.

    Parameters
    ----------
    name : str
        A registered rule (`AGGREGATIONS.names()`); a wrong one fails listing them.
    params : Mapping[str, Any] or None (default: None)
        Run-config values, e.g. the whole run config: the keys in the rule's `PARAMS`
        override its defaults; other rules' keys and unrelated keys are ignored; an unknown
        key with the rule's prefix (a typo) fails.
    num_sampled_clients : int or None (default: None)
        Clients sampled per round; used (and required) by `weak-dp` for the noise scale.
    root_update_fn : callable or None (default: None)
        ``root_update_fn(global_arrays) -> update``; used (and required) by `fltrust`.
    seed : int or None (default: None)
        Seeds the rules that draw random numbers of their own (`flame`'s noise).
    **common : Any
        Keyword arguments of `FedAvg` given to every rule: `fraction_train`,
        `fraction_evaluate`, `min_train_nodes`, `min_evaluate_nodes`,
        `min_available_nodes`, `weighted_by_key`, ...

    Returns
    -------
    Strategy
        The configured strategy.
    """
    factory = AGGREGATIONS.get(name)
    kwargs = rule_kwargs(name, factory.PARAMS, params or {})
    extras = {
        "num_sampled_clients": num_sampled_clients,
        "root_update_fn": root_update_fn,
        "seed": seed,
    }
    accepted = inspect.signature(factory.factory if isinstance(factory, FlowerRule) else factory)
    kwargs.update({k: v for k, v in extras.items() if k in accepted.parameters})
    strategy: Strategy = factory(**kwargs, **common)
    return strategy


def rule_kwargs(
    name: str, defaults: Mapping[str, ParamValue], params: Mapping[str, Any]
) -> dict[str, ParamValue]:
    """Constructor arguments of rule `name` from its run-config keys and their defaults."""
    prefix = f"{name}-"
    unknown = sorted(k for k in params if k.startswith(prefix) and k not in defaults)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)} for aggregation={name!r}; accepted: "
            f"{', '.join(defaults) or '(none)'}"
        )
    return {
        key[len(prefix) :].replace("-", "_"): _coerce(key, params.get(key, default), default)
        for key, default in defaults.items()
    }


def aggregation_params() -> dict[str, ParamValue]:
    """Every registered rule's run-config keys with their defaults."""
    return {
        key: default
        for name in AGGREGATIONS.names()
        for key, default in AGGREGATIONS.get(name).PARAMS.items()
    }


def _coerce(key: str, value: Any, default: ParamValue) -> ParamValue:
    """`value` as the type of `default` (TOML gives `4` where `4.0` is meant)."""
    kind = type(default)
    if isinstance(value, bool) == (kind is bool):
        if kind is float and isinstance(value, int):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, kind):
            coerced: ParamValue = value
            return coerced
    raise ValueError(f"{key}={value!r}: expected a value of type {kind.__name__}")
