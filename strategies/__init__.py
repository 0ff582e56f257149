"""Aggregation rules: Flower's own strategies by name, and the defenses Flower lacks.

Importing the package registers every rule in `AGGREGATIONS`, in the order of CONTRACT.md.
"""

from strategies.registry import AGGREGATIONS, aggregation_params, build_aggregation

# isort: off
from strategies import normclip, flame, foolsgold, rlr, fltrust  # noqa: F401  (registers)
# isort: on

__all__ = ["AGGREGATIONS", "aggregation_params", "build_aggregation"]
