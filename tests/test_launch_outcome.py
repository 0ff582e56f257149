"""`flwr run --stream` exits 0 when the ServerApp fails; the launchers must not.

The launchers read the SuperLink's run record and return 1, with Flower's reason in the
log, so `fmfl run`, `fmfl grid` and the tests see a failed run as failed.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from fmfl_flwr import launch
from fmfl_flwr.config import PLAIN_FEDAVG


def fake_ls(monkeypatch: pytest.MonkeyPatch, runs: list[dict], code: int = 0) -> None:
    """`flwr ls --format json` answers with `runs` (after a banner line, as the CLI does)."""
    def fake_run(command, *args, **kwargs):
        assert command[1:] == ["ls", "--format", "json"]
        return subprocess.CompletedProcess(command, code, stdout="banner\n" + json.dumps(
            {"success": True, "runs": runs}), stderr="")
    monkeypatch.setattr(launch.subprocess, "run", fake_run)


def record(run_id: str, status: str, details: str = "N/A") -> dict:
    return {"run-id": run_id, "status": status, "status-details": details}


def test_a_completed_run_keeps_exit_code_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ls(monkeypatch, [record("7", "finished:completed")])
    log = io.StringIO()
    assert launch.checked_exit_code(0, "flwr", {}, log) == 0
    assert log.getvalue() == ""


def test_a_failed_run_gives_one_and_logs_why(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ls(monkeypatch, [record("7", "finished:failed", "Simulation failed: boom")])
    log = io.StringIO()
    assert launch.checked_exit_code(0, "flwr", {}, log) == 1
    assert "run 7 ended finished:failed: Simulation failed: boom" in log.getvalue()


def test_a_failed_run_without_details_still_gives_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ls(monkeypatch, [{"run-id": "7", "status": "finished:stopped"}])
    log = io.StringIO()
    assert launch.checked_exit_code(0, "flwr", {}, log) == 1
    assert "run 7 ended finished:stopped: no reason given" in log.getvalue()


def test_only_the_new_run_counts_on_a_shared_superlink(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ls(monkeypatch, [record("1", "finished:failed"), record("2", "finished:completed")])
    assert launch.checked_exit_code(0, "flwr", {}, io.StringIO(), earlier={"1"}) == 0
    assert launch.checked_exit_code(0, "flwr", {}, io.StringIO(), earlier={"2"}) == 1


def test_no_record_or_no_answer_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ls(monkeypatch, [])
    log = io.StringIO()
    assert launch.checked_exit_code(0, "flwr", {}, log) == 1
    assert "lists no run" in log.getvalue()
    fake_ls(monkeypatch, [], code=1)
    assert launch.checked_exit_code(0, "flwr", {}, log) == 1
    assert "cannot tell how the run ended" in log.getvalue()


def test_a_nonzero_exit_is_kept_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("asked"))
    assert launch.checked_exit_code(2, "flwr", {}, io.StringIO()) == 2


@pytest.mark.slow
def test_a_simulation_whose_server_app_fails_returns_one(tmp_path: Path) -> None:
    config = {"num-server-rounds": 1, **PLAIN_FEDAVG, "output-dir": str(tmp_path / "out"),
              "data-dir": str(tmp_path / "no-data"), "run-name": "fails"}
    env = {"FMFL_CACHE_DIR": str(tmp_path / "cache")}  # no decoded arrays to fall back on
    code = launch.run_simulation(config, num_supernodes=2, log_path=tmp_path / "log", env=env)
    log = (tmp_path / "log").read_text()
    assert code == 1, log[-3000:]
    assert "ended finished:failed" in log and "not found" in log
