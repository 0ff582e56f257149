"""FM-FL in one process: the ServerApp's round loop without Flower, for defense research.

Same library calls as the Flower app (partitions, client training with the served bounds,
attacks, FedAvg by sample count, pre-training, fusion, the post-fusion defense, ACC/ASR on
the real test set), minus Ray and messaging, so a setting takes minutes instead of tens of
minutes. Besides the global model it measures the pre-fusion client ensemble (mean client
logits) each round: the defense's reference is only as clean as that ensemble. Results are
indicative; the numbers to report come from `flwr run` (seeds and sampling differ).

    python bench/fmfl_loop.py --out results/loop.json   # the default experiment
    python bench/fmfl_loop.py --set defense="'none'" --out results/undefended.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fmfl_flwr import attacks
from fmfl_flwr.app_config import parse_app_config
from fmfl_flwr.cli import app_defaults, parse_overrides
from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.defense import load_state_with_bounds
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import client_indices
from fmfl_flwr.training import predict_logits
from server_app import (
    pretrain_and_defend,
    seed_everything,
    server_steps,
    step_metrics,
    synthetic_data,
)


def fedavg(states: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    return {k: sum(s[k].double() * w for s, w in zip(states, weights, strict=True))
            .div(total).to(v.dtype) for k, v in states[0].items()}


def ensemble_metrics(model_fn, states, test_x, test_y, trigger, target) -> dict[str, float]:
    """ACC and ASR of the mean client logits (each client as served, bounds on)."""
    stamped = trigger.stamp(test_x[test_y != target])
    clean, poisoned = 0, 0
    for state in states:
        model = load_state_with_bounds(model_fn(), state)
        clean = clean + predict_logits(model, test_x)
        poisoned = poisoned + predict_logits(model, stamped)
    return {"ensemble-acc": (clean.argmax(1) == test_y).float().mean().item(),
            "ensemble-asr": (poisoned.argmax(1) == target).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[],
                        help="run-config overrides key=value, values in TOML as in flwr run")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = parse_app_config({**app_defaults(), **parse_overrides(" ".join(args.set))})
    dataset = load_dataset(config.dataset, config.data_dir)
    syn = synthetic_data(config)

    def model_fn():
        return build_model(config.model, config.dataset, dataset.num_classes, config.model_width)

    seed_everything(config.seed)
    parts = [client_indices(dataset.train_y, i, args.clients, config.partition,
                            config.dirichlet_alpha, config.public_fraction, config.seed,
                            config.data_fraction) for i in range(args.clients)]
    data = [(to_float(dataset.train_x[p]), torch.as_tensor(dataset.train_y[p])) for p in parts]
    malicious = sorted(attacks.malicious_partitions(config, args.clients))
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    model = model_fn()
    fusion, defense = server_steps(config, dataset, model_fn, syn)
    if config.fusion:
        pretrain_and_defend(model, syn, fusion.settings, defense)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"round": 0, **acc_and_asr(model, test_x, test_y, trigger, config.target_label),
             **step_metrics(defense, 0, "defense")}]
    print(rows[-1], flush=True)
    rng = np.random.default_rng(config.seed)
    per_round = max(2, int(args.clients * config.fraction_train))
    for server_round in range(1, config.num_server_rounds + 1):
        started = time.perf_counter()
        chosen = sorted(rng.choice(args.clients, per_round, replace=False)) \
            if per_round < args.clients else list(range(args.clients))
        states = [client_update(config, load_state_with_bounds(model_fn(), state), *data[i],
                                dataset.image_shape, server_round, i, args.clients,
                                ClientRole(i in malicious, malicious.index(i) if i in malicious
                                           else -1, len(malicious)))[0]
                  for i in chosen]
        weights = [float(len(data[i][1])) for i in chosen]
        train_time = time.perf_counter() - started
        state = fedavg(states, weights)
        row = {"round": server_round, "train-time": train_time}
        if fusion:
            t = time.perf_counter()
            state = fusion(server_round, state, states, weights)
            row["fusion-time"] = time.perf_counter() - t
            row.update(step_metrics(fusion, server_round, "fusion"))
        if defense:
            t = time.perf_counter()
            state = defense(server_round, state, states, weights)
            row["defense-time"] = time.perf_counter() - t
            row.update(step_metrics(defense, server_round, "defense"))
        row["round-time"] = time.perf_counter() - started
        model = load_state_with_bounds(model_fn(), state)
        row.update(acc_and_asr(model, test_x, test_y, trigger, config.target_label))
        row.update(ensemble_metrics(model_fn, states, test_x, test_y, trigger,
                                    config.target_label))
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "overrides": args.set, "clients": args.clients, "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }, indent=1))


if __name__ == "__main__":
    main()
