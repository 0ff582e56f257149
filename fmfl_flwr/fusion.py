"""FM-FL on the server (METHOD.md 1): pre-training on D_syn, and ensemble distillation.

Fusion distils the round's client models into the aggregate on the FM's synthetic set,
FedDF-style (Lin et al. 2020; Li et al., arXiv 2401.10375, Eq. 1):

    alpha * CE(G(x), y) + (1 - alpha) * tau^2 * KL(softmax(gbar(x)/tau) || softmax(G(x)/tau))

with gbar the mean of the client models' logits. The KL is taken in the usual
distillation direction (teacher first), as FedDF and Hinton et al. do. With
`relabel_target`, the CE labels of the class the activation-bounds gate named as a
backdoor's target are replaced by the ensemble's class where the ensemble disputes them.
With `unlearn_poison`, the D_syn samples labelled with that target that sit with the
poison in the features of the model last served (`suspected_poison`) are taught away
from the target instead: -log(1 - p_target) in place of their CE term, and no KL to a
teacher that may share their backdoor; with `unlearn_to_teacher` their KL term stays,
to the teacher with the target class taken out (`without_class`), so the poison's
images also teach the classes they show. With `unlearn_restore_target` the split is cut
to the bounds' overrule cap (`within_cap`) and the target's images left out of it carry
the CE weight of the count the server asked for per class (`restored_target_weights`),
so unlearning does not starve the target class.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fmfl_flwr.defense.bounds import (
    bound_keys,
    bounds_disabled,
    ensure_bounds_for_state,
    load_state_with_bounds,
)
from fmfl_flwr.defense.objectives import most_suspect
from fmfl_flwr.ensemble import ensemble_logits
from fmfl_flwr.training import (
    default_device,
    logits_and_features,
    minimise,
    predict_logits,
    train_epochs,
)

StateDict = dict[str, torch.Tensor]
PRETRAIN_LR = 0.05


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
    unlearn_poison: bool = False  # the named target's suspected poison taught away from it
    unlearn_to_teacher: bool = False  # ... and toward the teacher's other classes
    unlearn_restore_target: bool = False  # the split capped, the kept target images weighted
    unlearn_cap: float = 1.0  # at most this share of D_syn unlearned
    requested_per_class: int = 1000  # the D_syn images the server asked for per class
    pretrain_lr_schedule: str = "constant"  # or "cosine": the rate annealed to 0


def pretrain(model: nn.Module, syn_x: torch.Tensor, syn_y: torch.Tensor,
             settings: FusionSettings,
             on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Round-0 initialisation: plain supervised training on D_syn (SGD, momentum 0.9);
    `on_epoch(epoch, loss)` after each epoch (minutes each for CIFAR-10 on a CPU)."""
    if settings.pretrain_epochs:
        train_epochs(model, syn_x, syn_y, settings.pretrain_epochs, settings.batch_size,
                     lr=PRETRAIN_LR, seed=settings.seed, on_epoch=on_epoch,
                     lr_schedule=settings.pretrain_lr_schedule)


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


def flipped_from_target(labels: torch.Tensor, unbounded_logits: torch.Tensor,
                        bounded_logits: torch.Tensor, target: int) -> torch.Tensor:
    """The samples labelled `target` that the model calls `target` unbounded, not bounded."""
    return (labels == target) & (unbounded_logits.argmax(1) == target) & \
        (bounded_logits.argmax(1) != target)


