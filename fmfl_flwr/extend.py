"""More rounds for a finished run, without redoing the rounds it has.

A finished run keeps its last checkpoint (`final-checkpoint.pt`): the global model, the
rows, every random stream, the rule's and the server steps' state. Copied into a fresh
run folder with `num-server-rounds` raised, it is an unfinished run there, and the server
resumes it as it would a killed one: the extended run repeats a straight run of that many
rounds (tests/test_resume.py). The finished run's folder is left as it is.

    run_config, num_nodes = prepare_extension(Path("results/quick/fedavg"), 8,
                                              Path("results/quick-r8"))
    run_simulation(run_config, num_supernodes=num_nodes)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmfl_flwr.checkpoint import FILE, FINAL_FILE
from fmfl_flwr.config import complete_run_config


class ExtensionError(ValueError):
    """A run that cannot be extended as asked; the message says why and what to do."""


def prepare_extension(run_dir: Path, rounds: int, output_dir: Path, num_nodes: int = 0,
                      defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """Seed `output_dir/<run-name>/` with `run_dir`'s final checkpoint, set to run to
    `rounds`; returns the run config to launch and the node count to launch it with (the
    run's own; `num_nodes` may only repeat it, or name it where it was not recorded).

    The keys a later version added are filled as the run's version ran without them
    (`complete_run_config`, from `defaults`, the app's run config), so that Flower, which
    fills missing keys from the app's defaults, resumes the checkpoint's configuration.
    """
    source = run_dir / FINAL_FILE
    if not source.exists():
        raise ExtensionError(
            f"{run_dir} has no {FINAL_FILE}: only runs that finished with this version "
            "keep one (an unfinished run resumes by running it again with its config)"
        )
    payload = torch.load(source, weights_only=False)
    if rounds <= payload["round"]:
        raise ExtensionError(f"--rounds {rounds}: {run_dir} already ran {payload['round']} "
                             f"rounds; ask for more")
    recorded = int(payload.get("num-nodes", 0))
    if not (num_nodes or recorded):
        raise ExtensionError(f"{run_dir}'s checkpoint does not record how many nodes ran it; "
                             "give --num-supernodes")
    if recorded and num_nodes and num_nodes != recorded:
        raise ExtensionError(f"--num-supernodes {num_nodes}: {run_dir} ran on {recorded} "
                             "nodes, and other partitions would make another run")
    name = run_dir.resolve().name  # the run's folder is <output-dir>/<run name>
    run_config = {**complete_run_config(payload["run_config"], defaults or {}),
                  "num-server-rounds": rounds, "output-dir": str(output_dir.resolve()),
                  "run-name": name}
    lost = sorted(k for k, v in run_config.items() if v is None)
    if lost:
        raise ExtensionError(f"{run_dir} ran before {', '.join(lost)} existed, and no value "
                             "of it repeats what that version did; rerun it instead")
    target = output_dir / name
    if target.exists() and any(target.iterdir()):
        raise ExtensionError(f"{target} is not empty; give --out a new folder (results "
                             "already there are never overwritten)")
    target.mkdir(parents=True, exist_ok=True)
    torch.save({**payload, "run_config": run_config}, target / FILE)
    return run_config, num_nodes or recorded
