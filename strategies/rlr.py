"""Robust learning rate (RLR) [Ozdayi et al., AAAI 2021].

Paper: "Defending against Backdoors in Federated Learning with Robust Learning Rate",
arxiv.org/abs/2007.03767

For every parameter the server counts the signs of the clients' updates. Where the
agreement ``|sum_i sign(u_i)|`` reaches the threshold the server steps with learning rate
``+lr``; where it does not, with ``-lr``, moving away from the direction few clients agree on
(a backdoor's, typically).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import NDArray
from flwr.supercore import log

from strategies.normclip import (
    apply_update,
    model_updates,
    reply_arrays,
    reply_weights,
)
from strategies.registry import AGGREGATIONS
from strategies.update_rule import UpdateRule


@AGGREGATIONS.register("rlr")
class RobustLR(UpdateRule):
    """RLR: FedAvg whose server learning rate flips sign where the clients disagree.

    The new global model is ``g + lr_vector * sum_i n_i u_i / sum_i n_i`` with
    ``lr_vector`` from `robust_learning_rates` and ``n_i`` the `num-examples` weights.

    Parameters
    ----------
    threshold : float (default: 4.0)
        Minimum sign agreement ``|sum_i sign(u_i)|`` for a positive learning rate
        (run-config key `rlr-threshold`). It must not exceed the number of clients per
        round, or every learning rate is negative.
    server_lr : float (default: 1.0)
        Magnitude of the server learning rate (run-config key `rlr-server-lr`).
    **kwargs : Any
        Passed to `FedAvg` (sampling fractions, minimum nodes, record keys).
    """

    PARAMS: ClassVar[dict[str, float]] = {"rlr-threshold": 4.0, "rlr-server-lr": 1.0}

    def __init__(self, threshold: float = 4.0, server_lr: float = 1.0, **kwargs: Any) -> None:
        if threshold < 0 or server_lr <= 0:
            raise ValueError("rlr-threshold must be non-negative and rlr-server-lr positive")
        super().__init__(**kwargs)
        self.threshold = threshold
        self.server_lr = server_lr

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> RLR settings:")
        log(INFO, "\t│\t├── Sign-agreement threshold: %s", self.threshold)
        log(INFO, "\t│\t└── Server learning rate: %s", self.server_lr)
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        checked = self.checked_replies(replies, "rlr")
        if checked is None:
            return None, None
        _, contents, global_arrays = checked
        records = reply_arrays(contents)
        weights = reply_weights(contents, self.weighted_by_key)
        updates = model_updates(records, global_arrays)
        if self.threshold > len(updates):
            log(
                WARNING,
                "RLR: threshold %s exceeds the %d replies; every learning rate is negative",
                self.threshold,
                len(updates),
            )

        lr = robust_learning_rates(updates, self.threshold, self.server_lr)
        log(INFO, "RLR: learning rate flipped on %.1f%% of parameters", 100 * np.mean(lr < 0))
        update = lr * (weights @ updates / weights.sum())
        arrays = apply_update(global_arrays, update, records, weights)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


def robust_learning_rates(updates: NDArray, threshold: float, server_lr: float) -> NDArray:
    """Per-parameter server learning rate: ``+lr`` where enough signs agree, else ``-lr``.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n_clients, n_parameters)``.
    threshold : float
        Minimum ``|sum_i sign(u_i)|`` for ``+server_lr``.
    server_lr : float
        Magnitude of the learning rate.

    Returns
    -------
    NDArray
        Shape ``(n_parameters,)``.
    """
    agreement = np.abs(np.sign(updates).sum(axis=0))
    lr: NDArray = np.where(agreement >= threshold, server_lr, -server_lr)
    return lr
