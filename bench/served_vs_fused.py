"""How much of a finished run's ACC the bounds cost, and how much the fused model itself.

Every run directory holds the served global model after its last round (`model.pt`, bounds
included). With its bounds off it is the fused model of that round (the defense never
touches the weights), so one file tells the two apart. ACC on the real public split and
the real test set, ASR on the test set, both ways; a run without bounds reads the same
twice (the check that nothing else differs). Diagnosis only: no setting is chosen by it.

    python bench/served_vs_fused.py results/defense/attack-dirichlet-bounds-seed1 \
        results/defense/clean-dirichlet-none-seed1 --out bench/results/served_vs_fused.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from fmfl_flwr import attacks
from fmfl_flwr.app_config import parse_app_config
from fmfl_flwr.cli import app_defaults
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.defense.bounds import bound_keys, bounds_disabled, load_state_with_bounds
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import public_split


def recorded_config(run_dir: Path, data_dir: str):
    """A run's config as its `config.json` recorded it, and the recorded commit."""
    recorded = json.loads((run_dir / "config.json").read_text())
    defaults = app_defaults()  # keys a later commit removed do not matter to evaluation
    known = {k: v for k, v in recorded["run_config"].items() if k in defaults}
    config = parse_app_config({**defaults, **known, "data-dir": data_dir})
    return config, recorded.get("git_commit")


def load_run(run_dir: Path, data_dir: str, checkpoint: str = ""):
    """A run's config (as recorded), data set, recorded commit and served model.

    The final model (`model.pt`), or with `checkpoint` the global model a kept copy of the
    run's checkpoint holds: the model served after that checkpoint's round.
    """
    config, commit = recorded_config(run_dir, data_dir)
    dataset = load_dataset(config.dataset, config.data_dir)
    model = build_model(config.model, config.dataset, dataset.num_classes, config.model_width)
    if checkpoint:
        state = torch.load(run_dir / checkpoint, weights_only=False)["state"]
    else:
        state = torch.load(run_dir / "model.pt", weights_only=True)
    return config, dataset, commit, load_state_with_bounds(model, state)


def public_and_test_scorer(config, dataset) -> Callable[[torch.nn.Module], dict[str, float]]:
    """ACC and ASR of a model on the run's real public split and the real test set
    (keys "public-acc", "public-asr", "test-acc", "test-asr")."""
    public, _ = public_split(len(dataset.train_y), config.public_fraction, config.seed)
    splits = {"public": (to_float(dataset.train_x[public]),
                         torch.as_tensor(dataset.train_y[public])),
              "test": (to_float(dataset.test_x), torch.as_tensor(dataset.test_y))}
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)

    def scores(model: torch.nn.Module) -> dict[str, float]:
        return {f"{split}-{k}": v for split, (x, y) in splits.items()
                for k, v in acc_and_asr(model, x, y, trigger, config.target_label).items()}

    return scores


def measure(run_dir: Path, data_dir: str, checkpoint: str = "") -> dict:
    """The run's served model and the same with its bounds off, on the public split and test set."""
    config, dataset, commit, model = load_run(run_dir, data_dir, checkpoint)
    model.eval()
    scores = public_and_test_scorer(config, dataset)
    served = scores(model)
    with bounds_disabled(model):
        unbounded = scores(model)
    return {"run": str(run_dir), "checkpoint": checkpoint or None, "git_commit": commit,
            "bound-keys": len(bound_keys(model.state_dict())), "served": served,
            "unbounded": unbounded}


def run_over_runs(description: str, measure: Callable[[Path, str, str], dict],
                  line: Callable[[Path, dict], str], evaluated_on: str) -> None:
    """The command line the run benches share: `measure` each run folder, print `line`,
    and rewrite `--out` after every run, so a long bench keeps its rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with model.pt)")
    parser.add_argument("--checkpoint", default="",
                        help="read this checkpoint file in each run folder, not model.pt")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        rows.append(measure(run_dir, args.data_dir, args.checkpoint))
        print(line(run_dir, rows[-1]), flush=True)
        args.out.write_text(json.dumps({
            "rows": rows, "evaluated-on": evaluated_on,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        }, indent=1))


def main() -> None:
    def line(run_dir: Path, row: dict) -> str:
        return f"{run_dir.name} " + str({way: {k: round(100 * v, 2) for k, v in row[way].items()}
                                         for way in ("served", "unbounded")})

    run_over_runs(__doc__.splitlines()[0], measure, line, "real public split and real test set")


if __name__ == "__main__":
    main()
