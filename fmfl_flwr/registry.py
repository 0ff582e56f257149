"""Name -> class registries, so a new attack, rule or defense is one decorated class.

    AGGREGATIONS = Registry("aggregation")

    @AGGREGATIONS.register("flame")
    class Flame(FedAvg): ...

A wrong name fails with the key and every valid name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """A small, ordered name registry for one config key."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.key} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def add(self, name: str, obj: Any) -> None:
        """Register an object defined elsewhere (e.g. one of Flower's own strategies)."""
        self.register(name)(obj)

    def names(self) -> list[str]:
        return list(self._entries)

    def check(self, name: str) -> str:
        if name not in self._entries:
            raise ValueError(
                f"{self.key}={name!r} is not known; accepted: {', '.join(self._entries)}"
            )
        return name

    def get(self, name: str) -> Any:
        return self._entries[self.check(name)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
