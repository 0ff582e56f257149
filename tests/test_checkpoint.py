"""Checkpoints on plain objects: round trip, config guard, rule state without callables."""

import random

import pytest
import torch

from fmfl_flwr.checkpoint import (
    load_checkpoint,
    restore_rng_states,
    restore_rule_state,
    restore_step_states,
    rule_state,
    save_checkpoint,
    step_states,
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


def test_server_steps_resume_with_what_they_carry(tmp_path):
    """A defense rebuilt from the config and restored from the checkpoint fits round 2 as
    the uninterrupted one does: warm start, penalty and named target travel with it."""
    from torch import nn

    from fmfl_flwr.defense import BoundSettings, make_defense
    from fmfl_flwr.fusion import Fusion, FusionSettings

    def tiny() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    images = torch.rand(200, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = (images.flatten(1).sum(1) * 3 / 4).long().clamp(max=2)
    teacher = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 5

    def steps():
        defense = make_defense("activation-bounds", tiny, images, labels,
                               BoundSettings(epochs=2, max_samples=100, overrule_gate=0.0),
                               ensemble_source=lambda: teacher)
        fusion = Fusion(tiny, images, labels, FusionSettings(relabel_target=True),
                        target_source=lambda: defense.named_target)
        return {"fusion": fusion, "defense": defense}

    running = steps()
    state = tiny().state_dict()
    first = running["defense"](1, state, [], [])
    assert running["defense"].named_target is not None
    kept = labels == 0  # what unlearning found once for target 0 must survive the restart
    running["fusion"].suspected, running["fusion"].suspected_target = kept, 0
    running["fusion"].last_fused = first  # the model a later split is sought on
    save_checkpoint(tmp_path, 1, first, [], {}, build_aggregation("fedavg"), running)
    resumed = steps()
    restore_step_states(resumed, load_checkpoint(tmp_path, {})["steps"])
    assert resumed["defense"].named_target == running["defense"].named_target
    assert torch.equal(resumed["fusion"].suspected, kept)
    assert resumed["fusion"].suspected_target == 0
    assert all(torch.equal(resumed["fusion"].last_fused[k], first[k]) for k in first)
    expected, got = running["defense"](2, first, [], []), resumed["defense"](2, first, [], [])
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    def fitted(step):  # the history without its timings, nan (a stat with nothing to count) as None
        return [{k: None if v != v else v for k, v in h.items() if "time" not in k}
                for h in step.history]

    assert fitted(resumed["defense"]) == fitted(running["defense"])
    assert resumed["defense"].history[-1]["warm-start"] == 1.0  # a fresh step starts cold
    assert step_states({"defense": None}) == {}


def test_a_run_of_another_node_count_is_refused(tmp_path):
    save_checkpoint(tmp_path, 1, {}, [], {"seed": 1}, build_aggregation("fedavg"), num_nodes=4)
    with pytest.raises(ValueError, match="run of 4 nodes and this one has 3"):
        load_checkpoint(tmp_path, {"seed": 1}, num_nodes=3)
    assert load_checkpoint(tmp_path, {"seed": 1}, num_nodes=4)["num-nodes"] == 4
