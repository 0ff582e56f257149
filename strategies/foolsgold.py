"""FoolsGold [Fung et al., RAID 2020]: down-weight clients whose histories agree too well.

Paper: "The Limitations of Federated Learning in Sybil Settings",
www.usenix.org/conference/raid2020/presentation/fung (arxiv.org/abs/1808.04866)

Sybils pushing one backdoor send updates that point the same way round after round. The
server keeps each client's summed update history, computes pairwise cosine similarities of
the histories, pardons honest clients that merely resemble a suspicious one, and maps
``1 - max similarity`` through a logit to a weight in [0, 1] per client.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import NDArray
from flwr.supercore import log

from strategies.normclip import apply_update, model_updates, reply_arrays
from strategies.registry import AGGREGATIONS
from strategies.update_rule import UpdateRule


@AGGREGATIONS.register("foolsgold")
class FoolsGold(UpdateRule):
    """FoolsGold: weight each update by how unlike the other clients' histories it is.

    The new global model is ``g + sum_i a_i u_i / sum_i a_i`` with ``a_i`` from
    `foolsgold_weights` over the clients' histories (each client's updates summed over
    the rounds it took part in, keyed by node id). If every weight is 0 the float
    parameters stay unchanged.

    Parameters
    ----------
    confidence : float (default: 1.0)
        The logit's confidence kappa (run-config key `foolsgold-confidence`).
    **kwargs : Any
        Passed to `FedAvg` (sampling fractions, minimum nodes, record keys).

    Notes
    -----
    The paper uses the weights as per-client learning rates on a sum of gradients; with
    model updates the weighted sum is divided by ``sum_i a_i``, so a round of dissimilar
    clients is their plain mean. The history holds one model-sized vector per client seen.
    """

    PARAMS: ClassVar[dict[str, float]] = {"foolsgold-confidence": 1.0}

    def __init__(self, confidence: float = 1.0, **kwargs: Any) -> None:
        if confidence <= 0:
            raise ValueError(f"foolsgold-confidence must be positive, got {confidence}")
        super().__init__(**kwargs)
        self.confidence = confidence
        self.history: dict[int, NDArray] = {}

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FoolsGold settings:")
        log(INFO, "\t│\t└── Confidence: %s", self.confidence)
        super().summary()

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        checked = self.checked_replies(replies, "foolsgold")
        if checked is None:
            return None, None
        valid_replies, contents, global_arrays = checked
        records = reply_arrays(contents)
        updates = model_updates(records, global_arrays)

        node_ids = [msg.metadata.src_node_id for msg in valid_replies]
        for node_id, update in zip(node_ids, updates, strict=True):
            previous = self.history.get(node_id)
            self.history[node_id] = update.copy() if previous is None else previous + update
        weights = foolsgold_weights(np.stack([self.history[i] for i in node_ids]), self.confidence)
        log(INFO, "FoolsGold: weights %s", np.round(weights, 3).tolist())

        total = weights.sum()
        update = weights @ updates / total if total > 0 else np.zeros_like(updates[0])
        arrays = apply_update(global_arrays, update, records, weights)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


def pardoned_similarities(histories: NDArray) -> NDArray:
    """Pairwise cosine similarities of the histories, zero diagonal, with pardoning.

    Pardoning: where client i's own maximum similarity is below client j's, ``cs[i, j]`` is
    scaled by ``max_i / max_j``, so an honest client that happens to resemble a sybil is
    not punished as one.

    Parameters
    ----------
    histories : NDArray
        Shape ``(n_clients, n_parameters)``.

    Returns
    -------
    NDArray
        Shape ``(n_clients, n_clients)``.
    """
    norms = np.linalg.norm(histories, axis=1, keepdims=True)
    unit = histories / np.where(norms > 0, norms, 1.0)
    cs = (unit @ unit.T).astype(np.float64)
    np.fill_diagonal(cs, 0.0)
    max_cs = cs.max(axis=1)
    pardon = max_cs[:, None] < max_cs[None, :]
    ratio = max_cs[:, None] / np.where(max_cs[None, :] != 0, max_cs[None, :], 1.0)
    pardoned: NDArray = np.where(pardon, cs * ratio, cs)
    return pardoned


def foolsgold_weights(histories: NDArray, confidence: float = 1.0) -> NDArray:
    """FoolsGold's per-client weights in [0, 1].

    ``w_i = 1 - max_j cs[i, j]`` over the pardoned similarities, clipped to [0, 1] and
    rescaled so the largest is 1 (then set to 0.99); finally
    ``a_i = clip(confidence * (ln(w_i / (1 - w_i)) + 0.5), 0, 1)``.

    Parameters
    ----------
    histories : NDArray
        Shape ``(n_clients, n_parameters)``: each client's summed updates.
    confidence : float (default: 1.0)
        The logit's confidence kappa.

    Returns
    -------
    NDArray
        Shape ``(n_clients,)``.
    """
    if len(histories) < 2:
        return np.ones(len(histories))
    cs = pardoned_similarities(histories)
    wv = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if wv.max() == 0:
        return np.zeros(len(histories))
    wv = wv / wv.max()
    wv[wv == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = confidence * (np.log(wv / (1.0 - wv)) + 0.5)
    weights: NDArray = np.clip(np.nan_to_num(logit, neginf=0.0), 0.0, 1.0)
    return weights
