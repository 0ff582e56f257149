"""How far the pre-trained model's test ACC moves with the seed alone, per LR schedule.

CIFAR-10's defended cells trail clean FM-FL most in the seeds whose attacked round 0 trails
the clean one most (seed 0: -17, seed 2: -5, seed 1: +0.3 points), and stop 36 found one
pre-training on 8,200 clean rows 14 points under one on 10,000. Two epochs of SGD at a
constant rate stop wherever the last full-rate steps leave the model, so this bench asks how
much of such a gap the seed alone makes: it pre-trains with the server's recipe
(`fusion.pretrain`) from several seeds (initial weights and batch order) on the run's clean
and poisoned D_syn, once per `pretrain-lr-schedule`, and reports ACC, ASR and the recall of
the target and the other classes on the real test set, with their spread over seeds.

`poisoned-balanced` is the poisoned D_syn cut back to the class balance the server asked
for (`syn-per-class` rows of each label, a seeded draw where the attack's relabelling left
more): whether the pre-trained model's lean on the target follows D_syn's label counts.

Diagnosis only; nothing here picks a setting. D_syn must be cached (any run of the config
makes it).

    python bench/pretrain_spread.py results/c10-clean/clean-iid-none --seeds 5 \
        --data-dir ../shared/datasets --out bench/results/pretrain_spread_cifar10.json
    # --sets poisoned-balanced: only that set
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from pretrain_data_cost import pretrained_scores  # the sibling benches' scorer, run reader
from served_vs_fused import recorded_config
from split_census import clean_dsyn

from fmfl_flwr import attacks
from fmfl_flwr.app_config import fusion_settings, parse_app_config, with_default_fm
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.foundation import synthetic_set_for_config
from fmfl_flwr.foundation.intake import requested_balance
from fmfl_flwr.fusion import FusionSettings, pretrain
from fmfl_flwr.models import build_model
from fmfl_flwr.training import LR_SCHEDULES


def pretrain_over_seeds(build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                        settings: FusionSettings, seeds: list[int],
                        score: Callable[[torch.nn.Module], dict]) -> list[dict]:
    """`score(model)` of one pre-training per seed: the seed draws the initial weights (as
    a run's seed does) and the batch order."""
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build()
        started = time.perf_counter()
        pretrain(model, x, y, replace(settings, seed=seed))
        rows.append({"seed": seed, "pretrain_s": time.perf_counter() - started, **score(model)})
    return rows


def spread(rows: list[dict], key: str) -> dict[str, float]:
    values = [row[key] for row in rows]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if
            len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (its config)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sets", default="clean,poisoned",
                        help="comma-separated: clean, poisoned, poisoned-balanced")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config, commit = recorded_config(args.run, args.data_dir)
    attacked = parse_app_config({**config.to_run_config(), "fm-attack": "poisoned-pipeline"})
    dataset = load_dataset(config.dataset, config.data_dir)
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(attacked, dataset.image_shape)
    clean = clean_dsyn(config)
    poisoned = synthetic_set_for_config(with_default_fm(attacked))
    target = attacked.target_label
    balanced = requested_balance(poisoned.labels, config.syn_per_class, config.seed)
    sets = {"clean": (clean.images, clean.labels),
            "poisoned": (poisoned.images, poisoned.labels),
            "poisoned-balanced": (poisoned.images[balanced], poisoned.labels[balanced])}
    names = args.sets.split(",")
    if unknown := set(names) - set(sets):
        raise SystemExit(f"--sets {args.sets!r}: {sorted(unknown)} not known; "
                         f"accepted: {', '.join(sets)}")

    def build() -> torch.nn.Module:
        return build_model(config.model, config.dataset, dataset.num_classes,
                           config.model_width)

    def score(model: torch.nn.Module) -> dict:
        return pretrained_scores(model, test_x, test_y, trigger, target, dataset.num_classes)

    results = {}
    for schedule in LR_SCHEDULES:
        settings = replace(fusion_settings(config), pretrain_lr_schedule=schedule)
        for name in names:
            rows = pretrain_over_seeds(build, *sets[name], settings, list(range(args.seeds)),
                                       score)
            results[f"{schedule}/{name}"] = {
                "d_syn-rows": len(sets[name][1]), "rows": rows,
                **{key: spread(rows, key)
                   for key in ("acc", "asr", "target-recall", "non-target-recall")}}
            print(schedule, name, {k: round(v["mean"], 2) for k, v in
                                   results[f"{schedule}/{name}"].items() if isinstance(v, dict)},
                  "ACC std", round(results[f"{schedule}/{name}"]["acc"]["std"], 2), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "run": str(args.run), "git_commit": commit, "seeds": args.seeds,
                "pretrain-epochs": config.pretrain_epochs, "results": results,
                "evaluated-on": "real test set",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "threads": torch.get_num_threads()},
            }, indent=1))


if __name__ == "__main__":
    main()
