"""Where a run's ACC sits: per-class recall and predicted-class share on the real test set.

A single class can hold most of a gap between two runs (CIFAR-10 at CPU scale, stop 34:
the FM attack's target class held 2.2-2.9 points of the 2.5-5.3-point gap to clean FM-FL
after round 5, though clean FM-FL's own recall of that class swung from 14% to 54% over
rounds 1-5). One row per run: the served model and the
same with its bounds off (the fused model). Diagnosis only: no setting is chosen by it.

    python bench/class_recall.py results/s33-c10-attack-iid-bounds-r5/attack-iid-bounds \
        results/s33-c10-clean-iid-none-r5/clean-iid-none --out bench/results/class_recall.json
"""

from __future__ import annotations

from pathlib import Path

import torch
from served_vs_fused import load_run, run_over_runs  # the sibling bench's loader and CLI

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


def served_and_unbounded(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         num_classes: int) -> dict:
    """`class_scores` of the served model and of the same with its bounds off (the fused
    model), keys "served" and "unbounded"."""
    model.eval()
    served = predict_logits(model, images).argmax(1)
    with bounds_disabled(model):
        fused = predict_logits(model, images).argmax(1)
    return {"served": class_scores(served, labels, num_classes),
            "unbounded": class_scores(fused, labels, num_classes)}


def measure(run_dir: Path, data_dir: str, checkpoint: str = "") -> dict:
    config, dataset, commit, model = load_run(run_dir, data_dir, checkpoint)
    images, labels = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    return {"run": str(run_dir), "checkpoint": checkpoint or None, "git_commit": commit,
            "target-label": config.target_label,
            **served_and_unbounded(model, images, labels, dataset.num_classes)}


def main() -> None:
    def line(run_dir: Path, row: dict) -> str:
        served, target = row["served"], row["target-label"]
        return (f"{run_dir.name}: acc {served['acc']:.2f}, target-class recall "
                f"{served['recall'][target]:.1f}, share {served['predicted-share'][target]:.1f}")

    run_over_runs(__doc__.splitlines()[0], measure, line, "real test set")


if __name__ == "__main__":
    main()
