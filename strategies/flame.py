"""FLAME: Taming Backdoors in Federated Learning [Nguyen et al., USENIX Security 2022].

Paper: www.usenix.org/conference/usenixsecurity22/presentation/nguyen
(arxiv.org/abs/2101.02281)

Three steps per round: HDBSCAN on the pairwise cosine distances of the updates keeps the
majority cluster (``min_cluster_size = n // 2 + 1``); the admitted updates are clipped to
the median update norm of all clients; Gaussian noise with standard deviation
``lambda * median_norm`` is added to the aggregated model.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import NDArray
from flwr.supercore import log
from sklearn.cluster import HDBSCAN

from strategies.normclip import (
    apply_update,
    clip_updates,
    model_updates,
    reply_arrays,
)
from strategies.registry import AGGREGATIONS
from strategies.update_rule import UpdateRule


@AGGREGATIONS.register("flame")
class Flame(UpdateRule):
    """FLAME: cluster, clip to the median norm, add noise.

    Parameters
    ----------
    noise_lambda : float (default: 0.001)
        Noise level: the noise standard deviation is ``noise_lambda * median_norm``
        (run-config key `flame-noise-lambda`; the paper's value for image classification).
    seed : int or None (default: None)
        Seed of the noise generator.
    **kwargs : Any
        Passed to `FedAvg` (sampling fractions, minimum nodes, record keys).

    Notes
    -----
    As in the paper, admitted models are averaged with equal weights, not by
    `num-examples`; the paper clusters the local models, this clusters the updates (the
    models of one round are nearly parallel, their updates are not).
    """

    PARAMS: ClassVar[dict[str, float]] = {"flame-noise-lambda": 0.001}

    def __init__(self, noise_lambda: float = 0.001, seed: int | None = None, **kwargs: Any) -> None:
        if noise_lambda < 0:
            raise ValueError(f"flame-noise-lambda must be non-negative, got {noise_lambda}")
        super().__init__(**kwargs)
        self.noise_lambda = noise_lambda
        self.rng = np.random.default_rng(seed)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FLAME settings:")
        log(INFO, "\t│\t└── Noise lambda: %s", self.noise_lambda)
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        checked = self.checked_replies(replies, "flame")
        if checked is None:
            return None, None
        _, contents, global_arrays = checked
        updates = model_updates(reply_arrays(contents), global_arrays)

        admitted = select_majority_cluster(updates)
        log(INFO, "FLAME: admitted %d of %d updates", len(admitted), len(updates))
        update, median_norm = clip_to_median_and_average(updates, admitted)
        update = update + self.rng.normal(
            0.0, self.noise_lambda * median_norm, update.shape
        ).astype(update.dtype)

        admitted_contents = [contents[i] for i in admitted]
        arrays = apply_update(
            global_arrays,
            update,
            reply_arrays(admitted_contents),
            np.ones(len(admitted)),
        )
        metrics = self.train_metrics_aggr_fn(admitted_contents, self.weighted_by_key)
        return arrays, metrics


def cosine_distances(updates: NDArray) -> NDArray:
    """Pairwise ``1 - cos(u_i, u_j)``, in [0, 2]; a zero update is at distance 1."""
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    unit = updates / np.where(norms > 0, norms, 1.0)
    distances: NDArray = np.clip(1.0 - unit @ unit.T, 0.0, 2.0).astype(np.float64)
    np.fill_diagonal(distances, 0.0)
    return distances


def select_majority_cluster(updates: NDArray) -> list[int]:
    """Indices of the updates in the largest HDBSCAN cluster of cosine distances.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n_clients, n_parameters)``.

    Returns
    -------
    list[int]
        The admitted rows, in order. With fewer than 3 updates, or when HDBSCAN finds only
        noise, every update is admitted.
    """
    n = len(updates)
    if n < 3:
        return list(range(n))
    labels = (
        HDBSCAN(
            min_cluster_size=n // 2 + 1,
            min_samples=1,
            metric="precomputed",
            allow_single_cluster=True,
            copy=True,
        )
        .fit(cosine_distances(updates))
        .labels_
    )
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        log(WARNING, "FLAME: HDBSCAN found no cluster; admitting every update")
        return list(range(n))
    majority = np.bincount(clustered).argmax()
    return [i for i in range(n) if labels[i] == majority]


def clip_to_median_and_average(updates: NDArray, admitted: list[int]) -> tuple[NDArray, float]:
    """Clip the admitted updates to the median norm of all updates, and average them.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n_clients, n_parameters)``.
    admitted : list[int]
        Rows that passed the clustering.

    Returns
    -------
    tuple[NDArray, float]
        The mean of the clipped admitted updates, and the median norm (the clipping bound,
        which also scales the noise).
    """
    median_norm = float(np.median(np.linalg.norm(updates, axis=1)))
    clipped = clip_updates(updates[admitted], median_norm)
    mean: NDArray = clipped.mean(axis=0)
    return mean, median_norm
