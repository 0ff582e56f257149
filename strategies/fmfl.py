"""FM-FL: any aggregation rule, then fusion and post-fusion defenses on the server.

Wraps an inner Flower strategy (FedAvg, Krum, FLAME, ...). Each round it
1. rejects broken replies (errors, missing keys, wrong shapes, NaN/Inf) so they are never
   aggregated and never crash the server, and skips the update below `min_replies`;
2. puts the activation bounds it served back into every reply and the aggregate: they are
   the server's, and a client that raised its own would loosen the aggregate's and bring
   its unbounded model into fusion's teacher;
3. lets the inner rule aggregate what is left;
4. runs the server-side steps on plain state dicts: FM-FL fusion (distil the client
   ensemble into the aggregate on D_syn) and then the post-fusion hooks (defenses).
Times of each phase and the counts of rejected replies and of replies whose bounds were
reset go into the round's metrics; each phase is logged as it ends (fusion and the bounds
take minutes a round on CIFAR-10 on a CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fmfl_flwr.defense.bounds import bound_keys
from strategies.node_order import partition_rank

StateDict = dict[str, torch.Tensor]
# (server_round, aggregate, client states, client weights) -> new global state
ServerStep = Callable[[int, StateDict, list[StateDict], list[float]], StateDict]


def reply_problem(content_arrays: ArrayRecord | None, reference: StateDict) -> str:
    """Why a client's arrays cannot be aggregated, or '' when they can."""
    if content_arrays is None:
        return "no arrays"
    try:
        state = content_arrays.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - any decoding failure is a broken reply
        return f"undecodable arrays ({err})"
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            return f"shape of {key} is {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            return f"non-finite values in {key}"
    return ""


def pin_served_bounds(record: ArrayRecord, served_bounds: StateDict) -> bool:
    """Write the served bounds over a reply's own, in place; True if the reply had changed them."""
    changed = False
    for key, bound in served_bounds.items():
        value = bound.numpy()
        if not np.array_equal(record[key].numpy(), value):
            record[key] = Array(value)
            changed = True
    return changed


def num_examples(content: RecordDict) -> float:
    """A reply's `num-examples` if it is a finite positive number, else 0."""
    metrics = content.metric_records.get("metrics")
    value = metrics.get("num-examples") if metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def normalise_contents(replies: list[Message], with_arrays: bool) -> None:
    """Keep one ArrayRecord and the metrics every reply has: rules average them key-wise."""
    if not replies:
        return
    shared = set.intersection(*(set(m.content["metrics"]) for m in replies))
    for msg in replies:
        metrics = msg.content["metrics"]
        records = {"metrics": MetricRecord({k: metrics[k] for k in metrics if k in shared})}
        if with_arrays:
            records["arrays"] = msg.content["arrays"]
        msg.content = RecordDict(records)


