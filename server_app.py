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
from fmfl_flwr.app_config import (
    bound_settings,
    fusion_settings,
    parse_app_config,
    with_default_fm,
)
from fmfl_flwr.checkpoint import FILE as CHECKPOINT_FILE
from fmfl_flwr.checkpoint import FINAL_FILE as FINAL_CHECKPOINT_FILE
from fmfl_flwr.checkpoint import (
    load_checkpoint,
    restore_rng_states,
    restore_rule_state,
    restore_step_states,
    save_checkpoint,
)
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.defense import bound_keys, bounds_disabled, ensure_bounds_for_state, make_defense
from fmfl_flwr.foundation import synthetic_set_for_config
from fmfl_flwr.foundation.intake import capped_to_request
from fmfl_flwr.fusion import Fusion
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import public_split
from fmfl_flwr.pretrain_cache import default_root as pretrain_cache_root
from fmfl_flwr.pretrain_cache import pretrain_cached
from fmfl_flwr.results import RunRecorder, resolve_output_dir
from fmfl_flwr.summary import format_table, summarise
from fmfl_flwr.training import train_epochs
from strategies import build_aggregation
from strategies.fmfl import FMFLStrategy
from strategies.node_order import PartitionOrderedGrid, discover_partitions

app = ServerApp()
ROOT_SAMPLES = 1000  # FLTrust's root set: a small clean set in the paper (100-500)


