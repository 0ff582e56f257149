"""Splitting the training set: a public share for the server's FM, the rest over clients.

The client split reuses flwr-datasets' partitioners on an index-and-label table, so the
images themselves never leave numpy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PARTITIONS = ("iid", "dirichlet")


def public_split(num_train: int, public_fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (public, private): the public share trains the FM and no client sees it."""
    order = np.random.default_rng(seed).permutation(num_train)
    n_public = int(round(num_train * public_fraction))
    return np.sort(order[:n_public]), np.sort(order[n_public:])


@lru_cache(maxsize=8)
def _partition_all(
    labels_key: bytes, partition: str, num_partitions: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = np.frombuffer(labels_key, dtype=np.int64)
    table = Dataset.from_dict({"position": np.arange(len(labels)), "label": labels})
    if partition == "iid":
        # IidPartitioner splits in order: shuffle first so clients get a seeded mix.
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    parts = tuple(
        np.sort(np.asarray(partitioner.load_partition(i)["position"], dtype=np.int64))
        for i in range(num_partitions)
    )
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"partition left clients {empty} empty; use fewer clients or larger alpha")
    return parts


def partition_indices(
    labels: np.ndarray, partition: str, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Positions into `labels` for every client; deterministic given the arguments."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is not known; accepted: {', '.join(PARTITIONS)}")
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return list(_partition_all(labels.tobytes(), partition, num_partitions, float(alpha), seed))


def client_indices(
    train_labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    partition: str,
    alpha: float,
    public_fraction: float,
    seed: int,
    data_fraction: float = 1.0,
) -> np.ndarray:
    """Training-set indices of one client: its share of the non-public part.

    `data_fraction` < 1 keeps a seeded share of it (at least one sample), for quick runs.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    _, private = public_split(len(train_labels), public_fraction, seed)
    parts = partition_indices(train_labels[private], partition, num_partitions, alpha, seed)
    mine = private[parts[partition_id]]
    if data_fraction < 1.0:
        keep = max(1, int(round(len(mine) * data_fraction)))
        mine = np.sort(np.random.default_rng([seed, partition_id]).permutation(mine)[:keep])
    return mine