def suspected_poison(features: torch.Tensor, unbounded_logits: torch.Tensor,
                     bounded_logits: torch.Tensor, labels: torch.Tensor,
                     target: int, max_steps: int = 20, cap: float = 1.0) -> torch.Tensor:
    """Which samples labelled `target` sit with the poison: a boolean mask over `labels`.

    Last round's bounds cut the trigger where they work: the samples labelled `target` that
    the model calls `target` without its bounds and not with them are mostly the poison,
    and those the bounds keep at `target` mostly the clean images of that class. The
    trigger dominates the poison's penultimate features (`features`), so the split starts
    from the samples nearer (cosine) the flipped ones' mean feature than the kept ones'.
    On CIFAR-10 ResNet-18 that start held 35-82% of the poison in served models; 2-means
    from there (each side's mean is the next centroid, at most `max_steps` times) held
    87.5-99.7% at over 99% precision (stop 29, `bench/split_census.py`); on the clients'
    aggregates only 52% and 79%, so Flower runs split the model last served, where it held
    99.6-100% (stop 30, `bench/kept_split.py`). 2-means may end
    with the start's side on clean images and the other side on the poison, so the
    poison's side is the one holding more of the flipped samples (a tie: more of the
    start). Nothing is suspected until the bounds both flip and keep some. At most `cap`
    of all samples are suspected (`within_cap`).
    """
    mine = labels == target
    flipped = flipped_from_target(labels, unbounded_logits, bounded_logits, target)
    kept = mine & (bounded_logits.argmax(1) == target)
    if not flipped.any() or not kept.any():
        return torch.zeros_like(mine)
    unit = F.normalize(features.float(), dim=1)
    suspected = poison_side(unit, mine, flipped, kept, max_steps)
    return within_cap(suspected, unbounded_logits, bounded_logits, target, cap)


