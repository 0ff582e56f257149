"""How much of D_syn's poison `suspected_poison` finds in a finished run's served model.

`distill-unlearn-poison` teaches the split away from the named target; poison outside it
stays in the fused weights (CIFAR-10, stop 28: the split held 8.1% of D_syn against 20%
poisoned). This bench reads a run's served model (`model.pt`: fused weights and bounds),
takes the samples the bounds flip from the target and those they keep, and reports them,
the split's start (nearer the flipped samples' mean feature than the kept ones', stop 28's
split) and the split as shipped (2-means from that start, stop 29). The poisoned
samples are those that differ from the clean D_syn of the same seed; D_syn only, no test
data. Diagnosis: nothing here picks a setting.

    python bench/split_census.py results/s25-c10/attack-dirichlet-bounds \
        --out bench/results/split_census_cifar10_dir_s0.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from served_vs_fused import load_run  # the sibling bench's loader of a finished run

from fmfl_flwr.app_config import parse_app_config, with_default_fm
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.defense.bounds import bounds_disabled
from fmfl_flwr.foundation import SyntheticSet, synthetic_set_for_config
from fmfl_flwr.fusion import flipped_from_target, suspected_poison
from fmfl_flwr.training import logits_and_features, predict_logits


def clean_dsyn(config: ExperimentConfig) -> SyntheticSet:
    """The clean D_syn of the run's FM and seed: what the FM attack started from."""
    clean_config = parse_app_config({**config.to_run_config(), "fm-attack": "none"})
    return synthetic_set_for_config(with_default_fm(clean_config))


def poisoned_dsyn(config: ExperimentConfig) -> tuple[SyntheticSet, torch.Tensor]:
    """The run's D_syn and which of its samples the FM attack poisoned: those that differ
    from the clean D_syn of the same FM and seed (both cached on disk)."""
    syn = synthetic_set_for_config(with_default_fm(config))
    return syn, (syn.images != clean_dsyn(config).images).flatten(1).any(1)


def census(chosen: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """A split's share of D_syn, its precision and its recall against the poison."""
    return {"share-of-dsyn": chosen.float().mean().item(),
            "poisoned-among": poisoned[chosen].float().mean().item() if chosen.any() else 0.0,
            "poisoned-caught": chosen[poisoned].float().mean().item()}


def measure(run_dir: Path, data_dir: str) -> dict:
    config, _, commit, model = load_run(run_dir, data_dir)
    model.eval()
    syn, poisoned = poisoned_dsyn(config)
    target = config.target_label
    bounded = predict_logits(model, syn.images)
    with bounds_disabled(model):
        unbounded, features = logits_and_features(model, syn.images)
    flipped = flipped_from_target(syn.labels, unbounded, bounded, target)
    start = suspected_poison(features, unbounded, bounded, syn.labels, target, max_steps=0)
    shipped = suspected_poison(features, unbounded, bounded, syn.labels, target)
    return {"run": str(run_dir), "commit": commit, "target": target,
            "poisoned-share": poisoned.float().mean().item(),
            "labelled-target-share": (syn.labels == target).float().mean().item(),
            "flipped": census(flipped, poisoned), "start": census(start, poisoned),
            "shipped": census(shipped, poisoned)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        rows.append(measure(run, args.data_dir))
        print(json.dumps(rows[-1], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
