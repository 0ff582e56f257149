"""The `pruning` baseline: prune channels dormant on D_syn (Liu et al., Fine-Pruning, RAID 2018).

https://arxiv.org/abs/1805.12185. Channels of the last convolutional ReLU are pruned in
increasing order of mean activation on the reference data until its accuracy drops by
more than `max_drop`. The pruning mask is a bound of 0 on the pruned channels (unbounded
elsewhere), so it travels in the state exactly like the activation bounds.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from fmfl_flwr.defense.bounds import (
    BOUND_BUFFER,
    UNBOUNDED,
    attach_bounds,
    bounded_layers,
    bounds_disabled,
    set_bounds,
)
from fmfl_flwr.training import predict_logits


@torch.no_grad()
def _mean_activations(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean activation per channel of every ReLU with a spatial output, in forward order."""
    means: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if output.dim() == 4:
                means.setdefault(name, []).append(output.mean((0, 2, 3)) * len(output))

        return record

    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(hook(n)) for n, m in relus]
    try:
        with bounds_disabled(model):
            predict_logits(model, images, device=torch.device("cpu"))
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.stack(v).sum(0) / len(images) for n, v in means.items()}


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (
        (predict_logits(model, images, device=torch.device("cpu")).argmax(1) == labels)
        .float()
        .mean()
        .item()
    )


def prune_dormant(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_drop: float = 0.04,
    max_fraction: float = 0.9,
    steps: int = 32,
    max_samples: int = 2000,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Mask the most dormant channels of the last conv ReLU; returns (bounds, stats)."""
    started = time.perf_counter()
    if len(images) > max_samples:
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images, labels = images[keep[:max_samples]], labels[keep[:max_samples]]
    means = _mean_activations(model, images)
    if not means:
        raise ValueError("pruning needs a ReLU after a convolution; the model has none")
    layer, mean = list(means.items())[-1]
    attach_bounds(model, [layer])
    key = f"{layer}.{BOUND_BUFFER}"
    order = mean.argsort()
    with bounds_disabled(model):
        baseline = _accuracy(model, images, labels)
    others = {
        f"{n}.{BOUND_BUFFER}": torch.tensor(UNBOUNDED) for n in bounded_layers(model) if n != layer
    }
    set_bounds(model, others)
    mask = torch.full((len(mean), 1, 1), UNBOUNDED)
    pruned, accuracy = 0, baseline
    step = max(1, -(-len(mean) // steps))
    for count in range(step, int(max_fraction * len(mean)) + 1, step):
        trial = mask.clone()
        trial[order[:count]] = 0.0
        set_bounds(model, {key: trial})
        trial_accuracy = _accuracy(model, images, labels)
        if baseline - trial_accuracy > max_drop:
            break
        mask, pruned, accuracy = trial, count, trial_accuracy
    bounds = {key: mask, **others}
    set_bounds(model, bounds)
    stats = {
        "time": time.perf_counter() - started,
        "pruned": float(pruned),
        "channels": float(len(mean)),
        "agreement": accuracy,
        "baseline": baseline,
    }
    return bounds, stats
