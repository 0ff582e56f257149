"""The base of the rules that work on updates (client model minus the global model sent)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class UpdateRule(FedAvg):
    """FedAvg that remembers the global model it sends, so `aggregate_train` can form updates.

    NormClip, FLAME, FoolsGold, RLR and FLTrust subclass it and override only
    `aggregate_train` (and `summary`), which starts from `checked_replies`.
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

    def checked_replies(
        self, replies: Iterable[Message], rule: str
    ) -> tuple[list[Message], list[RecordDict], ArrayRecord] | None:
        """(valid replies, their contents, the global model sent), or None without replies."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None
        contents = [msg.content for msg in valid_replies]
        return valid_replies, contents, require_global(self.current_arrays, rule)


def require_global(arrays: ArrayRecord | None, rule: str) -> ArrayRecord:
    """The global model captured by `configure_train`, or a clear error without one."""
    if arrays is None:
        raise RuntimeError(
            f"aggregation={rule!r} needs the global model: call configure_train (or set "
            "`current_arrays`) before aggregate_train"
        )
    return arrays
