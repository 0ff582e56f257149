"""Where a run's ACC sits: per-class recall and predicted-class share on the real test set.

A backdoor's target class can lose its clean images while the others hold (CIFAR-10 at
CPU scale, stop 34: the target class held 2.2-2.9 points of the 2.5-5.3-point gap to
clean FM-FL after round 5). One row per run: the served model and the
same with its bounds off (the fused model). Diagnosis only: no setting is chosen by it.

    python bench/class_recall.py results/s33-c10-attack-iid-bounds-r5/attack-iid-bounds \
        results/s33-c10-clean-iid-none-r5/clean-iid-none --out bench/results/class_recall.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from served_vs_fused import load_run  # the sibling bench's loader of a finished run

from fmfl_flwr.data import to_float
from fmfl_flwr.defense.bounds import bounds_disabled
from fmfl_flwr.training import predict_logits


def class_scores(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """ACC, recall of each class, and the share of all predictions that go to each class (%)."""
    return {
        "acc": 100 * (predicted == labels).float().mean().item(),
        "recall": [100 * (predicted[labels == c] == c).float().mean().item()
                   for c in range(num_classes)],
        "predicted-share": [100 * (predicted == c).float().mean().item()
                            for c in range(num_classes)],
    }


def measure(run_dir: Path, data_dir: str, checkpoint: str = "") -> dict:
    config, dataset, commit, model = load_run(run_dir, data_dir, checkpoint)
    model.eval()
    images, labels = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    served = predict_logits(model, images).argmax(1)
    with bounds_disabled(model):
        fused = predict_logits(model, images).argmax(1)
    return {"run": str(run_dir), "checkpoint": checkpoint or None, "git_commit": commit,
            "target-label": config.target_label,
            "served": class_scores(served, labels, dataset.num_classes),
            "unbounded": class_scores(fused, labels, dataset.num_classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with model.pt)")
    parser.add_argument("--checkpoint", default="",
                        help="read this checkpoint file in each run folder, not model.pt")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:  # rewritten after every run: a long bench keeps its rows
        rows.append(measure(run_dir, args.data_dir, args.checkpoint))
        served = rows[-1]["served"]
        target = rows[-1]["target-label"]
        print(f"{run_dir.name}: acc {served['acc']:.2f}, target-class recall "
              f"{served['recall'][target]:.1f}, share {served['predicted-share'][target]:.1f}",
              flush=True)
        args.out.write_text(json.dumps({
            "rows": rows, "evaluated-on": "real test set",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        }, indent=1))


if __name__ == "__main__":
    main()
