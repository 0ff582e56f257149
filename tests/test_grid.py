"""`fmfl grid`: expansion, names, validation, resume and failures, with a fake runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fmfl_flwr.cli import main
from fmfl_flwr.config import ConfigError
from fmfl_flwr.grid import expand, load_grid, run_grid

THREATS = [{"label": "clean"},
           {"label": "badnets", "client-attack": "badnets", "malicious-fraction": 0.2}]
GRID_TOML = """
num-supernodes = 4
[base]
num-server-rounds = 2
[grid]
threat = [{ label = "clean" }, { label = "badnets", client-attack = "badnets" }]
aggregation = ["fedavg", "median"]
seed = [0, 1]
"""


class FakeRunner:
    """Stands in for `flwr run`: writes a run's result files, or fails for chosen cells."""

    def __init__(self, fail: tuple[str, ...] = (), finish: bool = True,
                 rejected: int = 0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail
        self.finish = finish
        self.rejected = rejected

    def __call__(self, run_config: dict[str, Any], num_supernodes: int, flwr_home: Path,
                 log_path: Path) -> int:
        name = run_config["run-name"]
        self.calls.append((name, num_supernodes))
        log_path.write_text(f"running {name}\n")
        if name in self.fail:
            return 1
        run_dir = Path(run_config["output-dir"]) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"run_config": run_config}))
        (run_dir / "metrics.csv").write_text("round,acc,asr\n0,0.1,0.0\n1,0.8,0.5\n")
        if self.finish:
            (run_dir / "summary.json").write_text(json.dumps(
                {"acc": 0.8, "asr": 0.5, "rounds": 1, "rejected_replies": self.rejected}))
        return 0


def _status(out: Path) -> dict[str, dict[str, str]]:
    with (out / "grid-status.csv").open() as handle:
        return {row["cell"]: row for row in csv.DictReader(handle)}


def test_cross_product_in_file_order_with_names_and_settings():
    cells = expand({"num-server-rounds": 2}, {"threat": THREATS,
                                              "aggregation": ["fedavg", "median", "krum"],
                                              "seed": [0, 1]})
    assert len(cells) == 2 * 3 * 2
    assert [c.name for c in cells[:3]] == ["clean-fedavg-seed0", "clean-fedavg-seed1",
                                           "clean-median-seed0"]
    badnets = next(c for c in cells if c.name == "badnets-krum-seed1")
    assert badnets.run_config == {"num-server-rounds": 2, "client-attack": "badnets",
                                  "malicious-fraction": 0.2, "aggregation": "krum", "seed": 1}
    assert badnets.labels == {"threat": "badnets", "aggregation": "krum", "seed": "seed1"}
    assert badnets.num_supernodes == 10
    assert len({c.name for c in cells}) == len(cells)


def test_unlabelled_tables_and_numbers_name_themselves():
    cells = expand({}, {"setup": [{"partition": "dirichlet", "dirichlet-alpha": 0.1,
                                   "num-supernodes": 100}], "lr": [0.01]})
    assert cells[0].name == "dirichlet_dirichlet-alpha0.1_num-supernodes100-lr0.01"
    assert cells[0].num_supernodes == 100 and "num-supernodes" not in cells[0].run_config


def test_clashing_names_and_misplaced_keys_are_refused():
    with pytest.raises(ConfigError, match="share the names"):
        expand({}, {"threat": [{"client-attack": "badnets", "label": "x"},
                               {"client-attack": "dba", "label": "x"}]})
    with pytest.raises(ConfigError, match="run-name"):
        expand({"run-name": "a"}, {"seed": [0]})
    with pytest.raises(ConfigError, match="non-empty list"):
        expand({}, {"seed": 0})


def test_load_grid_reads_top_level_clients(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML)
    spec = load_grid(path)
    assert len(spec.cells) == 8 and {c.num_supernodes for c in spec.cells} == {4}
    path.write_text("rounds = 3\n" + GRID_TOML)
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_grid(path)


def test_a_bad_cell_stops_the_grid_before_any_run(tmp_path):
    cells = expand({}, {"aggregation": ["fedavg", "fedmedian"]})
    runner = FakeRunner()
    with pytest.raises(ConfigError, match="cell fedmedian: aggregation='fedmedian'"):
        run_grid(cells, tmp_path, runner, echo=lambda _: None)
    cells = expand({}, {"defense": ["none", "activation-bound"]})
    with pytest.raises(ConfigError, match="cell activation-bound: defense='activation-bound'"):
        run_grid(cells, tmp_path, runner, echo=lambda _: None)
    cells = expand({}, {"seed": [0], "threat": [{"client-atack": "badnets", "label": "x"}]})
    with pytest.raises(ConfigError, match="client-atack"):
        run_grid(cells, tmp_path, runner, echo=lambda _: None)
    assert runner.calls == []


def test_second_call_skips_finished_cells(tmp_path):
    cells = expand({"num-server-rounds": 1}, {"aggregation": ["fedavg", "median"],
                                              "seed": [0, 1]})
    runner = FakeRunner()
    messages: list[str] = []
    statuses = run_grid(cells, tmp_path, runner, echo=messages.append)
    assert statuses == {c.name: "done" for c in cells} and len(runner.calls) == 4
    assert any("[2/4] fedavg-seed1: running" in m and "ETA 0:00:00" in m for m in messages)
    cell_json = json.loads((tmp_path / "median-seed0" / "cell.json").read_text())
    assert cell_json["num-supernodes"] == 10 and cell_json["labels"]["aggregation"] == "median"
    again = FakeRunner()
    assert run_grid(cells, tmp_path, again, echo=lambda _: None) == statuses
    assert again.calls == []


