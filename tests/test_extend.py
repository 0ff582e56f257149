"""A finished run's final checkpoint seeds a longer run in a new folder, or a clear error."""

import json

import pytest
import torch

from fmfl_flwr.checkpoint import FINAL_FILE, load_checkpoint, save_checkpoint
from fmfl_flwr.cli import app_defaults
from fmfl_flwr.extend import ExtensionError, prepare_extension
from strategies.registry import build_aggregation

RUN_CONFIG = {"seed": 1, "num-server-rounds": 3, "output-dir": "/old", "run-name": ""}


def finished_run(tmp_path, run_config):
    """A run folder as a finished 3-round run on 4 nodes leaves it."""
    run_dir = tmp_path / "old" / "fedavg-seed1"
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir, 3, {"w": torch.ones(2)}, [{"round": r} for r in range(4)],
                    run_config, build_aggregation("fedavg"), num_nodes=4)
    (run_dir / "checkpoint.pt").replace(run_dir / FINAL_FILE)
    (run_dir / "summary.json").write_text("{}")
    return run_dir


@pytest.fixture
def finished(tmp_path):
    return finished_run(tmp_path, RUN_CONFIG)


@pytest.fixture
def finished_now(tmp_path):
    """A finished run of this version: every key of the app's run config recorded."""
    return finished_run(tmp_path, {**app_defaults(), **RUN_CONFIG})


def test_the_new_folder_resumes_after_the_last_round_with_more_rounds(finished, tmp_path):
    out = tmp_path / "new"
    run_config, nodes = prepare_extension(finished, 5, out)
    assert nodes == 4
    assert run_config == {**RUN_CONFIG, "num-server-rounds": 5, "output-dir": str(out.resolve()),
                          "run-name": "fedavg-seed1"}
    payload = load_checkpoint(out / "fedavg-seed1", run_config, num_nodes=4)
    assert payload["round"] == 3 and len(payload["rows"]) == 4
    assert torch.equal(payload["state"]["w"], torch.ones(2))
    assert sorted(p.name for p in finished.iterdir()) == [FINAL_FILE, "summary.json"]


@pytest.mark.parametrize(("rounds", "nodes", "message"), [
    (3, 0, "already ran 3 rounds"),
    (5, 10, "ran on 4 nodes"),
])
def test_too_few_rounds_or_another_node_count_are_refused(finished, tmp_path, rounds, nodes,
                                                          message):
    with pytest.raises(ExtensionError, match=message):
        prepare_extension(finished, rounds, tmp_path / "new", nodes)
    assert not (tmp_path / "new").exists()  # nothing written before the checks pass


def test_a_run_without_a_final_checkpoint_or_a_used_folder_is_refused(finished, tmp_path):
    with pytest.raises(ExtensionError, match=f"has no {FINAL_FILE}"):
        prepare_extension(tmp_path, 5, tmp_path / "new")
    used = tmp_path / "new" / "fedavg-seed1"
    used.mkdir(parents=True)
    (used / "metrics.csv").write_text("round\n")
    with pytest.raises(ExtensionError, match="not empty"):
        prepare_extension(finished, 5, tmp_path / "new")
    assert (used / "metrics.csv").read_text() == "round\n"


def test_keys_a_later_version_added_take_their_defaults(finished, tmp_path):
    run_config, _ = prepare_extension(finished, 5, tmp_path / "new",
                                      defaults={"seed": 0, "new-knob": False})
    assert run_config["seed"] == 1 and run_config["new-knob"] is False
    assert load_checkpoint(tmp_path / "new" / "fedavg-seed1", run_config)["round"] == 3


def test_a_run_from_before_a_key_no_value_repeats_is_not_extended(finished, tmp_path):
    with pytest.raises(ExtensionError, match="ran before bounds-trim existed"):
        prepare_extension(finished, 5, tmp_path / "new", defaults={"bounds-trim": 0.2})
    assert not (tmp_path / "new").exists()


def test_keys_a_later_version_removed_are_dropped_and_recorded(tmp_path):
    """Flower refuses a run config with a key the app no longer declares ("Invalid run
    configuration"), so the extension drops it and says so in extension.json."""
    old = finished_run(tmp_path, {**app_defaults(), **RUN_CONFIG, "bounds-gone-knob": 0.5})
    run_config, _ = prepare_extension(old, 5, tmp_path / "new", defaults=app_defaults())
    assert "bounds-gone-knob" not in run_config and set(run_config) == set(app_defaults())
    run_dir = tmp_path / "new" / "fedavg-seed1"
    assert load_checkpoint(run_dir, run_config)["run_config"] == run_config
    record = json.loads((run_dir / "extension.json").read_text())
    assert record["dropped"] == {"bounds-gone-knob": 0.5} and record["changed"] == {}


def test_a_checkpoint_without_a_node_count_needs_one(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    save_checkpoint(run_dir, 1, {}, [], RUN_CONFIG, build_aggregation("fedavg"))
    (run_dir / "checkpoint.pt").replace(run_dir / FINAL_FILE)
    with pytest.raises(ExtensionError, match="give --num-supernodes"):
        prepare_extension(run_dir, 2, tmp_path / "new")
    assert prepare_extension(run_dir, 2, tmp_path / "new", 3)[1] == 3


def test_a_defense_key_changes_for_the_rounds_to_come_and_the_change_is_recorded(finished_now,
                                                                               tmp_path):
    defaults = app_defaults()
    run_config, _ = prepare_extension(finished_now, 5, tmp_path / "new", defaults=defaults,
                                      changes={"bounds-overrule-confidence-min": 0.9})
    assert run_config["bounds-overrule-confidence-min"] == 0.9
    run_dir = tmp_path / "new" / "fedavg-seed1"
    assert load_checkpoint(run_dir, run_config)["run_config"] == run_config
    record = json.loads((run_dir / "extension.json").read_text())
    assert record["after-round"] == 3
    assert record["changed"] == {"bounds-overrule-confidence-min": {
        "was": defaults["bounds-overrule-confidence-min"], "now": 0.9}}


@pytest.mark.parametrize(("changes", "message"), [
    ({"seed": 2}, "--set seed: an extension may change only"),
    ({"bounds-granularity": "unit"}, "--set bounds-granularity"),
    ({"bounds-no-such-knob": 1}, "--set bounds-no-such-knob"),
    ({"bounds-overrule-confidence-min": 1.5}, "confidence"),
])
def test_other_keys_and_bad_values_are_refused_before_anything_is_written(finished_now,
                                                                          tmp_path, changes,
                                                                          message):
    with pytest.raises(ExtensionError, match=message):
        prepare_extension(finished_now, 5, tmp_path / "new", defaults=app_defaults(),
                          changes=changes)
    assert not (tmp_path / "new").exists()


def test_a_set_option_that_is_not_toml_is_refused_before_anything_is_written(finished, tmp_path,
                                                                             capsys):
    from fmfl_flwr.cli import main

    out = tmp_path / "new"
    assert main(["extend", str(finished), "--rounds", "5", "--out", str(out),
                 "--set", "bounds-overrule-gate-rounds="]) == 2
    assert "expected key=value in TOML" in capsys.readouterr().err
    assert not out.exists()
