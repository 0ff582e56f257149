"""The round-0 bound fit on its own: the pre-trained model, clean and poisoned D_syn.

Round 0 has no client ensemble, so the fit trims (`bounds-trim`) the worst-fitted share of
D_syn from its fidelity term; `bounds-class-gate` trims only when they concentrate on one
class. This bench pre-trains the default experiment's model on the clean and on the
poisoned D_syn (cached), fits the bounds with each `--variants` trim:gate pair, and
measures ACC and ASR on the real test set, which neither step sees. Clean D_syn shows what
the fit costs when there is nothing to remove; poisoned, what it removes.

    python bench/round0_fit.py --variants 0.2:0 0.2:0.5 0:0 --out bench/results/round0_fit.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fmfl_flwr import attacks
from fmfl_flwr.app_config import bound_settings, fusion_settings, parse_app_config
from fmfl_flwr.cli import app_defaults, parse_overrides
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.defense import attach_bounds, optimise_bounds
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.pretrain_cache import pretrain_cached
from server_app import seed_everything, synthetic_data


def pretrained(config, dataset, syn) -> torch.nn.Module:
    """The round-0 model as the ServerApp builds and pre-trains it (shares its cache)."""
    seed_everything(config.seed)
    model = build_model(config.model, config.dataset, dataset.num_classes, config.model_width)
    pretrain_cached(model, *syn, fusion_settings(config))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[],
                        help="run-config overrides key=value, values in TOML as in flwr run")
    parser.add_argument("--variants", nargs="+", default=["0.2:0", "0.2:0.5", "0:0"],
                        help="trim:gate pairs to fit")
    parser.add_argument("--subset-seeds", nargs="+", type=int, default=None,
                        help="fit each variant once per seed of its 1,000-sample subset "
                             "(default: the run's seed): the spread the subset alone causes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = {**app_defaults(), **parse_overrides(" ".join(args.set))}
    config = parse_app_config(base)
    dataset = load_dataset(config.dataset, config.data_dir)
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    rows = []
    for name, attack in (("clean", "none"), ("poisoned", base["fm-attack"])):
        config = parse_app_config({**base, "fm-attack": attack})
        syn = synthetic_data(config)
        model = pretrained(config, dataset, syn)
        rows.append({"d_syn": name, "variant": "pre-trained",
                     **acc_and_asr(model, test_x, test_y, trigger, config.target_label)})
        print(rows[-1], flush=True)
        for variant, subset_seed in itertools.product(args.variants,
                                                      args.subset_seeds or [config.seed]):
            trim, gate = (float(v) for v in variant.split(":"))
            settings = replace(bound_settings(config), trim=trim, class_gate=gate,
                               seed=subset_seed)
            bounded = attach_bounds(copy.deepcopy(model))
            started = time.perf_counter()
            _, stats = optimise_bounds(bounded, *syn, settings=settings)
            rows.append({"d_syn": name, "variant": variant, "subset-seed": subset_seed,
                         "seconds": time.perf_counter() - started, **stats,
                         **acc_and_asr(bounded, test_x, test_y, trigger, config.target_label)})
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()},
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "overrides": args.set, "settings": asdict(bound_settings(config)), "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }, indent=1))


if __name__ == "__main__":
    main()
