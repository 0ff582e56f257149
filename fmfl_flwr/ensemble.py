"""The client ensemble, FedDF's teacher: the mean logits of the client models.

A client model whose logits are not all finite is left out. One such model (a broken
reply, or a boosted one whose BatchNorm variance went negative: model replacement on
ResNet-18) turns the mean into NaN, and distilling from it collapses the fused model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fmfl_flwr.training import predict_logits


def ensemble_logits(client_models: Iterable[nn.Module], images: torch.Tensor
                    ) -> tuple[torch.Tensor | None, int]:
    """Mean logits on `images` of the client models whose logits are all finite (None if
    none is), and how many were left out. Models are taken one at a time."""
    total, used, left_out = None, 0, 0
    for model in client_models:
        logits = predict_logits(model, images)
        if not torch.isfinite(logits).all():
            left_out += 1
            continue
        total = logits if total is None else total + logits
        used += 1
    return (None if total is None else total / used), left_out
