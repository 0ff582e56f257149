"""Data-free activation upper bounds against backdoors (METHOD.md 3), on plain tensors.

`bounds` makes any ReLU network bounded, `optimise` fits the bounds on D_syn with the
weights frozen, `objectives` holds what they are fitted to, `pruning` is the Fine-Pruning
baseline as a bound mask, `steps` turns each into a post-fusion server step by name, and
`detection` flags triggered inputs at test time from the bounds. See docs/defense.md.
"""

from fmfl_flwr.defense.bounds import (
    BOUND_BUFFER,
    UNBOUNDED,
    BoundedReLU,
    attach_bounds,
    bound_keys,
    bounded_layers,
    bounds_disabled,
    ensure_bounds_for_state,
    get_bounds,
    load_state_with_bounds,
    set_bounds,
    strip_bounds,
)
from fmfl_flwr.defense.detection import TriggerDetector, margin_drop
from fmfl_flwr.defense.objectives import OBJECTIVES
from fmfl_flwr.defense.optimise import BoundSettings, optimise_bounds, quantile_bounds
from fmfl_flwr.defense.pruning import prune_dormant
from fmfl_flwr.defense.steps import DEFENSES, BoundsStep, PruningStep, make_defense

__all__ = [
    "BOUND_BUFFER",
    "DEFENSES",
    "OBJECTIVES",
    "UNBOUNDED",
    "BoundSettings",
    "BoundedReLU",
    "BoundsStep",
    "PruningStep",
    "TriggerDetector",
    "attach_bounds",
    "bound_keys",
    "bounded_layers",
    "bounds_disabled",
    "ensure_bounds_for_state",
    "get_bounds",
    "load_state_with_bounds",
    "make_defense",
    "margin_drop",
    "optimise_bounds",
    "prune_dormant",
    "quantile_bounds",
    "set_bounds",
    "strip_bounds",
]
