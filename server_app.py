"""ServerApp: run config -> strategy -> rounds -> result files.

Everything that can be wrong with the configuration or the data fails here, before round 1.
"""

from __future__ import annotations

import random
import time
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fmfl_flwr import attacks
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.results import RunRecorder, resolve_output_dir
from fmfl_flwr.summary import format_table, summarise
from strategies import aggregation_params, build_aggregation
from strategies.fmfl import FMFLStrategy

AGGREGATION_KEYS = tuple(aggregation_params())
app = ServerApp()


def seed_everything(seed: int) -> None:
    """Python's RNG drives Flower's client sampling; torch and numpy drive the rest."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = ExperimentConfig.from_run_config(dict(context.run_config), AGGREGATION_KEYS)
    inner = build_aggregation(
        config.aggregation, dict(context.run_config), seed=config.seed,
        fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
    )
    dataset = load_dataset(config.dataset, config.data_dir)
    run_dir = resolve_output_dir(config.output_dir) / config.resolved_run_name()
    log(INFO, "fmfl: results go to %s", run_dir)

    seed_everything(config.seed)
    model = build_model(config.model, config.dataset, dataset.num_classes, config.model_width)
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    strategy = FMFLStrategy(inner, min_replies=config.min_replies)
    recorder = RunRecorder(run_dir, config.to_run_config())
    round_started = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal round_started
        model.load_state_dict(arrays.to_torch_state_dict())
        started = time.perf_counter()
        row = {"round": server_round, **acc_and_asr(model, test_x, test_y, trigger,
                                                    config.target_label)}
        row["eval-time"] = time.perf_counter() - started
        row["round-time"] = time.perf_counter() - round_started
        row.update(strategy.round_info.get(server_round, {}))
        if server_round > 0 and strategy.last_evaluate is not None:
            row["client-acc"] = strategy.last_evaluate.get("local-acc", float("nan"))
        recorder.log_round(row)
        round_started = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in row.items()})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"lr": config.lr}),
        evaluate_fn=evaluate,
    )
    final_state = result.arrays.to_torch_state_dict() if result.arrays is not None else \
        model.state_dict()
    summary = summarise(recorder.rows)
    path = recorder.finish(final_state, summary)
    log(INFO, "fmfl: results in %s\n%s", path, format_table([summary], ["acc", "asr"]))
