"""How much poison the split a run's fusion keeps holds, read from the run's checkpoint.

`distill-unlearn-poison` finds the named target's suspected poison once and keeps it in
the checkpoint (`Fusion.suspected`); the checkpoint is replaced every round and removed
when the run finishes, so read it while the run is going (or from a copy). The poisoned
samples are those that differ from the clean D_syn of the same seed; D_syn only, no test
data. Diagnosis: nothing here picks a setting.

    python bench/kept_split.py results/s29-c10-attack-iid-bounds/attack-iid-bounds \
        --out bench/results/kept_split_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from served_vs_fused import recorded_config  # the sibling benches' run readers
from split_census import census, poisoned_dsyn

from fmfl_flwr.checkpoint import FILE


def measure(run_dir: Path, checkpoint: Path) -> dict:
    config, commit = recorded_config(run_dir, "")
    _, poisoned = poisoned_dsyn(config)
    payload = torch.load(checkpoint, weights_only=False)
    fusion = payload["steps"].get("fusion", {})
    kept = fusion.get("suspected")
    row = {"run": str(run_dir), "commit": commit, "checkpoint-round": payload["round"],
           "poisoned-share": poisoned.float().mean().item(), "kept": kept is not None}
    if kept is not None:
        row.update({"target": fusion["suspected_target"], **census(kept, poisoned)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders (config.json and a checkpoint)")
    parser.add_argument("--checkpoint", default=FILE,
                        help="the checkpoint's file name in each run folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(run, run / args.checkpoint) for run in args.runs]
    for row in rows:
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
