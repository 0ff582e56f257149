"""Does a fused model's lean on one class show on D_syn, where the server could see it?

A CIFAR-10 fused model can send 41% of the real test set to one clean class (Dirichlet
seed 1, round 3, stop 47), and the bounds' overrule then wins ACC back. The server has
no real data: a test that overrules only where the fused model leans would have to read
the lean off D_syn. One row per run: the share of predictions per class of the fused
model (bounds off) and of the served model on the real test set, and of the fused model
on the run's D_syn (loaded from the cache, else generated as the run did) beside D_syn's
label shares. Diagnosis only: no setting is chosen by it.

    python bench/syn_lean.py results/c10-dir-s1/attack-dirichlet-bounds \
        --data-dir ../shared/datasets --out bench/results/syn_lean_cifar10.json
"""

from __future__ import annotations

from pathlib import Path

import torch
from class_recall import class_scores, served_and_unbounded  # the sibling bench's scores
from served_vs_fused import load_run, run_over_runs

from fmfl_flwr.data import to_float
from fmfl_flwr.defense.bounds import bounds_disabled
from fmfl_flwr.training import predict_logits
from server_app import synthetic_data


def lean_scores(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor,
                syn_x: torch.Tensor, syn_y: torch.Tensor, classes: int) -> dict:
    """Per-class scores of the served model on the test set, and of the fused model (its
    bounds off) on the test set and on D_syn, beside D_syn's label shares (%)."""
    test = served_and_unbounded(model, test_x, test_y, classes)
    with bounds_disabled(model):
        fused_syn = predict_logits(model, syn_x).argmax(1)
    return {"served-test": test["served"], "unbounded-test": test["unbounded"],
            "unbounded-syn": class_scores(fused_syn, syn_y, classes),
            "syn-label-share": class_scores(syn_y, syn_y, classes)["predicted-share"]}


def measure(run_dir: Path, data_dir: str, checkpoint: str = "") -> dict:
    config, dataset, commit, model = load_run(run_dir, data_dir, checkpoint)
    syn_x, syn_y = synthetic_data(config)
    scores = lean_scores(model, to_float(dataset.test_x), torch.as_tensor(dataset.test_y),
                         syn_x, syn_y, dataset.num_classes)
    return {"run": str(run_dir), "checkpoint": checkpoint or None, "git_commit": commit,
            **scores}


def main() -> None:
    def line(run_dir: Path, row: dict) -> str:
        test = row["unbounded-test"]["predicted-share"]
        syn = row["unbounded-syn"]["predicted-share"]
        top = max(range(len(test)), key=test.__getitem__)
        return (f"{run_dir.name}: fused model's top test class {top} at {test[top]:.1f}% of "
                f"test predictions, {syn[top]:.1f}% of D_syn's; D_syn's largest "
                f"{max(syn):.1f}%")

    run_over_runs(__doc__.splitlines()[0], measure, line, "real test set and the run's D_syn")


if __name__ == "__main__":
    main()
