"""Reproducible client sampling: nodes in partition order, whatever their random ids.

Flower gives simulated and real SuperNodes random node ids and samples them with
`random.sample(grid.get_node_ids(), k)`. With the node list in partition-id order (learnt
once through a query message) and Python's RNG seeded, the same seed samples the same
clients in every run, and replies can be aggregated in a fixed order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid


def discover_partitions(grid: Grid, min_nodes: int = 1, timeout: float = 120.0
                        ) -> dict[int, int]:
    """node id -> partition id, asked of every connected node with a query message."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in node_ids]
    partition_of = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and "metrics" in reply.content.metric_records:
            partition_of[reply.metadata.src_node_id] = int(
                reply.content["metrics"]["partition-id"])
    log(INFO, "fmfl: %s of %s nodes reported their partition", len(partition_of),
        len(node_ids))
    return partition_of


def partition_rank(partition_of: dict[int, int], node_id: int) -> tuple[int, int]:
    """Sort key: known partitions first in partition order, then unknown nodes by id."""
    return (0, partition_of[node_id]) if node_id in partition_of else (1, node_id)


class PartitionOrderedGrid:
    """A Grid whose `get_node_ids` lists nodes in partition order; the rest is delegated."""

    def __init__(self, grid: Grid, partition_of: dict[int, int]) -> None:
        self._grid = grid
        self.partition_of = partition_of

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._grid.get_node_ids(),
                      key=lambda n: partition_rank(self.partition_of, n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
