"""What `client-distill` adds to a client's round: the served model's pass over its data.

Times `client_update` for every client of a finished run's partition, from that run's
served model, with `client-distill` 0 and the given weight, interleaved client by client
and repeated, so a busy machine slows both alike. Diagnosis of cost only: no number here
is an accuracy.

    python bench/client_distill_cost.py results/defense-s21-distill1/attack-dirichlet-bounds-seed1 \
        --weight 1.0 --repeats 3 --out bench/results/client_distill_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from served_vs_fused import load_run  # the sibling bench's loader of a finished run

from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.data import to_float
from fmfl_flwr.partition import client_indices

BENIGN = ClientRole(False, -1, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (with model.pt)")
    parser.add_argument("--weight", type=float, default=1.0, help="the client-distill weight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10,
                        help="the run's number of partitions (its SuperNodes); all are timed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.weight <= 0 or args.repeats < 1 or args.clients < 1:
        parser.error("--weight must be > 0, --repeats and --clients >= 1")

    data_dir = os.environ.get("FMFL_DATA_DIR", "")
    config, dataset, commit, served = load_run(args.run_dir, data_dir)
    settings = {0.0: replace(config, client_distill=0.0),
                args.weight: replace(config, client_distill=args.weight)}
    seconds: dict[float, list[float]] = {w: [] for w in settings}
    for repeat in range(args.repeats):
        for client in range(args.clients):
            idx = client_indices(dataset.train_y, client, args.clients, config.partition,
                                 config.dirichlet_alpha, config.public_fraction, config.seed,
                                 config.data_fraction)
            images = to_float(dataset.train_x[idx])
            labels = torch.as_tensor(dataset.train_y[idx])
            for weight, setting in settings.items():
                model = copy.deepcopy(served)
                started = time.perf_counter()
                client_update(setting, model, images, labels, dataset.image_shape, 1, client,
                              args.clients, BENIGN)
                seconds[weight].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}/{args.repeats}, client {client + 1}/{args.clients}: "
                  f"{seconds[0.0][-1]:.2f} s plain, {seconds[args.weight][-1]:.2f} s distilled",
                  flush=True)

    plain, distilled = sum(seconds[0.0]), sum(seconds[args.weight])
    result = {
        "run": str(args.run_dir), "git_commit": commit, "weight": args.weight,
        "repeats": args.repeats, "clients": args.clients,
        "seconds-plain": seconds[0.0], "seconds-distilled": seconds[args.weight],
        "total-plain": plain, "total-distilled": distilled,
        "distilled-over-plain": distilled / plain,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"client-distill={args.weight}: {distilled / plain:.3f}x the plain client time "
          f"({distilled:.1f} s vs {plain:.1f} s)")


if __name__ == "__main__":
    main()
