"""The result files of one run (CONTRACT.md): metrics.csv, config.json, summary.json, model.

Rows are appended and flushed as rounds finish, so a killed run keeps what it measured.
An earlier finished run in the same folder is moved aside, never overwritten.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fmfl_flwr import __version__


def resolve_output_dir(output_dir: str) -> Path:
    """Empty means `$FMFL_OUTPUT_DIR`, then `./results`; always made absolute."""
    base = output_dir or os.environ.get("FMFL_OUTPUT_DIR") or "results"
    return Path(base).expanduser().resolve()


def git_commit(app_dir: Path | None = None) -> str:
    """The commit of the code that runs (of `app_dir` when given), where git can tell.

    `FMFL_GIT_COMMIT` wins: launchers set it to the app folder's commit, because a
    simulated app runs from a copy installed under the Flower home, which may sit inside
    another checkout (a grid run from a git worktree writing into the main one's results).
    """
    if os.environ.get("FMFL_GIT_COMMIT"):
        return os.environ["FMFL_GIT_COMMIT"]
    folders = [app_dir] if app_dir else [Path(__file__).resolve().parent, Path.cwd()]
    for folder in folders:
        try:
            out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=5, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class RunRecorder:
    """Writes one run's files under `<output-dir>/<run-name>/` as the run goes."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any],
                 rows: list[dict[str, Any]] | None = None) -> None:
        """`rows`: those of the run being resumed, kept as they were."""
        self.run_dir = run_dir
        self._archive_finished_run()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.csv"
        self._rows: list[dict[str, Any]] = list(rows or [])
        self.started = time.time()
        write_json(run_dir / "config.json", {
            "run_config": run_config,
            "version": __version__,
            "git_commit": git_commit(),
            "torch": torch.__version__,
        })

    def _archive_finished_run(self) -> None:
        if (self.run_dir / "summary.json").exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.run_dir.rename(self.run_dir.with_name(f"{self.run_dir.name}.{stamp}"))

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one round's row and rewrite the CSV (columns may grow over rounds)."""
        self._rows.append(row)
        columns: list[str] = []
        for r in self._rows:
            columns += [c for c in r if c not in columns]
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.metrics_path)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def finish(self, model_state: dict[str, torch.Tensor], summary: dict[str, Any]) -> Path:
        torch.save(model_state, self.run_dir / "model.pt")
        summary = {"wall_time_s": round(time.time() - self.started, 3), **summary}
        write_json(self.run_dir / "summary.json", summary)
        return self.run_dir
