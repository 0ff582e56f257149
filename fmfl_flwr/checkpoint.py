"""Per-round checkpoints, so a killed server run resumes with the same final numbers.

A checkpoint holds the global model after the last evaluated round, the rows written so
far, every random-number state the server draws from, the aggregation rule's own state
(FoolsGold's history, say) and what the server steps carry to the next round (the
defense's warm start, say: each step names it in `RESUMED`) and how many nodes took
part. It is replaced atomically after every round. Rule and steps are restored into ones
rebuilt from the same config. A finished run keeps its last one as `FINAL_FILE`, from
which `fmfl extend` continues it for more rounds.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILE = "checkpoint.pt"
FINAL_FILE = "final-checkpoint.pt"


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def rule_state(rule: object) -> bytes:
    """The aggregation rule's attributes that pickle (its history, RNGs, counters).

    What does not pickle (callables such as FLTrust's root-update closure) is rebuilt from
    the config when the run resumes, so it is left out.
    """
    state = {}
    for name, value in vars(rule).items():
        try:
            state[name] = pickle.dumps(value)
        except (pickle.PicklingError, TypeError, AttributeError):
            continue
    return pickle.dumps(state)


def restore_rule_state(rule: object, blob: bytes) -> None:
    for name, value in pickle.loads(blob).items():
        setattr(rule, name, pickle.loads(value))


def step_states(steps: dict[str, object | None]) -> dict[str, dict[str, Any]]:
    """The `RESUMED` attributes of each server step (None: the step is off)."""
    return {name: {attr: getattr(step, attr) for attr in step.RESUMED}
            for name, step in steps.items() if step is not None}


def restore_step_states(steps: dict[str, object | None], states: dict[str, dict[str, Any]]
                        ) -> None:
    for name, attrs in states.items():
        for attr, value in attrs.items():
            setattr(steps[name], attr, value)


def save_checkpoint(run_dir: Path, server_round: int, state: dict[str, torch.Tensor],
                    rows: list[dict[str, Any]], run_config: dict[str, Any],
                    rule: object, steps: dict[str, object | None] | None = None,
                    num_nodes: int = 0) -> None:
    payload = {"round": server_round, "state": state, "rows": rows, "rng": rng_states(),
               "run_config": run_config, "rule": rule_state(rule),
               "steps": step_states(steps or {}), "num-nodes": num_nodes}
    tmp = run_dir / f"{FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / FILE)


def load_checkpoint(run_dir: Path, run_config: dict[str, Any], num_nodes: int = 0
                    ) -> dict[str, Any] | None:
    """The unfinished run's checkpoint in `run_dir`, or None; refuses another config's, and
    another node count's (the partitions would differ)."""
    path = run_dir / FILE
    if not path.exists() or (run_dir / "summary.json").exists():
        return None
    payload = torch.load(path, weights_only=False)
    if payload["run_config"] != run_config:
        changed = sorted(k for k in {*run_config, *payload["run_config"]}
                         if run_config.get(k) != payload["run_config"].get(k))
        raise ValueError(
            f"{run_dir} holds an unfinished run with another configuration (differs in "
            f"{changed}); give this run another run-name, or delete that folder to restart"
        )
    recorded = payload.get("num-nodes", 0)  # older checkpoints: not recorded
    if recorded and num_nodes and recorded != num_nodes:
        raise ValueError(
            f"{run_dir} holds a run of {recorded} nodes and this one has {num_nodes}: the "
            f"partitions would differ; run it with {recorded} supernodes"
        )
    return payload
