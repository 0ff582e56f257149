"""Test-time detection of triggered inputs (MMDF-style) on finished runs' served models.

For each run directory: the detector's threshold is fitted on the run's own D_syn (the
defender's data, poisoned under the FM attack; `TriggerDetector.fit` leaves its largest
20% of margin drops out), then the detection rate is measured on the triggered non-target
test images and the false-positive rate on the clean test images. D_syn's flagged share
is split by whether the sample is poisoned (it differs from the clean D_syn of the seed).

    python bench/detection.py results/defense/attack-iid-bounds-seed0 ... \
        --out bench/results/detection.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch
from served_vs_fused import load_run  # the sibling bench's loader of a finished run

from fmfl_flwr import attacks
from fmfl_flwr.data import to_float
from fmfl_flwr.defense import TriggerDetector, margin_drop
from server_app import synthetic_data


def measure(run_dir: Path, data_dir: str, trim: float) -> dict:
    config, dataset, commit, model = load_run(run_dir, data_dir)
    model.eval()
    syn_x, _ = synthetic_data(config)
    syn_drops = margin_drop(model, syn_x)  # fits the threshold, then D_syn's census
    detector = TriggerDetector.from_drops(syn_drops, trim=trim)
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    triggered = trigger.stamp(test_x[test_y != config.target_label])
    row = {"run": str(run_dir), "git_commit": commit, "threshold": detector.threshold,
           "detection-rate": detector.flags(model, triggered).float().mean().item(),
           "false-positive-rate": detector.flags(model, test_x).float().mean().item()}
    if config.fm_attack != "none":
        clean_x, _ = synthetic_data(replace(config, fm_attack="none"))
        poisoned = (syn_x != clean_x).flatten(1).any(1)
        flagged = syn_drops > detector.threshold
        row["syn-poisoned-flagged"] = flagged[poisoned].float().mean().item()
        row["syn-clean-flagged"] = flagged[~poisoned].float().mean().item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with model.pt)")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--trim", type=float, default=0.2,
                        help="share of D_syn's largest drops left out of mu and sigma")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        rows.append(measure(run_dir, args.data_dir, args.trim))
        print(run_dir.name, {k: round(v, 4) for k, v in rows[-1].items()
                             if isinstance(v, float)}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows, "trim": args.trim, "z": 2.576, "evaluated-on": "real test set",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }, indent=1))


if __name__ == "__main__":
    main()
