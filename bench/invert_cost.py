"""What the trigger inversion (`bounds-invert-weight`) costs, and what fewer steps find.

Reads a finished FM-attack run's final model (`model.pt`; bounds off it is the fused
model) and its D_syn, and inverts the trigger toward the target class as the bound fit
does (`inversion.invert_trigger` on the fused model's clean-looking samples of the other
classes: those it does not send to the target), once per `--steps` value. Reports the
seconds, the share of the real public split's other-class images the inverted trigger
sends to the target, the mask's pixel mass, and how much of it lies on the attack's
real trigger (known to the bench only, never to the fit).

    python bench/invert_cost.py results/defense/attack-dirichlet-bounds-seed0 \
        --steps 50 100 200 --out bench/results/invert_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from served_vs_fused import load_run

from fmfl_flwr import attacks
from fmfl_flwr.data import to_float
from fmfl_flwr.defense.bounds import bounds_disabled
from fmfl_flwr.defense.inversion import invert_trigger
from fmfl_flwr.partition import public_split
from fmfl_flwr.training import predict_logits
from server_app import synthetic_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished FM-attack run directory (model.pt)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--samples", type=int, default=800,
                        help="D_syn samples the inversion draws its batches from")
    parser.add_argument("--data-dir", default="", help="as the run config's data-dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config, dataset, commit, model = load_run(args.run, args.data_dir)
    model.eval()
    target = config.target_label
    syn_x, _ = synthetic_data(config)
    with bounds_disabled(model):
        others = syn_x[predict_logits(model, syn_x).argmax(1) != target][: args.samples]
    public, _ = public_split(len(dataset.train_y), config.public_fraction, config.seed)
    public_x = to_float(dataset.train_x[public])
    public_x = public_x[torch.as_tensor(dataset.train_y[public]) != target]
    real = attacks.evaluation_trigger(config, dataset.image_shape).mask[0]
    rows = []
    for steps in args.steps:
        started = time.perf_counter()
        with bounds_disabled(model):
            trigger, sent = invert_trigger(model, others, target, steps, seed=config.seed)
            seconds = time.perf_counter() - started
            public_sent = (predict_logits(model, trigger.stamp(public_x)).argmax(1) == target)
        mask = trigger.mask[0]
        rows.append({"steps": steps, "seconds": seconds, "syn-sent": sent,
                     "public-sent": public_sent.float().mean().item(),
                     "mask-pixels": mask.sum().item(),
                     "mask-on-real-trigger": (mask * real).sum().item() / mask.sum().item()})
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()},
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "run": str(args.run), "git_commit": commit, "samples": len(others), "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load-average": os.getloadavg()},
    }, indent=1))


if __name__ == "__main__":
    main()
