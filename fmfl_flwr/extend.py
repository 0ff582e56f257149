"""More rounds for a finished run, without redoing the rounds it has.

A finished run keeps its last checkpoint (`final-checkpoint.pt`): the global model, the
rows, every random stream, the rule's and the server steps' state. Copied into a fresh
run folder with `num-server-rounds` raised, it is an unfinished run there, and the server
resumes it as it would a killed one: the extended run repeats a straight run of that many
rounds (tests/test_resume.py). The finished run's folder is left as it is.

The defense's per-fit knobs (`bounds-*`) may change for the rounds to come, to ask what a
setting would do from there on without rerunning the rounds before it; the new folder's
`extension.json` records which keys changed and after which round, and which keys the run
recorded that this version no longer has (dropped: Flower refuses a run config with keys
the app does not declare, and no code here reads them).

    run_config, num_nodes = prepare_extension(Path("results/quick/fedavg"), 8,
                                              Path("results/quick-r8"))
    run_simulation(run_config, num_supernodes=num_nodes)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fmfl_flwr.app_config import bound_settings, parse_app_config
from fmfl_flwr.checkpoint import FILE, FINAL_FILE
from fmfl_flwr.config import ConfigError, complete_run_config

# Changing the bounds' shape would leave last round's bounds, the warm start, unfit.
FIXED_BOUNDS_KEYS = ("bounds-granularity",)


class ExtensionError(ValueError):
    """A run that cannot be extended as asked; the message says why and what to do."""


def prepare_extension(run_dir: Path, rounds: int, output_dir: Path, num_nodes: int = 0,
                      defaults: dict[str, Any] | None = None,
                      changes: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """Seed `output_dir/<run-name>/` with `run_dir`'s final checkpoint, set to run to
    `rounds`; returns the run config to launch and the node count to launch it with (the
    run's own; `num_nodes` may only repeat it, or name it where it was not recorded).
    `changes` sets `bounds-*` keys for the rounds to come (`changed_settings`).

    The keys a later version added are filled as the run's version ran without them
    (`complete_run_config`, from `defaults`, the app's run config), so that Flower, which
    fills missing keys from the app's defaults, resumes the checkpoint's configuration;
    the keys a later version removed are dropped.
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
    dropped = {k: v for k, v in run_config.items() if defaults and k not in defaults}
    run_config = {k: v for k, v in run_config.items() if k not in dropped}
    lost = sorted(k for k, v in run_config.items() if v is None)
    if lost:
        raise ExtensionError(f"{run_dir} ran before {', '.join(lost)} existed, and no value "
                             "of it repeats what that version did; rerun it instead")
    changed = changed_settings(run_config, changes or {})
    target = output_dir / name
    if target.exists() and any(target.iterdir()):
        raise ExtensionError(f"{target} is not empty; give --out a new folder (results "
                             "already there are never overwritten)")
    target.mkdir(parents=True, exist_ok=True)
    run_config = {**run_config, **(changes or {})}
    torch.save({**payload, "run_config": run_config}, target / FILE)
    if changed or dropped:
        (target / "extension.json").write_text(json.dumps(
            {"extended-from": str(run_dir.resolve()), "after-round": payload["round"],
             "changed": changed, "dropped": dropped}, indent=2) + "\n")
    return run_config, num_nodes or recorded


def changed_settings(run_config: dict[str, Any], changes: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """{key: {"was": old, "now": new}} for `changes`, checked: only the defense's per-fit
    knobs may change, since every other key shaped the rounds already run (the data, the
    model, the partition, the attack, the rule's state), and the values must be valid."""
    refused = sorted(k for k in changes if not k.startswith("bounds-")
                     or k in FIXED_BOUNDS_KEYS or k not in run_config)
    if refused:
        raise ExtensionError(
            f"--set {', '.join(refused)}: an extension may change only the defense's bounds-* "
            f"keys the run has (not {', '.join(FIXED_BOUNDS_KEYS)}); rerun the run to change "
            "anything else")
    if changes:
        try:
            bound_settings(parse_app_config({**run_config, **changes}))
        except (ConfigError, ValueError) as err:
            raise ExtensionError(f"--set: {err}") from err
    return {k: {"was": run_config[k], "now": v} for k, v in changes.items() if v != run_config[k]}
