"""Classic client-side backdoors (METHOD.md 2) as plain tensor functions.

A malicious client poisons a share of its non-target samples with a trigger and relabels
them to the target (BadNets, Blended, DBA), may boost its update (model replacement), and
may lift the activation bounds in its reply (the adaptive attack on the bounds defense).
Who is malicious, when, and with which trigger all follow from the config and a seed.
"""

from __future__ import annotations

import numpy as np
import torch

from fmfl_flwr.config import ExperimentConfig, parse_int_list
from fmfl_flwr.defense.bounds import UNBOUNDED, bound_keys
from fmfl_flwr.triggers import Trigger, make_trigger

DATA_POISONING = ("badnets", "blended", "dba", "scaling")


def malicious_partitions(config: ExperimentConfig, num_partitions: int) -> set[int]:
    """The malicious clients: the explicit list, else a seeded `malicious-fraction` draw."""
    if config.client_attack == "none":
        return set()
    explicit = parse_int_list("malicious-clients", config.malicious_clients)
    if explicit:
        return {i for i in explicit if 0 <= i < num_partitions}
    count = int(round(config.malicious_fraction * num_partitions))
    rng = np.random.default_rng(config.seed + 7919)
    return {int(i) for i in rng.choice(num_partitions, size=count, replace=False)}


def attacks_in_round(config: ExperimentConfig, server_round: int) -> bool:
    """`attack-rounds` empty means every round."""
    rounds = parse_int_list("attack-rounds", config.attack_rounds)
    return not rounds or server_round in rounds


def trigger_name(config: ExperimentConfig) -> str:
    """The trigger of the threat in play: the client attack's own, else `trigger`."""
    if config.client_attack in ("badnets", "blended", "dba"):
        return config.client_attack
    return config.trigger


def evaluation_trigger(config: ExperimentConfig, image_shape: tuple[int, int, int]) -> Trigger:
    """The whole trigger, as the ASR test uses it (DBA is tested with all pieces)."""
    name = trigger_name(config)
    params = {"path": config.trigger_image} if name == "image" else {}
    return make_trigger(name, image_shape, **params)


def client_trigger(config: ExperimentConfig, image_shape: tuple[int, int, int],
                   malicious_rank: int, num_malicious: int) -> Trigger:
    """What one malicious client stamps: DBA gives each its own piece, round robin."""
    full = evaluation_trigger(config, image_shape)
    if trigger_name(config) != "dba":
        return full
    pieces = full.pieces(max(1, min(num_malicious, 4)))
    return pieces[malicious_rank % len(pieces)]


def poison_samples(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger,
                   ratio: float, target: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp and relabel round(ratio * #non-target) seeded non-target samples.

    Returns (images, labels, poisoned positions); the inputs are not modified.
    """
    candidates = torch.nonzero(labels != target).flatten()
    count = int(round(ratio * len(candidates)))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    chosen = candidates[order[:count]].sort().values
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.stamp(images[chosen])
    labels[chosen] = target
    return images, labels, chosen


RUNNING_STATISTICS = (".running_mean", ".running_var")


def boost_update(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor],
                 boost: float, norm_bound: float = 0.0) -> dict[str, torch.Tensor]:
    """Model replacement: global + boost * (local - global) on floating-point tensors.

    BatchNorm's running statistics are sent as the local model measured them: they are
    estimates, not a learnt update, and a boosted variance falls below 0 wherever local
    training lowered it by more than 1/boost, which makes every output NaN (stop 57).
    Averaged with the other replies they stay close to the replaced model's own.
    With `norm_bound` > 0 the boosted update is scaled down to that L2 norm, the
    constrained variant that slips under norm clipping.
    """
    deltas = {k: (local_state[k] - global_state[k]) * boost for k, v in local_state.items()
              if v.is_floating_point() and not k.endswith(RUNNING_STATISTICS)}
    if norm_bound > 0:
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())).item()
        if norm > norm_bound:
            deltas = {k: d * (norm_bound / norm) for k, d in deltas.items()}
    return {k: global_state[k] + deltas[k] if k in deltas else v for k, v in local_state.items()}


def lift_bounds(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every activation bound at UNBOUNDED: the adaptive attacker's reply.

    A server that took a reply's bounds as sent would evaluate this client's model without
    them, backdoor and all, in fusion's teacher, and average them into the aggregate's.
    """
    lifted = set(bound_keys(state))
    return {k: torch.full_like(v, UNBOUNDED) if k in lifted else v for k, v in state.items()}


def default_boost(config: ExperimentConfig, num_partitions: int, num_malicious: int) -> float:
    """`boost`, else n / m with n the clients per round and m the malicious ones among them."""
    if config.boost > 0:
        return config.boost
    per_round = max(1, int(num_partitions * config.fraction_train))
    return per_round / max(1, min(num_malicious, per_round))
