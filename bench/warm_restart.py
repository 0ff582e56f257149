"""Replay one round's bound fit from kept checkpoint copies, with other fit settings.

A run's checkpoint after round k holds the served model (its weights are round k's fused
model: the defense never touches them), and the defense's carried state (last round's
bounds and c, its history). Given the copy kept after round k-1 and the one after round k
(or, for the last round, the finished run folder: `model.pt` and `metrics.csv`), this
bench refits round k's bounds on the same fused model from the same warm start, once per
`--variants` entry (BoundSettings overrides), and measures the served model on the real
public split (what a setting may be chosen on) and the real test set (reported).
A variant without overrides replays the run as recorded and must give back its bounds
(the row says how far off); keys a run's config lacks take today's defaults, so a run
from before `bounds-warm-min-agreement` replays as run with `warm_min_agreement=0`.

Only rounds fitted on the fused model's own outputs replay (fusion unlearned the poison,
MM-BM's reference): the client ensemble an overruled round needs is not in a checkpoint.

    python bench/warm_restart.py results/s30-keep/attack-iid-bounds-r1 \
        results/s30-keep/attack-iid-bounds-r2 --variants as-run:warm_min_agreement=0 \
        restart:warm_min_agreement=0.9 --out bench/results/warm_restart_cifar10_iid_r2.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from served_vs_fused import public_and_test_scorer, recorded_config  # sibling bench

from fmfl_flwr.app_config import bound_settings
from fmfl_flwr.checkpoint import FILE, restore_step_states
from fmfl_flwr.data import load_dataset
from fmfl_flwr.defense.bounds import bound_keys, load_state_with_bounds
from fmfl_flwr.defense.optimise import BoundSettings
from fmfl_flwr.defense.steps import make_defense, settings_after_unlearning
from fmfl_flwr.models import build_model
from server_app import synthetic_data


def parse_variant(text: str, base: BoundSettings) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, BoundSettings overrides typed as in `base`)."""
    name, _, assignments = text.partition(":")
    known = {f.name for f in fields(base)}
    overrides = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"variant {name!r}: {key!r} is not a BoundSettings field")
        overrides[key] = type(getattr(base, key))(value)
    return name, overrides


def round_record(run_dir: Path) -> dict:
    """The round, served state and metric rows a checkpoint copy holds, or a finished run
    (its `model.pt` and `metrics.csv`: the last round, whose checkpoint the run removed)."""
    if (run_dir / FILE).exists():
        return torch.load(run_dir / FILE, weights_only=False)
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"round": int(rows[-1]["round"]), "rows": rows,
            "state": torch.load(run_dir / "model.pt", weights_only=True)}


def replay(previous: dict, current: dict, config, model_fn, syn, settings, unlearned: float):
    """Round `current["round"]`'s fit from `previous`'s carried defense state."""
    step = make_defense(config.defense, model_fn, *syn, settings,
                        trust_source=lambda: unlearned)
    restore_step_states({"defense": step}, {"defense": previous["steps"]["defense"]})
    if settings_after_unlearning(settings, unlearned, step.gate_finding).objective != "mm-bm":
        raise SystemExit(f"round {current['round']} overruled the fused model: its fit needs "
                         "the client ensemble, which no checkpoint keeps")
    state = step(current["round"], dict(current["state"]), [], [])
    return state, step.history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("previous", type=Path, help="checkpoint copy kept after round k-1")
    parser.add_argument("current", type=Path,
                        help="checkpoint copy kept after round k, or the finished run")
    parser.add_argument("--variants", nargs="+", default=["as-run:"],
                        help="name:key=value,... BoundSettings overrides")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config, commit = recorded_config(args.current, args.data_dir)
    base = bound_settings(config)
    variants = [parse_variant(v, base) for v in args.variants]
    previous = torch.load(args.previous / FILE, weights_only=False)
    current = round_record(args.current)
    if previous["round"] + 1 != current["round"]:
        raise SystemExit(f"the copies hold rounds {previous['round']} and {current['round']}, "
                         "not two rounds in a row")
    unlearned = float(current["rows"][-1]["fusion-unlearned-share"])
    dataset = load_dataset(config.dataset, config.data_dir)
    syn = synthetic_data(config)
    scores_of = public_and_test_scorer(config, dataset)

    def model_fn() -> torch.nn.Module:
        return build_model(config.model, config.dataset, dataset.num_classes, config.model_width)

    ran = {k: current["state"][k] for k in bound_keys(current["state"])}
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, overrides in variants:
        started = time.perf_counter()
        state, stats = replay(previous, current, config, model_fn, syn,
                              replace(base, **overrides), unlearned)
        seconds = time.perf_counter() - started
        model = load_state_with_bounds(model_fn(), state).eval()
        scores = scores_of(model)
        off = max((state[k] - ran[k]).abs().max().item() for k in ran)
        rows.append({"variant": name, "overrides": overrides, "seconds": seconds,
                     "max-bound-diff-from-run": off, **scores, **stats})
        print(name, {k: round(100 * v, 2) for k, v in scores.items()},
              {k: stats[k] for k in ("start-agreement", "agreement", "collapses", "epochs",
                                     "warm-restart")}, f"{seconds:.0f}s", flush=True)
        args.out.write_text(json.dumps({
            "previous": str(args.previous), "current": str(args.current),
            "round": current["round"], "git_commit_of_run": commit,
            "unlearned-share": unlearned, "settings": asdict(base), "rows": rows,
            "evaluated-on": "real public split and real test set",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        }, indent=1))


if __name__ == "__main__":
    main()
