"""The round-0 defense on CIFAR-10 ResNet-18, at the scale a 2-core CPU allows.

D_syn is stood in for by the real public split (10% of the training set, which no client
holds; chosen before the CPU stand-in FM in assets/fm/cifar10 existed) with `--poison-ratio`
of its non-target images stamped with the BadNets trigger and relabelled to class 0: what
the poisoned pipeline does to an FM's output. A ResNet-18 (width `--width`) is pre-trained
on it (the server's round 0), then defended with the bounds fitted on D_syn alone: MM-BM (no
trimming) and the shipped trimmed fit. One clean local epoch on a client's IID share,
through the served bounds, stands in for round 1. ACC and ASR on the real test set, which
nothing here trains on, or (`--eval-split validation`, for choosing settings without the
test set) on as many private training images that neither the pre-training nor the local
epoch uses. The pre-trained model is cached; the JSON holds every row.
`--variants` adds trimmed fits with other settings (`field=value,...` of `BoundSettings`),
each followed by its own local epoch.

    python bench/cifar10_round0.py --out bench/results/cifar10_round0.json
    python bench/cifar10_round0.py --width 16 --variants lr=0.03 c0=2.0 \
        --out bench/results/cifar10_round0_variants.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from torch import nn

from fmfl_flwr.attacks import poison_samples
from fmfl_flwr.data import cache_dir, load_dataset, to_float
from fmfl_flwr.defense import BoundSettings, attach_bounds, optimise_bounds
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import public_split
from fmfl_flwr.training import train_epochs
from fmfl_flwr.triggers import badnets

TARGET = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--poison-ratio", type=float, default=0.2)
    parser.add_argument("--local-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--eval-split", choices=("test", "validation"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=[],
                        help="extra trimmed fits, each 'field=value,...' of BoundSettings")
    parser.add_argument("--skip-shipped", action="store_true",
                        help="only the --variants (the rows of the shipped fits are known)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = {text: parse_variant(text) for text in args.variants}

    data = load_dataset("cifar10", args.data_dir)
    train_y = torch.as_tensor(data.train_y)
    public, private = (torch.as_tensor(i) for i in public_split(len(train_y), 0.1, args.seed))
    trigger = badnets(data.image_shape)
    syn_x, syn_y, _ = poison_samples(to_float(data.train_x[public]), train_y[public], trigger,
                                     args.poison_ratio, TARGET, args.seed)
    shuffled = private[torch.randperm(len(private), generator=torch.Generator().manual_seed(
        args.seed))]
    local = shuffled[: args.local_size]
    local_x, local_y = to_float(data.train_x[local]), train_y[local]
    if args.eval_split == "test":
        test_x = to_float(data.test_x[: args.test_size])
        test_y = torch.as_tensor(data.test_y[: args.test_size])
    else:  # the private images after the local epoch's: never trained on
        held_out = shuffled[args.local_size : args.local_size + args.test_size]
        test_x, test_y = to_float(data.train_x[held_out]), train_y[held_out]

    def fresh() -> nn.Module:
        torch.manual_seed(args.seed)
        return build_model("resnet18", "cifar10", 10, args.width)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return acc_and_asr(model.eval(), test_x, test_y, trigger, TARGET)

    path = (cache_dir() / "cifar10_round0" /
            f"resnet18-w{args.width}-e{args.pretrain_epochs}-p{args.poison_ratio}-s{args.seed}.pt")
    pretrained = fresh()
    if path.exists():
        pretrained.load_state_dict(torch.load(path))
    else:
        started = time.perf_counter()
        for epoch in range(args.pretrain_epochs):  # one call per epoch: progress on the way
            train_epochs(pretrained, syn_x, syn_y, 1, 64, 0.05, args.seed + epoch)
            print(f"pre-training epoch {epoch + 1}/{args.pretrain_epochs}: "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pretrained.state_dict(), path)

    rows: dict[str, dict] = {}

    def record(name: str, model: nn.Module, **extra) -> None:
        rows[name] = {**evaluate(model), **extra}
        print(name, rows[name], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
            "settings": asdict(BoundSettings()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        }, indent=1))

    def local_epoch(model: nn.Module) -> nn.Module:
        """One clean local epoch (SGD lr 0.01, batch 32), bounds as served."""
        trained = copy.deepcopy(model)
        train_epochs(trained, local_x, local_y, 1, 32, 0.01, args.seed)
        return trained

    def fit(settings: BoundSettings) -> tuple[nn.Module, dict[str, float]]:
        model = attach_bounds(fresh())
        model.load_state_dict(pretrained.state_dict(), strict=False)
        _, stats = optimise_bounds(model, syn_x, syn_y, None, settings)
        keys = ("time", "epochs", "c", "agreement", "start-agreement", "collapses")
        return model, {k: stats[k] for k in keys}

    record("pre-trained on poisoned D_syn (undefended)", pretrained)
    if not args.skip_shipped:
        defended = {}
        for name, trim in (("mm-bm (no trimming)", 0.0), ("trimmed fit (shipped round 0)", 0.2)):
            defended[name], stats = fit(replace(BoundSettings(), trim=trim, seed=args.seed))
            record(f"+ {name}", defended[name], **stats)
        record("undefended, then a clean local epoch (control)", local_epoch(pretrained))
        record("trimmed fit, then a clean local epoch through the bounds",
               local_epoch(defended["trimmed fit (shipped round 0)"]))
    for text, changes in variants.items():
        model, stats = fit(replace(BoundSettings(), seed=args.seed, **changes))
        record(f"+ trimmed fit, {text}", model, **stats)
        record(f"trimmed fit, {text}, then a clean local epoch through the bounds",
               local_epoch(model))


def parse_variant(text: str) -> dict:
    """'lr=0.03,epochs=20' -> {'lr': 0.03, 'epochs': 20}, typed as BoundSettings' fields."""
    types = {f.name: type(f.default) for f in fields(BoundSettings)}
    changes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--variants: {name!r} is not a BoundSettings field; "
                             f"accepted: {', '.join(types)}")
        changes[name] = types[name](value)
    BoundSettings(**changes)  # its own checks, before any work
    return changes


if __name__ == "__main__":
    main()
