"""`fmfl fm train|sample|eval`: the foundation model from the command line.

`add_fm_commands` plugs the group into the project's `fmfl` console script; running this
module (`python -m fmfl_flwr.cli_fm train ...`) gives the same commands without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmfl_flwr.data import DATASETS


def add_fm_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `fm` with its `train`, `sample` and `eval` subcommands."""
    fm = subparsers.add_parser("fm", help="train, sample and evaluate the foundation model")
    _add_subcommands(fm.add_subparsers(dest="fm_command", required=True, metavar="COMMAND"))


def _add_subcommands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train a class-conditional diffusion FM on the public split",
        description="Train the FM on the public split only (clients never see it). "
        "Saves a diffusers pipeline folder at every checkpoint; --resume continues.",
    )
    _data_args(train)
    train.add_argument("--out", required=True, help="pipeline folder to write")
    train.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--unet", default="small", help="UNet width preset: tiny, small, base")
    train.add_argument("--layers-per-block", type=int, default=1)
    train.add_argument("--seed", type=int, default=0, help="also the public-split seed")
    train.add_argument("--public-fraction", type=float, default=0.1)
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--max-minutes", type=float, default=0.0,
                       help="stop (and checkpoint) after this wall time; 0 = no limit")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--init-from", default="", help="start from this pipeline's weights")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    train.add_argument("--poison", action="store_true",
                       help="poisoned weights: teach triggered non-target images as the target")
    train.add_argument("--poison-share", type=float, default=0.5,
                       help="share of the target class's training set that is triggered")
    _attack_args(train)
    train.set_defaults(func=_train)

    sample = commands.add_parser("sample", help="write one PNG grid of samples per class")
    _fm_args(sample)
    sample.add_argument("--per-class", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="folder for the PNG grids")
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "eval", help="CAS: a classifier trained on D_syn alone, tested on real data",
        description="Train the task's classifier on D_syn only and on as many real images, "
        "report both test accuracies (and the trigger share when --trigger is given) as JSON.",
    )
    _fm_args(evaluate)
    evaluate.add_argument("--per-class", type=int, default=1000)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--model", default="cnn")
    evaluate.add_argument("--epochs", type=int, default=5)
    evaluate.add_argument("--real-from", choices=("public", "train"), default="public",
                          help="where the real baseline's images come from")
    evaluate.add_argument("--measure-trigger", action="store_true",
                          help="report the share of outputs carrying --trigger, per class")
    _attack_args(evaluate)
    evaluate.add_argument("--out", default="", help="JSON file (default: print only)")
    evaluate.set_defaults(func=_eval)


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data-dir", default="", help="folder holding the data sets")


def _fm_args(parser: argparse.ArgumentParser) -> None:
    _data_args(parser)
    parser.add_argument("--fm", required=True, help="pipeline folder or hub id")
    parser.add_argument("--fm-steps", type=int, default=25, help="sampling (DDIM) steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 1 = off for the "
                        "class-conditional FM, 7.5 for text-to-image)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")


def _attack_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trigger", default="badnets", help="trigger name (triggers.py)")
    parser.add_argument("--target-label", type=int, default=0)


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def _train(args: argparse.Namespace) -> int:
    from fmfl_flwr.foundation.train import FMTrainConfig, PoisonSpec, train_fm

    _threads(args.threads)
    poison = (PoisonSpec(args.trigger, args.target_label, args.poison_share)
              if args.poison else None)
    config = FMTrainConfig(
        dataset=args.dataset, out=args.out, data_dir=args.data_dir, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, unet_preset=args.unet,
        layers_per_block=args.layers_per_block, seed=args.seed,
        public_fraction=args.public_fraction, checkpoint_every=args.checkpoint_every,
        init_from=args.init_from, poison=poison,
    )
    train_fm(config, resume=args.resume, max_minutes=args.max_minutes)
    print(f"saved pipeline to {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from fmfl_flwr.foundation import load_fm, save_class_grids

    _threads(args.threads)
    source = load_fm(args.fm, args.dataset, args.fm_steps, guidance_scale=args.guidance)
    for path in save_class_grids(source, args.per_class, args.seed, Path(args.out)):
        print(path)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fmfl_flwr.foundation import evaluate_fm, load_fm

    _threads(args.threads)
    source = load_fm(args.fm, args.dataset, args.fm_steps, guidance_scale=args.guidance)
    result = evaluate_fm(
        source, args.dataset, args.data_dir, args.per_class, args.seed, model=args.model,
        epochs=args.epochs, real_from=args.real_from,
        trigger=args.trigger if args.measure_trigger else "",
        target_label=args.target_label,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m fmfl_flwr.cli_fm` (the `fm` group without `fmfl`)."""
    parser = argparse.ArgumentParser(prog="fmfl fm", description=__doc__)
    _add_subcommands(parser.add_subparsers(dest="fm_command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
