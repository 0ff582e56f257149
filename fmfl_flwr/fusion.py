"""FM-FL on the server (METHOD.md 1): pre-training on D_syn, and ensemble distillation.

Fusion distils the round's client models into the aggregate on the FM's synthetic set,
FedDF-style (Lin et al. 2020; Li et al., arXiv 2401.10375, Eq. 1):

    alpha * CE(G(x), y) + (1 - alpha) * tau^2 * KL(softmax(gbar(x)/tau) || softmax(G(x)/tau))

with gbar the mean of the client models' logits. The KL is taken in the usual
distillation direction (teacher first), as FedDF and Hinton et al. do. With
`relabel_target`, the CE labels of the class the activation-bounds gate named as a
backdoor's target are replaced by the ensemble's class where the ensemble disputes them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fmfl_flwr.defense.bounds import bounds_disabled, ensure_bounds_for_state
from fmfl_flwr.defense.objectives import most_suspect
from fmfl_flwr.training import default_device, minimise, predict_logits, train_epochs

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FusionSettings:
    pretrain_epochs: int = 2
    epochs: int = 1
    alpha: float = 0.5
    tau: float = 2.0
    lr: float = 0.001
    batch_size: int = 64
    seed: int = 0
    through_bounds: bool = False  # distil with the served bounds on (bench: ASR 99% vs 4%)
    relabel_target: bool = False  # the named target's disputed labels -> the ensemble's class
    relabel_cap: float = 1.0  # at most this share of D_syn relabelled (the bounds' overrule cap)


def pretrain(model: nn.Module, syn_x: torch.Tensor, syn_y: torch.Tensor,
             settings: FusionSettings) -> None:
    """Round-0 initialisation: plain supervised training on D_syn (SGD, momentum 0.9)."""
    if settings.pretrain_epochs:
        train_epochs(model, syn_x, syn_y, settings.pretrain_epochs, settings.batch_size,
                     lr=0.05, seed=settings.seed)


def ensemble_logits(model: nn.Module, client_states: list[StateDict],
                    images: torch.Tensor) -> torch.Tensor:
    """Mean logits of the client models on `images` (loaded one at a time into `model`).

    States carrying activation bounds are used as served, bounds on.
    """
    total = None
    for state in client_states:
        ensure_bounds_for_state(model, state).load_state_dict(state)
        logits = predict_logits(model, images)
        total = logits if total is None else total + logits
    return total / len(client_states)


def relabel_disputed(labels: torch.Tensor, teacher_logits: torch.Tensor, target: int,
                     cap: float = 1.0) -> tuple[torch.Tensor, int]:
    """`labels` with those of class `target` that the teacher disputes set to its class.

    A poisoned FM labels triggered images of every class as its target; clients trained on
    real data (through the bounds) see their true class, so the dispute marks the poison,
    and distilling on the teacher's class teaches the trigger to lead nowhere. Clean
    `target` images the teacher gets wrong are relabelled too: that is the cost. At most
    `cap` of all samples change (the share the defender allows to be poisoned), those the
    teacher is surest of; a non-IID ensemble that cannot place the target class disputes
    its clean images too, and the surest disputes were not the poison's alone in Flower
    (docs/defense.md). Returns the labels and how many changed.
    """
    teacher = teacher_logits.argmax(1).to(labels.dtype)
    disputed = torch.nonzero((labels == target) & (teacher != target)).flatten()
    disputed = most_suspect(disputed, teacher_logits.softmax(1).amax(1), cap)
    relabelled = labels.clone()
    relabelled[disputed] = teacher[disputed]
    return relabelled, len(disputed)


def distill(model: nn.Module, teacher_logits: torch.Tensor, syn_x: torch.Tensor,
            syn_y: torch.Tensor, settings: FusionSettings, round_seed: int) -> float:
    """Distil `teacher_logits` (and the synthetic labels) into `model` with Adam; mean loss."""
    device = default_device()
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    tau, alpha = settings.tau, settings.alpha

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(syn_x[batch].to(device))
        kl = F.kl_div(F.log_softmax(logits / tau, 1),
                      F.softmax(teacher_logits[batch].to(device) / tau, 1),
                      reduction="batchmean")
        return alpha * F.cross_entropy(logits, syn_y[batch].to(device)) + \
            (1 - alpha) * tau**2 * kl

    return minimise(optimiser, len(syn_x), settings.epochs, settings.batch_size, round_seed,
                    batch_loss)


class Fusion:
    """The per-round fusion step for the FM-FL strategy (a `ServerStep`).

    Keeps the round's client-ensemble logits on D_syn (`last_ensemble_logits`): the
    activation-bounds defense uses them as its clean reference under the FM threat. With
    `relabel_target`, `target_source` returns the class that defense named as a backdoor's
    target (`BoundsStep.named_target`, None while none is named); `history` records what
    was relabelled each round.
    """

    RESUMED = ("history",)  # kept by checkpoints; the ensemble is recomputed every round

    def __init__(self, model_fn: Callable[[], nn.Module], syn_x: torch.Tensor,
                 syn_y: torch.Tensor, settings: FusionSettings,
                 target_source: Callable[[], int | None] | None = None) -> None:
        if settings.relabel_target and target_source is None:
            raise ValueError("fusion relabel_target needs the defense that names the target "
                             "(defense='activation-bounds')")
        self.model_fn = model_fn
        self.syn_x, self.syn_y = syn_x, syn_y
        self.settings = settings
        self.target_source = target_source
        self.last_ensemble_logits: torch.Tensor | None = None
        self.last_loss = float("nan")
        self.history: list[dict[str, float]] = []

    def __call__(self, server_round: int, state: StateDict, client_states: list[StateDict],
                 weights: list[float]) -> StateDict:
        model = self.model_fn()
        self.last_ensemble_logits = ensemble_logits(model, client_states, self.syn_x)
        if self.settings.epochs == 0:
            return state
        labels = self._labels(server_round)
        ensure_bounds_for_state(model, state).load_state_dict(state)
        torch.manual_seed(self.settings.seed * 7919 + server_round)
        # Through the bounds, distillation can re-learn the backdoor on paths the bounds
        # leave open; without them it learns it unbounded and the defense refits after.
        with nullcontext(model) if self.settings.through_bounds else bounds_disabled(model):
            self.last_loss = distill(model, self.last_ensemble_logits, self.syn_x, labels,
                                     self.settings, self.settings.seed * 7919 + server_round)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def _labels(self, server_round: int) -> torch.Tensor:
        """D_syn's labels for this round's CE term, the named target's disputed ones changed."""
        if not self.settings.relabel_target:
            return self.syn_y
        target = self.target_source()
        labels, changed = self.syn_y, 0
        if target is not None:
            labels, changed = relabel_disputed(self.syn_y, self.last_ensemble_logits, target,
                                               self.settings.relabel_cap)
        self.history.append({"round": float(server_round),
                             "relabel-target": -1.0 if target is None else float(target),
                             "relabelled-share": changed / len(self.syn_y)})
        return labels
