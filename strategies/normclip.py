"""Norm thresholding and weak differential privacy [Sun et al., 2019].

Paper: "Can You Really Backdoor Federated Learning?", arxiv.org/abs/1911.07963

NormThr clips each client's update (client model minus global model) to an L2 bound and
averages; weak DP is Flower's own server-side fixed clipping plus Gaussian noise around
FedAvg, reused as is.

The module also holds the update-space helpers that the other rules of this package (FLAME,
FoolsGold, RLR, FLTrust) share. Only floating-point arrays are parameters: integer buffers
(BatchNorm's `num_batches_tracked`) are never clipped, compared or noised; they are averaged
with the rule's weights and rounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any, ClassVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import NDArray
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore import log

from strategies.registry import AGGREGATIONS
from strategies.update_rule import UpdateRule


@AGGREGATIONS.register("normclip")
class NormClip(UpdateRule):
    """NormThr: clip every update to an L2 bound, then take the weighted mean.

    The new global model is ``g + sum_i n_i clip(w_i - g) / sum_i n_i`` with
    ``clip(u) = u * min(1, bound / ||u||)``, the norm taken over all floating-point arrays
    and ``n_i`` the reply's `weighted_by_key` metric (`num-examples`).

    Parameters
    ----------
    bound : float (default: 3.0)
        The L2 norm bound of each client's update (run-config key `normclip-bound`).
    **kwargs : Any
        Passed to `FedAvg` (sampling fractions, minimum nodes, record keys).
    """

    PARAMS: ClassVar[dict[str, float]] = {"normclip-bound": 3.0}

    def __init__(self, bound: float = 3.0, **kwargs: Any) -> None:
        if bound <= 0:
            raise ValueError(f"normclip-bound must be positive, got {bound}")
        super().__init__(**kwargs)
        self.bound = bound

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> NormClip settings:")
        log(INFO, "\t│\t└── Norm bound: %s", self.bound)
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        checked = self.checked_replies(replies, "normclip")
        if checked is None:
            return None, None
        _, contents, global_arrays = checked
        records = reply_arrays(contents)
        weights = reply_weights(contents, self.weighted_by_key)

        updates = clip_updates(model_updates(records, global_arrays), self.bound)
        arrays = apply_update(global_arrays, weights @ updates / weights.sum(), records, weights)

        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


@AGGREGATIONS.register("weak-dp")
class WeakDP(DifferentialPrivacyServerSideFixedClipping):
    """Weak DP: Flower's server-side fixed clipping and Gaussian noise, around FedAvg.

    Flower's wrapper clips and noises every array; this one hands it the floating-point
    arrays only (an integer step counter would dominate the update norm) and averages the
    integer buffers itself. The noise standard deviation per parameter is
    ``noise_multiplier * clipping_norm / num_sampled_clients``.

    Parameters
    ----------
    clipping_norm : float (default: 3.0)
        L2 bound of each client's update (run-config key `weak-dp-clipping-norm`).
    noise_multiplier : float (default: 0.1)
        Gaussian noise multiplier (run-config key `weak-dp-noise-multiplier`).
    num_sampled_clients : int
        Clients sampled per round; sets the noise scale. Required.
    **kwargs : Any
        Passed to the wrapped `FedAvg`.
    """

    PARAMS: ClassVar[dict[str, float]] = {
        "weak-dp-clipping-norm": 3.0,
        "weak-dp-noise-multiplier": 0.1,
    }

    def __init__(
        self,
        clipping_norm: float = 3.0,
        noise_multiplier: float = 0.1,
        num_sampled_clients: int | None = None,
        **kwargs: Any,
    ) -> None:
        if num_sampled_clients is None:
            raise ValueError(
                "aggregation='weak-dp' needs num_sampled_clients (clients per round), "
                "which sets the noise scale"
            )
        super().__init__(FedAvg(**kwargs), noise_multiplier, clipping_norm, num_sampled_clients)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average and noise the floating-point arrays; average the integer ones.

        The replies are handed to Flower's wrapper with their floating-point arrays only
        (it replaces them with clipped ones) and are restored as received afterwards.
        """
        replies = list(replies)
        if not replies or any(msg.has_error() for msg in replies) or not self.current_arrays:
            return super().aggregate_train(server_round, replies)
        contents = [msg.content for msg in replies]
        record_key = next(iter(contents[0].array_records.keys()))
        records = reply_arrays(contents)
        keys = float_keys(records[0])
        weights = reply_weights(contents, cast(FedAvg, self.strategy).weighted_by_key)
        others = apply_update(self.current_arrays, np.zeros(0), records, weights, keys=[])

        global_arrays = self.current_arrays
        self.current_arrays = ArrayRecord({k: global_arrays[k] for k in keys})
        for content, record in zip(contents, records, strict=True):
            content[record_key] = ArrayRecord({k: record[k] for k in keys})
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            self.current_arrays = global_arrays
            for content, record in zip(contents, records, strict=True):
                content[record_key] = record
        if arrays is None:
            return None, metrics
        return ArrayRecord({k: arrays[k] if k in keys else others[k] for k in records[0]}), metrics


