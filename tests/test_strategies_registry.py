"""The aggregation registry: names, run-config keys, and Flower's reused strategies."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from strategies import AGGREGATIONS, aggregation_params, build_aggregation
from strategies.flame import Flame
from strategies.fltrust import FLTrust
from strategies.foolsgold import FoolsGold
from strategies.normclip import NormClip
from strategies.rlr import RobustLR

CONTRACT_NAMES = [
    "fedavg",
    "krum",
    "multikrum",
    "bulyan",
    "median",
    "trimmed-mean",
    "normclip",
    "weak-dp",
    "flame",
    "foolsgold",
    "rlr",
    "fltrust",
]


def _root(arrays: ArrayRecord) -> ArrayRecord:
    return arrays


def test_names_are_the_contracts() -> None:
    assert AGGREGATIONS.names() == CONTRACT_NAMES


def test_wrong_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="aggregation='fedsgd'") as err:
        build_aggregation("fedsgd")
    for name in CONTRACT_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("krum", Krum),
        ("multikrum", MultiKrum),
        ("bulyan", Bulyan),
        ("median", FedMedian),
        ("trimmed-mean", FedTrimmedAvg),
        ("weak-dp", DifferentialPrivacyServerSideFixedClipping),
        ("normclip", NormClip),
        ("flame", Flame),
        ("foolsgold", FoolsGold),
        ("rlr", RobustLR),
        ("fltrust", FLTrust),
    ],
)
def test_every_name_builds_its_strategy(name: str, cls: type) -> None:
    strategy = build_aggregation(
        name,
        {},
        num_sampled_clients=4,
        root_update_fn=_root,
        seed=0,
        fraction_train=0.5,
        min_available_nodes=4,
    )
    assert isinstance(strategy, cls)
    inner = getattr(strategy, "strategy", strategy)  # weak-dp wraps a FedAvg
    assert inner.fraction_train == 0.5
    assert inner.min_available_nodes == 4


def test_flower_rules_take_their_run_config_keys() -> None:
    run_config = {
        "aggregation": "krum",
        "lr": 0.05,  # unrelated keys are ignored
        "krum-num-malicious-nodes": 2,
        "multikrum-num-malicious-nodes": 1,
        "multikrum-num-nodes-to-select": 3,
        "trimmed-mean-beta": 0.1,
        "bulyan-num-malicious-nodes": 1,
        "weak-dp-clipping-norm": 2,
        "weak-dp-noise-multiplier": 0.5,
    }
    krum = build_aggregation("krum", run_config)
    multikrum = build_aggregation("multikrum", run_config)
    trimmed = build_aggregation("trimmed-mean", run_config)
    bulyan = build_aggregation("bulyan", run_config)
    weak_dp = build_aggregation("weak-dp", run_config, num_sampled_clients=5)

    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 2
    assert isinstance(multikrum, MultiKrum)
    assert (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (1, 3)
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.beta == 0.1
    assert isinstance(bulyan, Bulyan) and bulyan.num_malicious_nodes == 1
    assert isinstance(weak_dp, DifferentialPrivacyServerSideFixedClipping)
    assert (weak_dp.clipping_norm, weak_dp.noise_multiplier) == (2.0, 0.5)
    assert weak_dp.num_sampled_clients == 5


def test_defaults_apply_without_keys() -> None:
    rlr = build_aggregation("rlr")
    assert isinstance(rlr, RobustLR)
    assert (rlr.threshold, rlr.server_lr) == (4.0, 1.0)


def test_int_given_for_a_float_key_is_accepted() -> None:
    rlr = build_aggregation("rlr", {"rlr-threshold": 2})
    assert isinstance(rlr, RobustLR)
    assert rlr.threshold == 2.0 and isinstance(rlr.threshold, float)


def test_misspelt_key_of_the_rule_fails_listing_its_keys() -> None:
    with pytest.raises(ValueError, match="rlr-treshold.*rlr-threshold, rlr-server-lr"):
        build_aggregation("rlr", {"rlr-treshold": 2.0})


def test_wrong_type_fails_naming_the_key() -> None:
    with pytest.raises(ValueError, match="rlr-threshold='high': expected a value of type float"):
        build_aggregation("rlr", {"rlr-threshold": "high"})
    with pytest.raises(
        ValueError, match="krum-num-malicious-nodes=1.5: expected a value of type int"
    ):
        build_aggregation("krum", {"krum-num-malicious-nodes": 1.5})


def test_aggregation_params_lists_every_rules_keys() -> None:
    params = aggregation_params()
    assert params == {
        "krum-num-malicious-nodes": 0,
        "multikrum-num-malicious-nodes": 0,
        "multikrum-num-nodes-to-select": 1,
        "bulyan-num-malicious-nodes": 0,
        "trimmed-mean-beta": 0.2,
        "normclip-bound": 3.0,
        "weak-dp-clipping-norm": 3.0,
        "weak-dp-noise-multiplier": 0.1,
        "flame-noise-lambda": 0.001,
        "foolsgold-confidence": 1.0,
        "rlr-threshold": 4.0,
        "rlr-server-lr": 1.0,
    }


def test_rules_that_need_context_say_so() -> None:
    with pytest.raises(ValueError, match="num_sampled_clients"):
        build_aggregation("weak-dp")
    with pytest.raises(ValueError, match="root_update_fn"):
        build_aggregation("fltrust")
