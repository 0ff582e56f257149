"""Checkpoints on plain objects: round trip, config guard, rule state without callables."""

import random

import pytest
import torch

from fmfl_flwr.checkpoint import (
    load_checkpoint,
    restore_rng_states,
    restore_rule_state,
    rule_state,
    save_checkpoint,
)
from strategies import build_aggregation


def test_round_trip_restores_state_rows_and_random_streams(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, [{"round": 0}], {"seed": 1},
                    build_aggregation("fedavg"))
    expected = (random.random(), torch.rand(1))
    payload = load_checkpoint(tmp_path, {"seed": 1})
    assert payload["round"] == 2 and payload["rows"] == [{"round": 0}]
    restore_rng_states(payload["rng"])
    assert (random.random(), torch.rand(1)) == expected


def test_another_config_is_refused_and_finished_runs_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, {}, [], {"seed": 1, "lr": 0.1}, build_aggregation("fedavg"))
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        load_checkpoint(tmp_path, {"seed": 1, "lr": 0.2})
    (tmp_path / "summary.json").write_text("{}")
    assert load_checkpoint(tmp_path, {"seed": 1, "lr": 0.2}) is None


def test_rule_state_keeps_history_and_skips_closures():
    def root_update(arrays):  # a closure, as the ServerApp builds for FLTrust
        return arrays

    rule = build_aggregation("fltrust", root_update_fn=root_update)
    rule.history_marker = [1, 2, 3]
    fresh = build_aggregation("fltrust", root_update_fn=root_update)
    restore_rule_state(fresh, rule_state(rule))
    assert fresh.history_marker == [1, 2, 3] and fresh.root_update_fn is root_update