class FMFLStrategy(Strategy):
    """Inner aggregation rule plus server-side fusion and defense steps.

    Parameters
    ----------
    inner : Strategy
        The aggregation rule (any Flower strategy that aggregates ArrayRecords).
    fusion : ServerStep, optional
        FM-FL fusion; None for plain FL.
    post_fusion : list of (name, ServerStep)
        Defenses applied after fusion, in order.
    min_replies : int
        Fewer valid replies than this keep last round's global model.
    partition_of : dict, optional
        node id -> partition id; replies are aggregated in partition order, so the
        floating-point sums do not depend on which client answered first.
    round_offset : int
        Rounds already done before this `start` (a resumed run): the inner rule and the
        clients see the true round number.
    """

    def __init__(self, inner: Strategy, fusion: ServerStep | None = None,
                 post_fusion: list[tuple[str, ServerStep]] | None = None,
                 min_replies: int = 1, partition_of: dict[int, int] | None = None,
                 round_offset: int = 0) -> None:
        self.inner = inner
        self.fusion = fusion
        self.post_fusion = post_fusion or []
        self.min_replies = min_replies
        self.partition_of = partition_of or {}
        self.round_offset = round_offset
        self._sent: StateDict = {}
        self._sent_bounds: StateDict = {}
        self._expected = 0
        self.last_evaluate: MetricRecord | None = None
        self.round_info: dict[int, dict[str, float]] = {}

    def summary(self) -> None:
        log(INFO, "\t├── FM-FL fusion: %s", "on" if self.fusion else "off")
        log(INFO, "\t├── Post-fusion defenses: %s", [n for n, _ in self.post_fusion] or "none")
        log(INFO, "\t└── Inner aggregation rule: %s", type(self.inner).__name__)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays.to_torch_state_dict()
        self._sent_bounds = {k: self._sent[k] for k in bound_keys(self._sent)}
        messages = list(self.inner.configure_train(server_round + self.round_offset, arrays,
                                                   config, grid))
        self._expected = len(messages)
        return messages

    def _valid_replies(self, replies: Iterable[Message], with_arrays: bool = True
                       ) -> tuple[list[Message], int]:
        """Replies fit to aggregate, in partition order, reduced to what rules read."""
        valid, rejected = [], 0
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                rejected += 1
                log(WARNING, "Reply from node %s failed: %s", msg.metadata.src_node_id,
                    msg.error.reason if msg.has_error() else "no content")
                continue
            problem = "" if num_examples(msg.content) else \
                "num-examples missing, not finite or not positive"
            if not problem and with_arrays:
                problem = reply_problem(msg.content.array_records.get("arrays"), self._sent)
            if problem:
                rejected += 1
                log(WARNING, "Rejected reply from node %s: %s", msg.metadata.src_node_id,
                    problem)
            else:
                valid.append(msg)
        valid.sort(key=lambda m: partition_rank(self.partition_of, m.metadata.src_node_id))
        normalise_contents(valid, with_arrays)
        return valid, rejected

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        valid, rejected = self._valid_replies(replies)
        reset = sum(pin_served_bounds(m.content["arrays"], self._sent_bounds) for m in valid)
        info = {"replies": float(len(valid)), "rejected-replies": float(rejected),
                "bounds-reset-replies": float(reset),
                "missing-replies": float(max(0, self._expected - len(replies))),
                "aggregation-time": 0.0, "fusion-time": 0.0, "defense-time": 0.0}
        self.round_info[server_round] = info
        if len(valid) < self.min_replies:
            log(WARNING, "Round %s: %s valid replies < min-replies %s; global model kept",
                server_round, len(valid), self.min_replies)
            return None, None
        # Read the client models first: some of Flower's rules (FedMedian, FedTrimmedAvg)
        # consume the replies' arrays while aggregating.
        clients, weights = [], []
        if self.fusion or self.post_fusion:
            clients = [m.content["arrays"].to_torch_state_dict() for m in valid]
            weights = [float(m.content["metrics"]["num-examples"]) for m in valid]
        started = time.perf_counter()
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        info["aggregation-time"] = time.perf_counter() - started
        if metrics is not None:
            info.update({f"client-{k}": float(v) for k, v in metrics.items()
                         if k in ("train-time", "train-loss")})
        if arrays is None:
            return None, metrics
        # Exactly the served bounds: a weighted mean of equal values can be off in the last bit.
        state = {**arrays.to_torch_state_dict(), **self._sent_bounds}
        log(INFO, "fmfl: round %s: aggregated %s replies (%.1f s)", server_round, len(valid),
            info["aggregation-time"])
        if self.fusion:
            started = time.perf_counter()
            state = self.fusion(server_round, state, clients, weights)
            info["fusion-time"] = time.perf_counter() - started
            log(INFO, "fmfl: round %s: fusion (%.1f s)", server_round, info["fusion-time"])
        for name, step in self.post_fusion:
            started = time.perf_counter()
            state = step(server_round, state, clients, weights)
            seconds = time.perf_counter() - started
            info["defense-time"] += seconds
            log(INFO, "fmfl: round %s: %s (%.1f s)", server_round, name, seconds)
        return ArrayRecord(state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config,
                                             grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        valid, _ = self._valid_replies(replies, with_arrays=False)
        self.last_evaluate = self.inner.aggregate_evaluate(server_round + self.round_offset,
                                                           valid)
        return self.last_evaluate
