"""A killed server run resumes from its last checkpoint with the same final numbers, and a
finished one runs on to more rounds (`fmfl extend`) with a straight run's numbers."""

import csv
import subprocess
import sys
import time

import pytest

from fmfl_flwr.cli import main as fmfl_main
from fmfl_flwr.config import PLAIN_FEDAVG
from fmfl_flwr.launch import run_simulation, stop_processes_under

pytestmark = pytest.mark.slow

CONFIG = {"num-server-rounds": 3, "batch-size": 64, "fraction-evaluate": 0.0, "data-fraction": 0.2,
          **PLAIN_FEDAVG, "run-name": "resume"}


def _rows(path):
    with path.open() as handle:
        return [{k: r[k] for k in ("round", "acc", "asr")} for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    """The rows of a straight 3-round run."""
    out = tmp_path_factory.mktemp("reference")
    reference = {**CONFIG, "output-dir": str(out)}
    assert run_simulation(reference, num_supernodes=3, log_path=out / "ref.log") == 0
    return _rows(out / "resume" / "metrics.csv")


def test_killed_run_resumes_to_the_same_numbers(tmp_path, reference_rows):
    config = {**CONFIG, "output-dir": str(tmp_path / "killed")}
    home = tmp_path / "flwr-home-killed"
    script = ("import sys, json; from fmfl_flwr.launch import run_simulation; "
              "from pathlib import Path; "
              "run_simulation(json.loads(sys.argv[1]), num_supernodes=3, "
              "flwr_home=Path(sys.argv[2]), log_path=Path(sys.argv[3]))")
    import json

    runner = subprocess.Popen([sys.executable, "-c", script, json.dumps(config), str(home),
                               str(tmp_path / "killed.log")])
    metrics = tmp_path / "killed" / "resume" / "metrics.csv"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if metrics.exists() and len(_rows(metrics)) >= 2:  # rounds 0 and 1 are done
            break
        time.sleep(0.5)
    else:
        pytest.fail("the run never finished round 1")
    runner.kill()
    stop_processes_under(str(home))
    runner.wait(timeout=30)
    rows_at_kill = _rows(metrics)
    assert 2 <= len(rows_at_kill) < 4 and not (metrics.parent / "summary.json").exists()

    assert run_simulation(config, num_supernodes=3, log_path=tmp_path / "resumed.log") == 0
    assert "resuming after round" in (tmp_path / "resumed.log").read_text()
    resumed = _rows(metrics)
    assert resumed[: len(rows_at_kill)] == rows_at_kill  # what was written is kept
    assert resumed == reference_rows


def test_finished_run_extends_to_a_straight_runs_numbers(tmp_path, reference_rows):
    short = {**CONFIG, "num-server-rounds": 2, "output-dir": str(tmp_path / "short")}
    assert run_simulation(short, num_supernodes=3, log_path=tmp_path / "short.log") == 0
    finished = tmp_path / "short" / "resume"
    assert (finished / "final-checkpoint.pt").exists()
    assert not (finished / "checkpoint.pt").exists()  # an unfinished run's file only
    assert fmfl_main(["extend", str(finished), "--rounds", "3",
                      "--out", str(tmp_path / "long")]) == 0
    assert _rows(tmp_path / "long" / "resume" / "metrics.csv") == reference_rows
    assert _rows(finished / "metrics.csv") == reference_rows[:3]  # the short run is kept