def test_a_cell_whose_server_rejected_replies_says_so(tmp_path):
    cells = expand({"num-server-rounds": 1}, {"seed": [0]})
    messages: list[str] = []
    assert run_grid(cells, tmp_path, FakeRunner(rejected=9), echo=messages.append) == \
        {"seed0": "done"}
    assert any(m.endswith("(ACC 80.00%, ASR 50.00%; WARNING: 9 client replies rejected)")
               for m in messages), messages
    clean: list[str] = []
    run_grid(cells, tmp_path / "clean", FakeRunner(), echo=clean.append)
    assert any(m.endswith("(ACC 80.00%, ASR 50.00%)") for m in clean), clean


def test_a_half_written_cell_is_run_again(tmp_path):
    cells = expand({}, {"seed": [0, 1]})
    messages: list[str] = []
    run_grid(cells[:1], tmp_path, FakeRunner(finish=False), echo=messages.append)
    assert (tmp_path / "seed0" / "metrics.csv").exists()
    assert any("seed0: FAILED (flwr run exited 0 but the run wrote no summary.json" in m
               for m in messages), messages
    runner = FakeRunner()
    run_grid(cells, tmp_path, runner, echo=lambda _: None)
    assert [name for name, _ in runner.calls] == ["seed0", "seed1"]


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    cells = expand({}, {"aggregation": ["fedavg", "median", "krum"]})
    messages: list[str] = []
    statuses = run_grid(cells, tmp_path, FakeRunner(fail=("median",)), echo=messages.append)
    assert statuses == {"fedavg": "done", "median": "failed", "krum": "done"}
    status = _status(tmp_path)
    assert status["median"]["status"] == "failed" and status["median"]["exit_code"] == "1"
    assert Path(status["median"]["log"]).read_text() == "running median\n"
    assert any("median: FAILED (exit 1)" in m for m in messages)
    retry = FakeRunner()
    assert run_grid(cells, tmp_path, retry, echo=lambda _: None)["median"] == "done"
    assert retry.calls == [("median", 10)]
    assert _status(tmp_path)["median"]["status"] == "done"


def test_a_finished_cell_with_other_settings_is_refused(tmp_path):
    run_grid(expand({"lr": 0.05}, {"seed": [0]}), tmp_path, FakeRunner(), echo=lambda _: None)
    runner = FakeRunner()
    with pytest.raises(ConfigError, match="lr=0.05, the grid now says lr=0.01"):
        run_grid(expand({"lr": 0.01}, {"seed": [0]}), tmp_path, runner, echo=lambda _: None)
    assert runner.calls == []


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML)
    assert main(["grid", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and lines[0].startswith("[1/8] clean-fedavg-seed0 (to run, 4 ")
    assert not (tmp_path / "out").exists()


def test_only_and_set_select_cells_and_override_every_cell(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML)
    args = ["grid", str(path), "--out", str(tmp_path), "--dry-run"]
    assert main([*args, "--only", "badnets-*-seed1", "--set", "num-server-rounds=1",
                 "--set", "lr=0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["badnets-fedavg-seed1", "badnets-median-seed1"]
    assert all("num-server-rounds=1" in line and "lr=0.01" in line for line in lines)
    assert main([*args, "--only", "nothing*"]) == 2
    assert "no cell matches" in capsys.readouterr().err


def test_a_hung_cell_is_stopped_after_the_timeout(tmp_path):
    import subprocess
    import sys
    import time

    from fmfl_flwr.grid import flower_runner

    home = tmp_path / "home"
    started = time.time()
    with pytest.MonkeyPatch.context() as patch:  # a "flwr run" that never ends
        patch.setattr("fmfl_flwr.grid.run_simulation", lambda *a, flwr_home, **k: subprocess.run(
            [sys.executable, "-c", "import time; time.sleep(60)", str(flwr_home)]).returncode)
        code = flower_runner({}, 3, home, tmp_path / "log", timeout_s=1.0)
    assert code == 124 and time.time() - started < 30
    assert "cell timeout of 1 s" in (tmp_path / "log").read_text()
    assert not home.exists()


def test_experiment_files_expand_and_validate():
    from fmfl_flwr.grid import validate

    folder = Path(__file__).resolve().parents[1] / "experiments"
    for path in sorted(folder.glob("*.toml")):
        spec = load_grid(path)
        validate(spec.cells)
        assert spec.cells, path


@pytest.mark.slow
def test_a_tiny_grid_runs_in_flower_then_skips_on_the_second_call(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text('num-supernodes = 3\n[base]\nnum-server-rounds = 1\nmodel-width = 16\n'
                    'batch-size = 64\nfraction-evaluate = 0.0\nfusion = false\n'
                    'fm-attack = "none"\ndefense = "none"\n'
                    '[grid]\naggregation = ["fedavg", "median"]\n')
    out = tmp_path / "out"
    assert main(["grid", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[2/2] median: done in" in printed and "| fedavg |" in printed
    assert {row["status"] for row in _status(out).values()} == {"done"}
    for name in ("fedavg", "median"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["acc"] > 0.5
    assert not (out / ".flwr" / "fedavg").exists()
    assert main(["grid", str(path), "--out", str(out)]) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "final-asr.png").is_file()


def test_a_set_string_without_quotes_names_its_option_and_the_quotes():
    from fmfl_flwr.grid import parse_set

    assert parse_set(["seed=2", "partition='dirichlet'"]) == {"seed": 2,
                                                               "partition": "dirichlet"}
    with pytest.raises(ConfigError, match=r"--set 'partition=dirichlet'.*partition='\.\.\.'"):
        parse_set(["seed=2", "partition=dirichlet"])
    with pytest.raises(ConfigError, match="--set seed is given twice"):
        parse_set(["seed=2", "seed=3"])
