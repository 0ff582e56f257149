"""Flower simulation overhead: the same FedAvg work as a Flower run and as a plain loop.

(a) `flwr run` in simulation (via fmfl_flwr.launch), clients training in Ray actors;
(b) one Python process doing the same work: for every round, every client trains one local
epoch from the global model on its partition, the states are averaged by sample count, and
the global model is evaluated on the test set (ACC and ASR), as the ServerApp does.
Writes JSON with each round's time both ways, their ratio, and (a)'s fixed start-up cost.

    python bench/overhead.py --rounds 3 --clients 10 --out bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fmfl_flwr import attacks
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.launch import run_simulation
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import client_indices
from fmfl_flwr.training import train_epochs


def plain_loop(config: ExperimentConfig, clients: int) -> list[float]:
    """Per-round seconds of the same work in one process."""
    dataset = load_dataset(config.dataset, config.data_dir)
    parts = [client_indices(dataset.train_y, i, clients, config.partition,
                            config.dirichlet_alpha, config.public_fraction, config.seed)
             for i in range(clients)]
    data = [(to_float(dataset.train_x[p]), torch.as_tensor(dataset.train_y[p])) for p in parts]
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.dataset)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for server_round in range(1, config.num_server_rounds + 1):
        started = time.perf_counter()
        states, weights = [], []
        for i, (x, y) in enumerate(data):
            model.load_state_dict(global_state)
            train_epochs(model, x, y, config.local_epochs, config.batch_size, config.lr,
                         seed=server_round * 1009 + i, momentum=config.momentum)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            weights.append(len(y))
        total = sum(weights)
        global_state = {k: sum(s[k].double() * w for s, w in zip(states, weights, strict=True))
                        .div(total).to(v.dtype) for k, v in global_state.items()}
        model.load_state_dict(global_state)
        acc_and_asr(model, test_x, test_y, trigger, config.target_label)
        times.append(time.perf_counter() - started)
    return times


def flower_run(run_config: dict, clients: int, workdir: Path) -> tuple[list[float], float]:
    """Per-round seconds of `flwr run`, and its wall time outside the rounds (start-up)."""
    started = time.perf_counter()
    code = run_simulation({**run_config, "output-dir": str(workdir), "run-name": "bench"},
                          num_supernodes=clients, log_path=workdir / "flwr.log")
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"flwr run failed ({code}); see {workdir / 'flwr.log'}")
    with (workdir / "bench" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rounds = [float(r["round-time"]) for r in rows[1:]]
    return rounds, wall - sum(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    run_config = {"num-server-rounds": args.rounds, "fraction-evaluate": 0.0}
    config = ExperimentConfig.from_run_config(run_config)
    with tempfile.TemporaryDirectory() as tmp:
        flower_rounds, startup = flower_run(run_config, args.clients, Path(tmp))
    plain_rounds = plain_loop(config, args.clients)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads_plain": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "clients": args.clients, "rounds": args.rounds,
        "flower_round_s": flower_rounds, "plain_round_s": plain_rounds,
        "ratio_per_round": [f / p for f, p in zip(flower_rounds, plain_rounds, strict=True)],
        "flower_startup_s": startup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