def float_keys(arrays: ArrayRecord) -> list[str]:
    """Names of the floating-point arrays: the parameters the rules update and compare."""
    return [k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)]


def flatten(arrays: ArrayRecord, keys: list[str]) -> NDArray:
    """Concatenate the named arrays into one vector."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([arrays[k].numpy().ravel() for k in keys])


def model_updates(records: list[ArrayRecord], global_arrays: ArrayRecord) -> NDArray:
    """Stack the clients' updates: client minus global, over the floating-point arrays.

    Parameters
    ----------
    records : list[ArrayRecord]
        The client models received in the replies (all with the same keys).
    global_arrays : ArrayRecord
        The global model the clients started from.

    Returns
    -------
    NDArray
        Shape ``(n_clients, n_parameters)``, one flattened update per row, in the order of
        `float_keys(records[0])`.
    """
    if set(records[0].keys()) != set(global_arrays.keys()):
        raise ValueError("the replies' arrays do not match the global model's arrays")
    keys = float_keys(records[0])
    flat_global = flatten(global_arrays, keys)
    return np.stack([flatten(record, keys) - flat_global for record in records])


def clip_updates(updates: NDArray, bound: float | NDArray) -> NDArray:
    """Scale each update (row) down to L2 norm `bound`; shorter ones are left unchanged."""
    norms = np.linalg.norm(updates, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    clipped: NDArray = updates * scale[:, None].astype(updates.dtype)
    return clipped


def apply_update(
    global_arrays: ArrayRecord,
    update: NDArray,
    records: list[ArrayRecord],
    weights: NDArray,
    keys: list[str] | None = None,
) -> ArrayRecord:
    """Build the next global model: the global one plus `update` on the parameters.

    Parameters
    ----------
    global_arrays : ArrayRecord
        The current global model.
    update : NDArray
        The aggregated update, flattened in the order of `keys`.
    records : list[ArrayRecord]
        The client models: the first sets keys, order, shapes and dtypes; all of them give
        the weighted mean of the integer arrays.
    weights : NDArray
        One weight per record for the integer arrays; if they sum to 0 the global model's
        values are kept.
    keys : list[str] or None (default: None)
        The arrays `update` covers; None means `float_keys(records[0])`.

    Returns
    -------
    ArrayRecord
        The new global model.
    """
    template = records[0]
    keys = float_keys(template) if keys is None else keys
    total = float(np.sum(weights))
    out = ArrayRecord()
    offset = 0
    for key, array in template.items():
        dtype = np.dtype(array.dtype)
        value = global_arrays[key].numpy()
        if key in keys:
            step = update[offset : offset + value.size].reshape(value.shape)
            offset += value.size
            value = value + step
        elif total > 0 and np.issubdtype(dtype, np.number):
            mean = sum(w * r[key].numpy() for w, r in zip(weights, records, strict=True))
            value = np.rint(mean / total) if np.issubdtype(dtype, np.integer) else mean / total
        out[key] = Array(np.asarray(value).astype(dtype))
    return out


def reply_arrays(contents: list[RecordDict]) -> list[ArrayRecord]:
    """The (only) ArrayRecord of each reply, whatever its key, as Flower's rules read it."""
    key = next(iter(contents[0].array_records.keys()))
    return [cast(ArrayRecord, content[key]) for content in contents]


def reply_weights(contents: list[RecordDict], weighted_by_key: str) -> NDArray:
    """The weighting metric (e.g. `num-examples`) of each reply."""
    return np.array(
        [float(next(iter(c.metric_records.values()))[weighted_by_key]) for c in contents]  # type: ignore[arg-type]
    )
