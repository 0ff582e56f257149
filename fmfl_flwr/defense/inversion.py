"""Invert a backdoor's trigger toward a known target class (Neural Cleanse, one class).

Once the overrule gate names the backdoor's target (the class that fills the cap), the
fused model, bounds off, still answers the trigger. The smallest mask and pattern that
send clean images of the other classes to that target recover the trigger's place and
look (a 3x3 BadNets corner on Fashion-MNIST, docs/defense.md). Stamped onto clean
reference images with their clean targets, they show the bound fit the backdoor route
that the client ensemble, trained from the served model, may share and cannot overrule.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fmfl_flwr.defense.bounds import weights_frozen
from fmfl_flwr.training import seeded_generator
from fmfl_flwr.triggers import Trigger


def invert_trigger(
    model: nn.Module,
    images: torch.Tensor,
    target: int,
    steps: int = 200,
    mask_weight: float = 10.0,
    batch_size: int = 100,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[Trigger, float]:
    """The (mask, pattern) that sends `images` (none of class `target`) to `target`.

    Minimises cross-entropy to `target` plus `mask_weight` times the mask's mean over the
    image, Adam over sigmoid-parametrised mask ([1, H, W], shared by the channels) and
    pattern ([C, H, W]); the model's weights are not touched. Returns the trigger and the
    share of `images` it sends to `target`.
    """
    if len(images) == 0:
        raise ValueError("trigger inversion needs at least one image outside the target class")
    channels, height, width = images.shape[1:]
    generator = seeded_generator(seed)
    mask_logit = torch.full((1, height, width), -3.0, requires_grad=True)
    pattern_logit = torch.zeros((channels, height, width), requires_grad=True)
    optimiser = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
    was_training = model.training
    model.eval()
    try:
        with weights_frozen(model):
            for _ in range(steps):
                batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
                mask, pattern = mask_logit.sigmoid(), pattern_logit.sigmoid()
                logits = model(batch * (1 - mask) + pattern * mask)
                wanted = torch.full((len(batch),), target, dtype=torch.long)
                loss = F.cross_entropy(logits, wanted) + mask_weight * mask.mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        trigger = Trigger(mask_logit.detach().sigmoid().expand(channels, height, width).clone(),
                          pattern_logit.detach().sigmoid())
        with torch.no_grad():
            sent = model(trigger.stamp(images)).argmax(1) == target
    finally:
        model.train(was_training)
    return trigger, sent.float().mean().item()