def poison_side(unit: torch.Tensor, mine: torch.Tensor, flipped: torch.Tensor,
                kept: torch.Tensor, max_steps: int) -> torch.Tensor:
    """`suspected_poison`'s 2-means split of `mine` (unit features), started from the
    samples nearer the `flipped` ones' mean than the `kept` ones'."""

    def nearer_first(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        toward_first = unit @ F.normalize(unit[first].mean(0), dim=0)
        return mine & (toward_first > unit @ F.normalize(unit[second].mean(0), dim=0))

    def holds(side: torch.Tensor) -> tuple[int, int]:
        return int((flipped & side).sum()), int((start & side).sum())

    start = suspected = nearer_first(flipped, kept)
    if not start.any() or start.equal(mine):
        return start  # one side is empty: no two means to refine, no side to choose
    for _ in range(max_steps):
        moved = nearer_first(suspected, mine & ~suspected)
        if moved.equal(suspected) or not moved.any() or moved.equal(mine):
            break
        suspected = moved
    return suspected if holds(suspected) >= holds(mine & ~suspected) else mine & ~suspected


def within_cap(suspected: torch.Tensor, unbounded_logits: torch.Tensor,
               bounded_logits: torch.Tensor, target: int, cap: float) -> torch.Tensor:
    """`suspected` cut to at most `cap` of all samples: those whose probability of
    `target` the bounds take down most (unchanged where it fits). Where the bounds flip
    nearly all of the target's images the split takes in the class's clean images
    (CIFAR-10 Dirichlet seed 2, stop 54: 26.5% of D_syn at 66% precision); the top 20% by
    this drop held the poison at 87% precision, the best ranking measured there."""
    drop = unbounded_logits.softmax(1)[:, target] - bounded_logits.softmax(1)[:, target]
    chosen = most_suspect(torch.nonzero(suspected).flatten(), drop, cap)
    return torch.zeros_like(suspected).index_fill_(0, chosen, True)


def restored_target_weights(labels: torch.Tensor, unlearn: torch.Tensor, target: int,
                            requested: int) -> torch.Tensor:
    """Per-sample CE weights: 1, except the samples labelled `target` outside `unlearn`,
    which share the weight of the `requested` images the server asked for per class
    where fewer are kept (never less than 1).

    Unlearning pushes the target's probability down on every suspect and a non-IID teacher
    may never call the class (CIFAR-10 Dirichlet, stop 55: one client holds 90% of class
    0 and the mean-logit ensemble calls none of its images 0), so the few kept images
    alone teach the class and it starves (6.1% recall with a precise split, stop 54).
    The label's own count is no measure: the poison inflates it (stop 56: weighted to it,
    class 0 took 31% of the test set's predictions).
    """
    weights = torch.ones(len(labels))
    kept = (labels == target) & ~unlearn
    if kept.any():
        weights[kept] = max(1.0, requested / float(kept.sum()))
    return weights


def distill(model: nn.Module, teacher_logits: torch.Tensor, syn_x: torch.Tensor,
            syn_y: torch.Tensor, settings: FusionSettings, round_seed: int,
            unlearn: torch.Tensor | None = None, target: int = -1) -> float:
    """Distil `teacher_logits` (and the synthetic labels) into `model` with Adam; mean loss.

    `unlearn` (a mask over the samples) marks those taught away from class `target`:
    -log(1 - p_target) replaces their CE term, and they have no KL term, or with
    `settings.unlearn_to_teacher` a KL term to the teacher without `target`; with
    `settings.unlearn_restore_target` the kept target images' CE is weighted up.
    """
    device = default_device()
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    tau, alpha = settings.tau, settings.alpha
    ce_weights = torch.ones(len(syn_y))
    if unlearn is not None and settings.unlearn_restore_target:
        ce_weights = restored_target_weights(syn_y, unlearn, target, settings.requested_per_class)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(syn_x[batch].to(device))
        teacher = F.softmax(teacher_logits[batch].to(device) / tau, 1)
        if unlearn is None:
            kl = F.kl_div(F.log_softmax(logits / tau, 1), teacher, reduction="batchmean")
            return alpha * F.cross_entropy(logits, syn_y[batch].to(device)) + \
                (1 - alpha) * tau**2 * kl
        away = unlearn[batch].to(device)
        if settings.unlearn_to_teacher:
            teacher = torch.where(away[:, None], without_class(teacher, target), teacher)
        kl = F.kl_div(F.log_softmax(logits / tau, 1), teacher, reduction="none").sum(1)
        if not settings.unlearn_to_teacher:
            kl = kl * ~away
        ce = F.cross_entropy(logits, syn_y[batch].to(device), reduction="none")
        ce = ce * ce_weights[batch].to(device)
        ce = torch.where(away, -log_not_class(logits, target), ce)
        return (alpha * ce + (1 - alpha) * tau**2 * kl).mean()

    return minimise(optimiser, len(syn_x), settings.epochs, settings.batch_size, round_seed,
                    batch_loss)


def without_class(probs: torch.Tensor, target: int) -> torch.Tensor:
    """`probs` (rows summing to 1) with class `target`'s share given to the others pro rata.

    A row that put everything on `target` becomes all zeros: it then teaches nothing.
    """
    others = probs.clone()
    others[:, target] = 0
    return others / others.sum(1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def log_not_class(logits: torch.Tensor, target: int) -> torch.Tensor:
    """log(1 - p_target) per row, computed from the other classes' logits (stable)."""
    others = torch.cat([logits[:, :target], logits[:, target + 1:]], 1)
    return others.logsumexp(1) - logits.logsumexp(1)


class Fusion:
    """The per-round fusion step for the FM-FL strategy (a `ServerStep`).

    Keeps the round's client-ensemble logits on D_syn (`last_ensemble_logits`): the
    activation-bounds defense uses them as its clean reference under the FM threat. With
    `relabel_target` or `unlearn_poison`, `target_source` returns the class that defense
    named as a backdoor's target (`BoundsStep.named_target`, None while none is named);
    `history` records what was relabelled or unlearned each round; `unlearned_share` is
    the share of D_syn this round's fusion taught away from the target (0: none), which
    the defense reads to decide whether to trust the fused model (`BoundsStep`'s
    `trust_source`).

    The suspected poison is found once per named target and kept (`suspected`): D_syn does
    not change, and once unlearning has worked the aggregate no longer carries the trigger,
    so last round's bounds flip clean images of the target and a fresh split would suspect
    those (stop 27: class-0 accuracy fell to 45% when it was redone every round). It is
    found on the model last served, last round's fused weights (`last_fused`) under the
    bounds fitted on them, which is the model the gate judged; the clients' aggregate
    blurs the poison's features (CIFAR-10, stop 29: 52% of the poison held on the
    aggregate, 99.8% on the served model).
    """

    # kept by checkpoints; the ensemble is recomputed every round
    RESUMED = ("history", "suspected", "suspected_target", "last_fused")

    def __init__(self, model_fn: Callable[[], nn.Module], syn_x: torch.Tensor,
                 syn_y: torch.Tensor, settings: FusionSettings,
                 target_source: Callable[[], int | None] | None = None) -> None:
        if (settings.relabel_target or settings.unlearn_poison) and target_source is None:
            raise ValueError("fusion relabel_target and unlearn_poison need the defense that "
                             "names the target (defense='activation-bounds')")
        self.model_fn = model_fn
        self.syn_x, self.syn_y = syn_x, syn_y
        self.settings = settings
        self.target_source = target_source
        self.last_ensemble_logits: torch.Tensor | None = None
        self.suspected: torch.Tensor | None = None
        self.suspected_target = -1
        self.unlearned_share = 0.0
        self.last_fused: StateDict | None = None
        self.last_loss = float("nan")
        self.history: list[dict[str, float]] = []

    def __call__(self, server_round: int, state: StateDict, client_states: list[StateDict],
                 weights: list[float]) -> StateDict:
        teachers = (load_state_with_bounds(self.model_fn(), s) for s in client_states)
        self.last_ensemble_logits, left_out = ensemble_logits(teachers, self.syn_x)
        stats: dict[str, float] = {"teachers-left-out": float(left_out)} if left_out else {}
        if self.settings.epochs == 0 or self.last_ensemble_logits is None:
            if stats:  # no finite teacher: the aggregate goes on unfused
                self.history.append({"round": float(server_round), **stats})
            return state
        model = self.model_fn()
        ensure_bounds_for_state(model, state).load_state_dict(state)
        uses_target = self.settings.relabel_target or self.settings.unlearn_poison
        target = self.target_source() if uses_target else None
        labels = self._labels(target, stats)
        unlearn = self._suspects(state, target, stats)
        self.unlearned_share = stats.get("unlearned-share", 0.0)
        if stats:
            self.history.append({"round": float(server_round), **stats})
        torch.manual_seed(self.settings.seed * 7919 + server_round)
        # Through the bounds, distillation can re-learn the backdoor on paths the bounds
        # leave open; without them it learns it unbounded and the defense refits after.
        with nullcontext(model) if self.settings.through_bounds else bounds_disabled(model):
            self.last_loss = distill(model, self.last_ensemble_logits, self.syn_x, labels,
                                     self.settings, self.settings.seed * 7919 + server_round,
                                     unlearn, -1 if target is None else target)
        fused = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if self.settings.unlearn_poison:  # only a later split reads it (`served`)
            self.last_fused = fused
        return dict(fused)

    def _labels(self, target: int | None, stats: dict[str, float]) -> torch.Tensor:
        """D_syn's labels for this round's CE term, the named target's disputed ones changed."""
        if not self.settings.relabel_target:
            return self.syn_y
        labels, changed = self.syn_y, 0
        if target is not None:
            labels, changed = relabel_disputed(self.syn_y, self.last_ensemble_logits, target,
                                               self.settings.relabel_cap)
        stats.update({"relabel-target": -1.0 if target is None else float(target),
                      "relabelled-share": changed / len(self.syn_y)})
        return labels

    def _suspects(self, state: StateDict, target: int | None,
                  stats: dict[str, float]) -> torch.Tensor | None:
        """The suspected poison of the named target (None: nothing to unlearn this round).

        `state` is the round's aggregate with the bounds it was served with; the first
        split that suspects anything for a target is kept for it."""
        if not self.settings.unlearn_poison:
            return None
        suspected = None
        if target is not None and target == self.suspected_target:
            suspected = self.suspected
        elif target is not None:
            model = self.model_fn()
            ensure_bounds_for_state(model, state).load_state_dict(self.served(state))
            bounded = predict_logits(model, self.syn_x)
            with bounds_disabled(model):
                unbounded, features = logits_and_features(model, self.syn_x)
            suspected = suspected_poison(features, unbounded, bounded, self.syn_y, target,
                                         cap=self.settings.unlearn_cap)
            if suspected.any():
                self.suspected, self.suspected_target = suspected, target
        share = 0.0 if suspected is None else suspected.float().mean().item()
        stats.update({"unlearn-target": -1.0 if target is None else float(target),
                      "unlearned-share": share})
        return suspected if share > 0 else None  # none suspected: the plain fusion

    def served(self, state: StateDict) -> StateDict:
        """The model last served: last round's fused weights under the bounds `state` (the
        aggregate) carries, which are those served with them; `state` itself before any
        round was fused."""
        if self.last_fused is None:
            return state
        old_bounds = set(bound_keys(self.last_fused))
        weights = {k: v for k, v in self.last_fused.items() if k not in old_bounds}
        return {**weights, **{k: state[k] for k in bound_keys(state)}}
