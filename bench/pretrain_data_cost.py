"""What the FM attack's D_syn costs the pre-trained model: the rows it takes, or the poison.

The poisoned pipeline stamps and relabels 20% of every non-target class of D_syn, so a model
pre-trained on it loses those rows as examples of their own class and learns the trigger
from them. Three pre-trainings from the same initial weights, with the server's round-0
recipe (`fusion.pretrain`) and a finished attacked run's config, tell the two costs apart:

- `clean`: the clean D_syn of the same FM and seed (clean FM-FL's round 0);
- `clean-without-poisoned-rows`: the same, less the rows the attack poisons (the data
  lost, nothing learned from the trigger; also the poisoned D_syn less its poison, what a
  split of perfect precision leaves);
- `poisoned`: the poisoned D_syn (the attacked run's round 0, before the defense).

ACC, ASR and per-class recall on the real test set. Diagnosis only: nothing here picks a
setting. D_syn must be cached (any run of the config makes it).

    python bench/pretrain_data_cost.py results/s33-c10-attack-iid-bounds-r5/attack-iid-bounds \
        --data-dir ../shared/datasets --out bench/results/pretrain_data_cost_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from class_recall import class_scores  # the sibling benches' scorer and run reader
from served_vs_fused import recorded_config
from split_census import clean_dsyn

from fmfl_flwr import attacks
from fmfl_flwr.app_config import fusion_settings, with_default_fm
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.foundation import synthetic_set_for_config
from fmfl_flwr.fusion import pretrain
from fmfl_flwr.metrics import attack_success_rate
from fmfl_flwr.models import build_model
from fmfl_flwr.training import predict_logits


def dsyn_variants(images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor,
                  clean_images: torch.Tensor, clean_labels: torch.Tensor) -> dict:
    """The three pre-training sets as (images, labels), from the poisoned D_syn, its mask of
    poisoned rows and the clean D_syn it was made from (refused if the rows the attack left
    alone differ: not the same FM and seed)."""
    kept = ~poisoned
    if not (torch.equal(images[kept], clean_images[kept])
            and torch.equal(labels[kept], clean_labels[kept])):
        raise ValueError("the poisoned D_syn's unpoisoned rows differ from the clean D_syn's")
    return {"clean": (clean_images, clean_labels),
            "clean-without-poisoned-rows": (clean_images[kept], clean_labels[kept]),
            "poisoned": (images, labels)}


def pretrained_scores(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor,
                      trigger, target: int, num_classes: int) -> dict:
    """ACC, ASR, per-class recall, the target's recall and the mean of the others' (%)."""
    model.eval()
    scores = class_scores(predict_logits(model, test_x).argmax(1), test_y, num_classes)
    others = [r for c, r in enumerate(scores["recall"]) if c != target]
    return {"acc": scores["acc"],
            "asr": 100 * attack_success_rate(model, test_x, test_y, trigger, target),
            "target-recall": scores["recall"][target],
            "non-target-recall": sum(others) / len(others), "recall": scores["recall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished FM-attack run folder (its config)")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config, commit = recorded_config(args.run, args.data_dir)
    if config.fm_attack != "poisoned-pipeline":
        raise SystemExit(f"{args.run}: fm-attack is {config.fm_attack!r}; this bench needs "
                         "'poisoned-pipeline' (the attack whose poisoned rows are known)")
    dataset = load_dataset(config.dataset, config.data_dir)
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    syn = synthetic_set_for_config(with_default_fm(config))
    clean = clean_dsyn(config)
    variants = dsyn_variants(syn.images, syn.labels, syn.poisoned, clean.images, clean.labels)

    rows = {}
    for name, (x, y) in variants.items():
        torch.manual_seed(config.seed)  # the same initial weights for every variant
        model = build_model(config.model, config.dataset, dataset.num_classes,
                            config.model_width)
        started = time.perf_counter()
        pretrain(model, x, y, fusion_settings(config))
        rows[name] = {"rows": len(y), "pretrain_s": time.perf_counter() - started,
                      **pretrained_scores(model, test_x, test_y, trigger, config.target_label,
                                          dataset.num_classes)}
        print(name, {k: round(v, 2) for k, v in rows[name].items() if k != "recall"},
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "run": str(args.run), "git_commit": commit, "seed": config.seed,
            "poisoned-rows": int(syn.poisoned.sum()), "rows": rows, "evaluated-on": "real test set",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        }, indent=1))


if __name__ == "__main__":
    main()
