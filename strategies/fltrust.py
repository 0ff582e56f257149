"""FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping [Cao et al., NDSS 2021].

Paper: arxiv.org/abs/2012.13995

The server trains the global model a little on a small root data set of its own (here the
FM's synthetic data ``D_syn``) to get a root update ``g0``. Each client's update gets the
trust score ``ReLU(cos(u_i, g0))``, is rescaled to the root update's norm, and the new
update is the trust-weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import NDArray
from flwr.supercore import log

from strategies.normclip import (
    apply_update,
    flatten,
    float_keys,
    model_updates,
    reply_arrays,
)
from strategies.registry import AGGREGATIONS
from strategies.update_rule import UpdateRule

RootUpdateFn = Callable[[ArrayRecord], ArrayRecord]


@AGGREGATIONS.register("fltrust")
class FLTrust(UpdateRule):
    """FLTrust: trust-weighted mean of updates rescaled to the root update's norm.

    Parameters
    ----------
    root_update_fn : callable
        ``root_update_fn(global_arrays) -> update``: trains from the global model on the
        server's root data and returns the update (trained minus global) as an ArrayRecord
        with at least the model's floating-point arrays. Called once per round, in
        `aggregate_train`. Required.
    **kwargs : Any
        Passed to `FedAvg` (sampling fractions, minimum nodes, record keys).

    Notes
    -----
    The paper's server learning rate is 1 on updates here: the new global model is
    ``g + sum_i TS_i (||g0|| / ||u_i||) u_i / sum_i TS_i``. If no update has positive trust,
    the parameters stay unchanged.
    """

    PARAMS: ClassVar[dict[str, float]] = {}

    def __init__(self, root_update_fn: RootUpdateFn | None = None, **kwargs: Any) -> None:
        if root_update_fn is None:
            raise ValueError(
                "aggregation='fltrust' needs root_update_fn(global_arrays) -> update, "
                "the server's update on its root data"
            )
        super().__init__(**kwargs)
        self.root_update_fn = root_update_fn

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FLTrust settings:")
        log(INFO, "\t│\t└── Root update: %s", getattr(self.root_update_fn, "__name__", "?"))
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        checked = self.checked_replies(replies, "fltrust")
        if checked is None:
            return None, None
        _, contents, global_arrays = checked
        records = reply_arrays(contents)
        updates = model_updates(records, global_arrays)
        keys = float_keys(records[0])
        root_record = self.root_update_fn(global_arrays)
        missing = sorted(set(keys) - set(root_record.keys()))
        if missing:
            raise ValueError(f"root_update_fn's update lacks arrays: {', '.join(missing)}")
        root = flatten(root_record, keys)

        scores = trust_scores(updates, root)
        log(INFO, "FLTrust: trust scores %s", np.round(scores, 3).tolist())
        if scores.sum() == 0:
            log(WARNING, "FLTrust: no update has positive trust; parameters unchanged")
        arrays = apply_update(global_arrays, fltrust_update(updates, root), records, scores)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


def trust_scores(updates: NDArray, root: NDArray) -> NDArray:
    """``ReLU(cos(u_i, g0))`` for each update (row); a zero vector scores 0."""
    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(root)
    cos = (updates @ root) / np.where(norms > 0, norms, 1.0)
    scores: NDArray = np.maximum(cos, 0.0).astype(np.float64)
    return scores


def fltrust_update(updates: NDArray, root: NDArray) -> NDArray:
    """Trust-weighted mean of the updates, each rescaled to the root update's norm.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n_clients, n_parameters)``.
    root : NDArray
        The server's root update, shape ``(n_parameters,)``.

    Returns
    -------
    NDArray
        Shape ``(n_parameters,)``; zeros if no update has positive trust.
    """
    scores = trust_scores(updates, root)
    if scores.sum() == 0:
        return np.zeros_like(root)
    norms = np.linalg.norm(updates, axis=1)
    scale = np.linalg.norm(root) / np.where(norms > 0, norms, 1.0)
    aggregated: NDArray = (scores * scale) @ updates / scores.sum()
    return aggregated
