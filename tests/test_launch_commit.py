"""A simulation records the commit of the app folder it runs, not of where it writes.

Grids run from a git worktree write their results (and Flower's home, where the app copy is
installed) into the main checkout; the commit recorded in config.json must still be the
worktree's. `run_simulation` passes it to the Flower processes as FMFL_GIT_COMMIT.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fmfl_flwr import launch
from fmfl_flwr.results import git_commit


def commit_in(folder: Path, message: str) -> str:
    """A one-commit git repository in `folder`; returns its commit."""
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    (folder / "README.md").write_text(message)
    subprocess.run(git + ["add", "README.md"], check=True)
    subprocess.run(git + ["commit", "-qm", message], check=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_simulation_env_names_the_app_folders_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FMFL_GIT_COMMIT", raising=False)
    app, elsewhere = tmp_path / "app", tmp_path / "results"
    app.mkdir()
    elsewhere.mkdir()
    app_commit = commit_in(app, "app")
    commit_in(elsewhere, "results")
    seen, real_run = {}, subprocess.run

    def fake_run(command, *args, **kwargs):
        """Record `flwr run`'s environment instead of starting Flower; git runs for real."""
        if Path(command[0]).name != "flwr":
            return real_run(command, *args, **kwargs)
        if command[1] == "ls":  # the run's record: completed
            return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"runs": [
                {"run-id": "1", "status": "finished:completed", "status-details": ""}]}))
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.run_simulation({}, app_dir=app, flwr_home=elsewhere / "home") == 0
    assert seen["FMFL_GIT_COMMIT"] == app_commit
    monkeypatch.setenv("FMFL_GIT_COMMIT", app_commit)
    assert git_commit() == app_commit
