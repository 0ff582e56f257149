"""The base of the rules that work on updates (client model minus the global model sent)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class UpdateRule(FedAvg):
    """FedAvg that remembers the global model it sends, so `aggregate_train` can form updates.

    NormClip, FLAME, FoolsGold, RLR and FLTrust subclass it and override only
    `aggregate_train` (and `summary`).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.current_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model (updates are client minus global), then configure."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)
