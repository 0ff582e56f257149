"""A killed server run resumes from its last checkpoint with the same final numbers."""

import csv
import subprocess
import sys
import time

import pytest

from fmfl_flwr.config import PLAIN_FEDAVG
from fmfl_flwr.launch import run_simulation, stop_processes_under

pytestmark = pytest.mark.slow

CONFIG = {"num-server-rounds": 3, "batch-size": 64, "fraction-evaluate": 0.0, "data-fraction": 0.2,
          **PLAIN_FEDAVG, "run-name": "resume"}


def _rows(path):
    with path.open() as handle:
        return [{k: r[k] for k in ("round", "acc", "asr")} for r in csv.DictReader(handle)]


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    reference = {**CONFIG, "output-dir": str(tmp_path / "reference")}
    assert run_simulation(reference, num_supernodes=3, log_path=tmp_path / "ref.log") == 0

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
    assert resumed == _rows(tmp_path / "reference" / "resume" / "metrics.csv")
