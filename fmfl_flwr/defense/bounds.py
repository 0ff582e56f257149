"""The bounded model: `min(relu(x), Z)` after chosen ReLUs, with Z a buffer in the state.

Each chosen `nn.ReLU` module is swapped for a `BoundedReLU` that holds its bound as the
buffer `act_bound`, so the bounds are part of `state_dict()`, travel in Flower's
ArrayRecord to clients and evaluation, and are never touched by an optimiser of the
weights. A fresh bound is a scalar `UNBOUNDED` (finite, so replies pass the strategy's
finiteness check and weighted averages cannot overflow); it takes the per-channel shape
([C, 1, 1] after a conv, [F] after a linear layer) when the defense sets it or when a
state with shaped bounds is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

BOUND_BUFFER = "act_bound"
# Larger than any activation, small enough that 1e30 * sum(weights) stays finite in float32.
UNBOUNDED = 1e30


class BoundedReLU(nn.ReLU):
    """ReLU followed by a per-channel upper bound (a subclass, so `relu_names` still sees it)."""

    def __init__(self, inplace: bool = False, value: float = UNBOUNDED) -> None:
        super().__init__(inplace=inplace)
        self.register_buffer(BOUND_BUFFER, torch.tensor(float(value)))
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.minimum(out, self.act_bound) if self.active else out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Take the incoming bound's shape: a fresh model's scalar bound accepts per-channel ones.
        incoming = state_dict.get(prefix + BOUND_BUFFER)
        if incoming is not None and incoming.shape != self.act_bound.shape:
            self.act_bound = torch.empty_like(incoming, device=self.act_bound.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def bound_shape(activation: torch.Tensor) -> tuple[int, ...]:
    """Per-channel bound shape for a batch of activations [N, C, ...]: [C, 1, ...]."""
    return (activation.shape[1],) + (1,) * (activation.dim() - 2)


def attach_bounds(
    model: nn.Module, layers: Iterable[str] | None = None, value: float = UNBOUNDED
) -> nn.Module:
    """Swap the named ReLU modules (all by default) for `BoundedReLU`, in place.

    Already bounded layers are kept as they are, so attaching twice is harmless.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    chosen = names if layers is None else list(layers)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(
            f"bounds asked for {unknown}, which are not ReLU modules; ReLUs: {', '.join(names)}"
        )
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, BoundedReLU):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bounded = BoundedReLU(module.inplace, value)
        reference = next(model.parameters(), None)
        if reference is not None:
            bounded.to(reference.device)
        setattr(parent, child, bounded)
    return model


def bounded_layers(model: nn.Module) -> dict[str, BoundedReLU]:
    """Every bounded layer by qualified name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoundedReLU)}


def bound_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """State-dict keys that hold bounds."""
    suffix = "." + BOUND_BUFFER
    return [k for k in state if k.endswith(suffix) or k == BOUND_BUFFER]


def get_bounds(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the bounds, keyed as in `state_dict()`."""
    return {
        f"{n}.{BOUND_BUFFER}": m.act_bound.detach().clone()
        for n, m in bounded_layers(model).items()
    }


def set_bounds(model: nn.Module, bounds: dict[str, torch.Tensor]) -> nn.Module:
    """Load bounds (state-dict keys) into an already bounded model, taking their shapes."""
    layers = bounded_layers(model)
    for key, value in bounds.items():
        layer = layers[key[: -len(BOUND_BUFFER) - 1]]
        layer.act_bound = value.detach().clone().to(layer.act_bound)
    return model


def ensure_bounds_for_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Attach bounds to `model` where `state` carries them, so `load_state_dict(state)` fits.

    Clients and evaluation call this on a freshly built model before loading a global
    state; with no bound keys in the state the model is returned unchanged.
    """
    layers = [k[: -len(BOUND_BUFFER) - 1] for k in bound_keys(state)]
    return attach_bounds(model, layers) if layers else model


def load_state_with_bounds(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`ensure_bounds_for_state`, then load; bounds the state lacks stay unbounded.

    The one call clients, fusion and evaluation need, whether or not the model or the
    state is bounded; any other mismatch still fails as in a strict load.
    """
    ensure_bounds_for_state(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if k not in bound_keys({k: None})] + list(unexpected)
    if wrong:
        raise RuntimeError(f"state does not fit the model: {wrong[:5]}")
    for name, layer in bounded_layers(model).items():
        if f"{name}.{BOUND_BUFFER}" in missing:
            layer.act_bound = torch.tensor(UNBOUNDED, device=layer.act_bound.device)
    return model


def strip_bounds(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without its bounds: the plain weights of the fused model."""
    drop = set(bound_keys(state))
    return {k: v for k, v in state.items() if k not in drop}


@contextmanager
def bounds_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as if unbounded (the bounds stay in its state), e.g. for local training."""
    layers = list(bounded_layers(model).values())
    previous = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield model
    finally:
        for m, flag in zip(layers, previous, strict=True):
            m.active = flag


@contextmanager
def weights_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model with no parameter requiring gradients, restored after: fits over the
    bounds or over inputs (a trigger) must leave the weights and their gradients alone."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
