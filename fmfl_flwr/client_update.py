"""One client's round on plain tensors: the ClientApp's training step without Flower.

Shared by `client_app.train` and `bench/fmfl_loop.py`, so the bench trains clients exactly
as the app does: poison when attacking, local SGD with the served bounds on or off
(`client-bounds`), optionally kept close to the served model (`client-distill`), boost
the update for model replacement, lift the bounds in the reply.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fmfl_flwr import attacks
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.defense import bounds_disabled
from fmfl_flwr.training import default_device, predict_logits, train_epochs


@dataclass(frozen=True)
class ClientRole:
    """Whether a client is malicious, its rank among the malicious, and how many there are."""

    malicious: bool
    rank: int
    num_malicious: int


def client_update(config: ExperimentConfig, model: nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, image_shape: tuple[int, int, int], server_round: int,
                  partition_id: int, num_partitions: int, role: ClientRole,
                  ) -> tuple[dict[str, torch.Tensor], float, bool]:
    """Train `model` (the served global model) in place; (state, loss, attacked?)."""
    attacking = role.malicious and attacks.attacks_in_round(config, server_round)
    round_seed = config.seed * 1_000_003 + server_round * 1009 + partition_id
    if attacking:
        trigger = attacks.client_trigger(config, image_shape, role.rank, role.num_malicious)
        images, labels, _ = attacks.poison_samples(images, labels, trigger, config.poison_ratio,
                                                   config.target_label, round_seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    # The served model (bounds on) as the teacher: it knows the classes this client lacks,
    # and it never shows the unbounded model's trigger response.
    teacher = predict_logits(model, images) if config.client_distill > 0 else None
    torch.manual_seed(round_seed)
    with nullcontext(model) if config.client_bounds else bounds_disabled(model):
        loss = train_epochs(model, images, labels, config.local_epochs, config.batch_size,
                            config.lr, round_seed, momentum=config.momentum,
                            device=default_device(), teacher_logits=teacher,
                            teacher_weight=config.client_distill)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    if attacking and config.client_attack == "scaling":
        boost = attacks.default_boost(config, num_partitions, role.num_malicious)
        state = attacks.boost_update(global_state, state, boost, config.attack_norm_bound)
    if attacking and config.attack_lift_bounds:
        state = attacks.lift_bounds(state)
    return state, float(loss), attacking
