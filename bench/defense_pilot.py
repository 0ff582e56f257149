"""Pilot of METHOD.md 7 for the activation-bounds defense: fashion-mnist CNN, one seed.

A clean "client ensemble" CNN trained on the private 50k, a fused model distilled from it
(fmfl_flwr.fusion.distill) on a 10k D_syn (real public-split images standing in for FM
output) of which 18% carry the 3x3 white BadNets trigger relabelled to 0, then every
bounds variant on it; plus a classic BadNets-trained CNN with bounds fitted on a clean
D_syn. ACC and ASR are measured on the real test set, which no variant sees. Base models
are cached; each finished variant is written to the JSON at once.

    nice python bench/defense_pilot.py --out results/defense_pilot.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from fmfl_flwr.attacks import poison_samples
from fmfl_flwr.data import cache_dir, load_dataset, to_float
from fmfl_flwr.defense import (
    BoundSettings,
    attach_bounds,
    bounds_disabled,
    optimise_bounds,
    prune_dormant,
)
from fmfl_flwr.fusion import FusionSettings, distill
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import public_split
from fmfl_flwr.training import predict_logits, train_epochs
from fmfl_flwr.triggers import badnets

TARGET = 0


def cached_model(path: Path, make: Callable[[nn.Module], None]) -> nn.Module:
    model = build_model("cnn", "fashion-mnist")
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        started = time.perf_counter()
        make(model)
        print(f"trained {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def setup(args: argparse.Namespace) -> dict:
    """Data, trigger and the three base models (ensemble, fused, BadNets-trained)."""
    data = load_dataset("fashion-mnist", args.data_dir)
    train_x, train_y = to_float(data.train_x), torch.as_tensor(data.train_y)
    public, private = (torch.as_tensor(i) for i in public_split(len(train_y), 1 / 6, args.seed))
    trigger = badnets(data.image_shape)
    clean_x, clean_y = train_x[public], train_y[public]
    syn_x, syn_y, poisoned = poison_samples(clean_x, clean_y, trigger, 0.2, TARGET, args.seed)
    folder = cache_dir() / "defense_pilot" / f"seed{args.seed}-e{args.train_epochs}"
    torch.manual_seed(args.seed)

    def train_clean(model: nn.Module) -> None:
        train_epochs(model, train_x[private], train_y[private], args.train_epochs, 64, 0.02,
                     args.seed)

    def train_badnets(model: nn.Module) -> None:
        x, y, _ = poison_samples(train_x[private], train_y[private], trigger, 0.1, TARGET,
                                 args.seed + 1)
        train_epochs(model, x, y, args.train_epochs, 64, 0.02, args.seed)

    ensemble = cached_model(folder / "ensemble.pt", train_clean)
    ensemble_logits = predict_logits(ensemble, syn_x)
    fusion = FusionSettings(epochs=args.distill_epochs, alpha=args.alpha, tau=args.tau,
                            seed=args.seed)

    def fuse(model: nn.Module) -> None:
        model.load_state_dict(ensemble.state_dict())
        distill(model, ensemble_logits, syn_x, syn_y, fusion, args.seed)

    fused_name = f"fused-a{args.alpha}-t{args.tau}-e{args.distill_epochs}.pt"
    fused = cached_model(folder / fused_name, fuse)
    wanted = not args.only or "badnets" in args.only
    bad = cached_model(folder / "badnets.pt", train_badnets) if wanted else None
    return {"trigger": trigger, "syn_x": syn_x, "syn_y": syn_y, "poisoned": poisoned,
            "clean_x": clean_x, "clean_y": clean_y, "ensemble": ensemble,
            "ensemble_logits": ensemble_logits, "fused": fused, "badnets": bad,
            "local_x": train_x[private[:5000]], "local_y": train_y[private[:5000]],
            "test_x": to_float(data.test_x[: args.test_size]),
            "test_y": torch.as_tensor(data.test_y[: args.test_size])}


def bounded_copy(model: nn.Module, layers: list[str] | None = None) -> nn.Module:
    bounded = attach_bounds(build_model("cnn", "fashion-mnist"), layers)
    bounded.load_state_dict(model.state_dict(), strict=False)
    return bounded.eval()


def variants(env: dict, base: BoundSettings) -> dict[str, Callable[[], tuple[nn.Module, dict]]]:
    """name -> run(): (defended model, stats). FM-attack variants first, then BadNets."""
    syn_x, syn_y, ens = env["syn_x"], env["syn_y"], env["ensemble_logits"]

    def bounds(model_key: str, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
               layers: list[str] | None = None, **changes) -> Callable[[], tuple[nn.Module, dict]]:
        def run() -> tuple[nn.Module, dict]:
            model = bounded_copy(env[model_key], layers)
            _, stats = optimise_bounds(model, x, y, teacher, replace(base, **changes))
            return model, stats
        return run

    def pruning(model_key: str, x: torch.Tensor, y: torch.Tensor
                ) -> Callable[[], tuple[nn.Module, dict]]:
        def run() -> tuple[nn.Module, dict]:
            model = bounded_copy(env[model_key])
            _, stats = prune_dormant(model, x, y, max_samples=base.max_samples, seed=base.seed)
            return model, stats
        return run

    memo: dict[str, nn.Module] = {}

    def local_training(bounds_on: bool | None, model_key: str = "fused",
                       teacher: torch.Tensor | None = ens, x: torch.Tensor = syn_x,
                       **changes) -> Callable[[], tuple[nn.Module, dict]]:
        """One clean local epoch from the defended model, bounds on or off while training."""
        def run() -> tuple[nn.Module, dict]:
            key = model_key + repr(sorted(changes.items()))
            if bounds_on is None:  # the control: no bounds at all
                memo[key] = bounded_copy(env[model_key], [])
            elif key not in memo:
                memo[key] = bounds(model_key, x, syn_y, teacher, **changes)()[0]
            model = copy.deepcopy(memo[key])
            started = time.perf_counter()
            with contextlib.nullcontext() if bounds_on else bounds_disabled(model):
                train_epochs(model, env["local_x"], env["local_y"], 1, 32, 0.01, base.seed)
            return model.eval(), {"time": time.perf_counter() - started}
        return run

    clean_x, clean_y = env["clean_x"], env["clean_y"]
    shipped = {"norm": "rms", "disagree_weight": 3.0, "epochs": 20}
    return {
        "fused + ensemble-switch": bounds("fused", syn_x, syn_y, ens),
        "fused + mm-bm (fidelity to fused on all D_syn)": bounds(
            "fused", syn_x, syn_y, None, objective="mm-bm"),
        "fused + agree (fidelity where fused = ensemble)": bounds(
            "fused", syn_x, syn_y, ens, objective="agree"),
        "fused + ensemble-switch, disagreement weight 3": bounds(
            "fused", syn_x, syn_y, ens, disagree_weight=3.0),
        "fused + clean-bounds-oracle (mm-bm on clean real data)": bounds(
            "fused", clean_x, clean_y, None, objective="mm-bm"),
        "fused + pruning (Fine-Pruning on D_syn)": pruning("fused", syn_x, syn_y),
        "fused + mmac (margin)": bounds("fused", syn_x, syn_y, None, objective="mmac"),
        "badnets + mm-bm on clean D_syn": bounds("badnets", clean_x, clean_y, None,
                                                 objective="mm-bm"),
        "badnets + mm-bm on clean D_syn, c0 5": bounds("badnets", clean_x, clean_y, None,
                                                       objective="mm-bm", c0=5.0),
        "badnets + pruning on clean D_syn": pruning("badnets", clean_x, clean_y),
        "badnets, then a local epoch (no defense: the control)": local_training(
            None, "badnets"),
        "badnets + mm-bm on clean D_syn, then a local epoch with bounds on": local_training(
            True, "badnets", None, clean_x, objective="mm-bm"),
        "fused + ensemble-switch, then a local epoch with bounds on": local_training(True),
        "fused + ensemble-switch, then a local epoch with bounds off": local_training(False),
        "fused, then a local epoch (no defense: the control)": local_training(None),
        "fused + defaults, then a local epoch with bounds on": local_training(True, **shipped),
        "fused + ensemble-switch, rms norm, disagreement weight 3, 20 epochs": bounds(
            "fused", syn_x, syn_y, ens, norm="rms", disagree_weight=3.0, epochs=20),
        "fused + ensemble-switch, rms norm, target agreement 0.9, 20 epochs": bounds(
            "fused", syn_x, syn_y, ens, norm="rms", target_agreement=0.9,
            collapse_agreement=0.85, epochs=20),
        "fused + ensemble-switch, rms norm, 20 epochs": bounds(
            "fused", syn_x, syn_y, ens, norm="rms", epochs=20),
        "fused + defaults, conv ReLUs only (20 epochs)": bounds(
            "fused", syn_x, syn_y, ens, ["relu1", "relu2", "relu3"], **shipped),
        "fused + defaults, fc ReLU only (20 epochs)": bounds(
            "fused", syn_x, syn_y, ens, ["relu4"], **shipped),
        "fused + ensemble-switch, disagreement weight 3, 20 epochs": bounds(
            "fused", syn_x, syn_y, ens, disagree_weight=3.0, epochs=20),
        "fused + ensemble-switch, rms norm": bounds("fused", syn_x, syn_y, ens, norm="rms"),
        "fused + ensemble-switch, one bound per layer": bounds(
            "fused", syn_x, syn_y, ens, granularity="layer"),
    }


def table(paths: list[str]) -> str:
    """Markdown table of the rows of one or more result files (later files win)."""
    rows: dict[str, dict] = {}
    for path in paths:
        rows.update(json.loads(Path(path).read_text())["rows"])
    lines = ["| model / defense | ACC % | ASR % | optimisation s | epochs | final c |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        extra = [f"{row[k]:.0f}" if k in row else "" for k in ("time", "epochs")]
        final_c = f"{row['c']:.3g}" if "c" in row else ""
        lines.append(f"| {name} | {100 * row['acc']:.2f} | {100 * row['asr']:.2f} | "
                     f"{' | '.join(extra)} | {final_c} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default="results/defense_pilot.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--only", default="", help="run the variants whose name has this")
    parser.add_argument("--rerun", action="store_true", help="redo rows already in --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", nargs="+", help="print the rows of these files and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    env = setup(args)
    # The pilot's starting point; the shipped defaults are the "rms norm, disagreement
    # weight 3, 20 epochs" row.
    base = BoundSettings(seed=args.seed, epochs=10, norm="l2", disagree_weight=1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    report.update(args=vars(args), settings=asdict(base),
                  poisoned_share=len(env["poisoned"]) / len(env["syn_y"]))

    def record(name: str, model: nn.Module, stats: dict) -> None:
        row = acc_and_asr(model, env["test_x"], env["test_y"], env["trigger"], TARGET)
        row.update(stats)
        report["rows"][name] = row
        out.write_text(json.dumps(report, indent=2))
        print(f"{name}: ACC {row['acc']:.4f} ASR {row['asr']:.4f} "
              f"time {stats.get('time', 0):.1f} s {stats}", flush=True)

    def wanted(name: str) -> bool:
        return args.only in name and (args.rerun or name not in report["rows"])

    for name in ("ensemble", "fused", "badnets"):
        if wanted(name) and env[name] is not None:
            record(name, env[name], {})
    for name, run in variants(env, base).items():
        if wanted(name):
            record(name, *run())


if __name__ == "__main__":
    main()