def seed_everything(seed: int) -> None:
    """Python's RNG drives Flower's client sampling; torch and numpy drive the rest."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synthetic_data(config: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """D_syn from the FM when anything on the server uses it, else None."""
    if not (config.fusion or config.aggregation == "fltrust" or config.defense != "none"):
        return None
    syn = synthetic_set_for_config(with_default_fm(config))
    return syn.images, syn.labels


def capped_synthetic_data(config: ExperimentConfig, syn):
    """(D_syn for the server's steps, D_syn for pre-training, rows dropped) under
    `syn-label-cap`: `pretrain` cuts pre-training's copy to `syn-per-class` rows per label,
    `all` every step's; `off` keeps what the FM returned."""
    if syn is None or config.syn_label_cap == "off":
        return syn, syn, 0
    capped_x, capped_y, dropped = capped_to_request(*syn, config.syn_per_class, config.seed)
    log(INFO, "fmfl: syn-label-cap=%s keeps %d of %d D_syn rows (dropped per label: %s)",
        config.syn_label_cap, len(capped_y), len(syn[1]), dropped or "none")
    capped = (capped_x, capped_y)
    return (capped if config.syn_label_cap == "all" else syn), capped, sum(dropped.values())


def fltrust_root_update(config: ExperimentConfig, model_fn, syn_x: torch.Tensor,
                        syn_y: torch.Tensor):
    """FLTrust's server update: one epoch from the global model on a seeded D_syn subset."""
    subset = torch.randperm(len(syn_x), generator=torch.Generator().manual_seed(config.seed))
    subset = subset[:ROOT_SAMPLES]

    def root_update(arrays: ArrayRecord) -> ArrayRecord:
        model = model_fn()
        start = arrays.to_torch_state_dict()
        model.load_state_dict(start)
        train_epochs(model, syn_x[subset], syn_y[subset], 1, config.batch_size, config.lr,
                     config.seed, momentum=config.momentum)
        trained = model.state_dict()
        return ArrayRecord({k: (trained[k].cpu() - v) for k, v in start.items()
                            if v.is_floating_point()})

    return root_update


def defense_step(config: ExperimentConfig, dataset, model_fn, syn, fusion: Fusion | None):
    """The post-fusion defense named by the config (None for "none").

    It reuses fusion's client-ensemble logits on D_syn when fusion runs; the oracle fits
    on the real public split, which no client trains on and the test set does not touch.
    """
    if config.defense == "none":
        return None
    public, _ = public_split(len(dataset.train_y), config.public_fraction, config.seed)
    return make_defense(
        config.defense, model_fn, *syn, bound_settings(config),
        clean_x=to_float(dataset.train_x[public]),
        clean_y=torch.as_tensor(dataset.train_y[public]),
        ensemble_source=(lambda: fusion.last_ensemble_logits) if fusion else None,
        trust_source=(lambda: fusion.unlearned_share) if fusion else None,
    )


def server_steps(config: ExperimentConfig, dataset, model_fn, syn):
    """FM-FL fusion (None without it) and the post-fusion defense (None for "none").

    Each reads the other's latest output: the defense the ensemble logits fusion computed
    and the share of D_syn it unlearned, fusion (with `distill-relabel-target` or
    `distill-unlearn-poison`) the target the defense's gate named.
    """
    fusion = Fusion(model_fn, *syn, fusion_settings(config),
                    target_source=lambda: defense.named_target) if config.fusion else None
    defense = defense_step(config, dataset, model_fn, syn, fusion)
    return fusion, defense


def pretrain_and_defend(model: torch.nn.Module, syn, settings, defense) -> float:
    """Round 0: pre-train on D_syn, then defend the result before any client receives it.

    Pre-training learns whatever D_syn carries, a poisoned share included, and there is no
    client ensemble yet: the defense runs on its own (bounds: MM-BM with the trimmed share).
    Returns the pre-training seconds (a cache hit's load time when this exact training ran
    before: `pretrain_cache`); the defense's own time is in its history.
    """
    started = time.perf_counter()

    def progress(epoch: int, loss: float) -> None:
        log(INFO, "fmfl: pre-training on D_syn, epoch %d/%d, loss %.4f (%.0f s)", epoch,
            settings.pretrain_epochs, loss, time.perf_counter() - started)

    if pretrain_cached(model, *syn, settings, on_epoch=progress):
        log(INFO, "fmfl: pre-trained model from the cache (%s)", pretrain_cache_root())
    seconds = time.perf_counter() - started
    if defense is not None:
        state = defense(0, dict(model.state_dict()), [], [])
        ensure_bounds_for_state(model, state).load_state_dict(state)
    return seconds


def step_metrics(step, server_round: int, prefix: str) -> dict[str, float]:
    """A server step's stats for `server_round`, as `<prefix>-<stat>` columns."""
    for entry in reversed(getattr(step, "history", [])):
        if entry.get("round") == server_round:
            return {f"{prefix}-{k}": v for k, v in entry.items() if k != "round"}
    return {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    config = parse_app_config(run_config)
    dataset = load_dataset(config.dataset, config.data_dir)
    syn, pretrain_syn, syn_dropped = capped_synthetic_data(config, synthetic_data(config))

    def model_fn() -> torch.nn.Module:
        return build_model(config.model, config.dataset, dataset.num_classes, config.model_width)

    num_nodes = len(list(grid.get_node_ids()))
    inner = build_aggregation(
        config.aggregation, run_config, seed=config.seed,
        num_sampled_clients=max(2, int(num_nodes * config.fraction_train)),
        root_update_fn=fltrust_root_update(config, model_fn, *syn) if syn else None,
        fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
    )
    run_dir = resolve_output_dir(config.output_dir) / config.resolved_run_name()
    resumed = load_checkpoint(run_dir, run_config, num_nodes)
    log(INFO, "fmfl: results go to %s%s", run_dir,
        f" (resuming after round {resumed['round']})" if resumed else "")
    recorder = RunRecorder(run_dir, run_config, rows=resumed["rows"] if resumed else None)

    seed_everything(config.seed)
    model = model_fn()
    fusion, defense = server_steps(config, dataset, model_fn, syn)
    steps = {"fusion": fusion, "defense": defense}
    pretrain_time = 0.0
    if resumed:
        ensure_bounds_for_state(model, resumed["state"]).load_state_dict(resumed["state"])
        restore_rule_state(inner, resumed["rule"])
        restore_step_states(steps, resumed.get("steps", {}))  # older checkpoints: none
        restore_rng_states(resumed["rng"])
    elif config.fusion:
        pretrain_time = pretrain_and_defend(model, pretrain_syn, fusion.settings, defense)
    done = resumed["round"] if resumed else 0
    strategy = FMFLStrategy(
        inner, fusion=fusion, post_fusion=[(config.defense, defense)] if defense else [],
        min_replies=config.min_replies, round_offset=done,
        partition_of=discover_partitions(grid, min_nodes=2, timeout=config.round_timeout))
    test_x, test_y = to_float(dataset.test_x), torch.as_tensor(dataset.test_y)
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)
    round_started = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal round_started
        server_round += done
        state = arrays.to_torch_state_dict()
        if resumed and server_round == done:  # the checkpoint's round, already recorded
            return MetricRecord({k: float(v) for k, v in recorder.rows[-1].items()})
        ensure_bounds_for_state(model, state).load_state_dict(state)
        started = time.perf_counter()
        row = {"round": server_round, **acc_and_asr(model, test_x, test_y, trigger,
                                                    config.target_label)}
        row["eval-time"] = time.perf_counter() - started
        row["round-time"] = time.perf_counter() - round_started
        if config.eval_unbounded and bound_keys(state):  # outside the round's time
            with bounds_disabled(model):
                unbounded = acc_and_asr(model, test_x, test_y, trigger, config.target_label)
            row.update({f"{k}-unbounded": v for k, v in unbounded.items()})
        if server_round == 0:
            row["pretrain-time"] = pretrain_time
            if config.syn_label_cap != "off":
                row["syn-dropped-rows"] = syn_dropped
        row.update(strategy.round_info.get(server_round, {}))
        row.update(step_metrics(fusion, server_round, "fusion"))
        row.update(step_metrics(defense, server_round, "defense"))
        if server_round > 0 and strategy.last_evaluate is not None:
            row["client-acc"] = strategy.last_evaluate.get("local-acc", float("nan"))
        # Checkpoint first: metrics.csv never shows a round the checkpoint lacks.
        save_checkpoint(run_dir, server_round, state, [*recorder.rows, row], run_config,
                        strategy.inner, steps, num_nodes)
        recorder.log_round(row)
        round_started = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in row.items()})

    result = strategy.start(
        grid=PartitionOrderedGrid(grid, strategy.partition_of),
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config.num_server_rounds - done,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"lr": config.lr}),
        evaluate_fn=evaluate,
    )
    final_state = result.arrays.to_torch_state_dict() if result.arrays is not None else \
        model.state_dict()
    summary = summarise(recorder.rows)
    path = recorder.finish(final_state, summary)
    if (run_dir / CHECKPOINT_FILE).exists():  # kept, so `fmfl extend` can run more rounds
        (run_dir / CHECKPOINT_FILE).replace(run_dir / FINAL_CHECKPOINT_FILE)
    log(INFO, "fmfl: results in %s\n%s", path, format_table([summary], ["acc", "asr"]))
