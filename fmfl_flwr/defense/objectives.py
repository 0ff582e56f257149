"""What the bounded model must reproduce on D_syn, and the penalties that shrink the bounds.

Objectives (METHOD.md 3 and 7):

- ``mm-bm``: fidelity to the fused model on every sample + c * sum_l ||Z_l||_2 (Wang et al.,
  MM-BM). On a poisoned D_syn the poisoned share sits in the fidelity term and protects
  the backdoor.
- ``agree``: the same, fidelity only where the fused model and the pre-fusion client
  ensemble agree.
- ``ensemble-switch`` (default): fidelity to the fused logits where fused model and ensemble
  agree, to the ensemble's logits where they disagree. Under the FM threat the ensemble is
  clean and disagrees exactly on poisoned samples, so the bounds are pushed to undo the
  backdoor there, not to keep it.
- ``mmac``: fidelity on every sample + c * mean class-t margin of the bounded model on
  inputs synthesised to maximise the original model's class-t margin (MMAC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

OBJECTIVES = ("mm-bm", "agree", "ensemble-switch", "mmac")
OVERRULE_RANKS = ("confidence", "confidence-drop")
OVERRULE_TARGETS = ("ensemble", "ensemble-centred")
# what counts as an overruled sample flipped by the bounds (`optimise._refuted`): moved onto
# its overruling target's class, or off the fused model's class to any other
FLIP_COUNTS = ("onto-target", "off-fused")
NORMS = ("l2", "rms")


def check_known(key: str, value: str, accepted: tuple[str, ...]) -> None:
    """Raise the bounds' one error for a `key` set to a `value` outside `accepted`."""
    if value not in accepted:
        raise ValueError(f"bounds {key}={value!r} is not known; accepted: {', '.join(accepted)}")


@dataclass(frozen=True)
class Reference:
    """Per-sample fidelity targets on the defender's reference data.

    `weights` scales each sample's fidelity term (0 excludes it); `keep` marks the samples
    whose target is the fused model's own output and that both models agree on, on which
    agreement measures collapse; `overruled` marks those whose target is the ensemble's;
    `flips_excused` counts the agreements dropped because last round's bounds flip them.
    """

    target_logits: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    overruled: torch.Tensor
    flips_excused: int = 0
    # the share of the samples in the capped set the gate tested (`gated_cap`)
    capped_share: float = float("nan")
    # how much of the capped disagreements one fused class holds (what the gate tests)
    cap_top_class_share: float = float("nan")
    # that share over the class's share of the whole cap (1 there; `cap_rise`)
    cap_rise: float = float("nan")
    # of the cap's samples in that class, the share the ensemble's most common class holds
    cap_source_share: float = float("nan")
    # that share over the ensemble's share of the same class on every sample (its own bias)
    cap_source_lift: float = float("nan")
    # the fused model's mean probability of that class on those samples
    cap_fused_confidence: float = float("nan")
    # that class (-1: nothing capped), named or not
    cap_top_class: int = -1
    # agreements in the class the gate names, taken out of `keep` (`gate_class_weight`)
    gate_class_spared: int = 0
    # the fused class that fills the overruled cap once the gate passes (-1: none named)
    gate_class: int = -1
    # the share of the samples the client ensemble's most common class holds (its lean)
    ensemble_top_share: float = float("nan")


def top_class_share(candidates: torch.Tensor, classes: torch.Tensor) -> float:
    """The share of the `candidates` (indices) their most common class holds (nan if none),
    counted exactly: a float32 mean put 45 of 100 under a gate of 0.45."""
    if len(candidates) == 0:
        return float("nan")
    own = classes[candidates]
    return int((own == own.mode().values).sum()) / len(own)


def halved_caps(candidates: torch.Tensor, scores: torch.Tensor, cap: float,
                halvings: int) -> list[torch.Tensor]:
    """The most suspect `candidates` at `cap` and at each of its first `halvings` halvings,
    widest first."""
    return [most_suspect(candidates, scores, cap / 2**step) for step in range(halvings + 1)]


def gated_cap(caps: list[torch.Tensor], fused_classes: torch.Tensor, gate: float
              ) -> torch.Tensor:
    """The capped set the overrule gate tests: the widest of `caps` (`halved_caps`) in which
    one fused class holds `gate` of them, else the one in which a class holds the most (the
    widest on ties).

    A poison under half the cap cannot fill it, however high it ranks: 5% of D_syn held
    27% of the 20% cap on Fashion-MNIST (stop 41). A poison that fills the cap is found
    at the cap itself, so halvings change no gate that passed without them."""
    shares = torch.tensor([top_class_share(c, fused_classes) for c in caps],
                          dtype=torch.float64).nan_to_num(-1.0)
    passing = torch.nonzero(shares >= gate).flatten()
    return caps[int(passing[0]) if len(passing) else int(shares.argmax())]


def cap_rise(concentration: float, top_class: int, widest: torch.Tensor,
             fused_classes: torch.Tensor) -> float:
    """A capped set's top-class share (`concentration`, of class `top_class`) over that
    class's share of the whole cap `widest` (nan if nothing is capped). Logged, not tested:
    a poison tops the suspicion rank and rises as the cap narrows (2.9-3.3 at the 5% cap),
    but so did a clean class (3.27, Fashion-MNIST Dirichlet, stop 41)."""
    in_widest = (fused_classes[widest] == top_class).float().mean().item() if len(widest) else 0.0
    return concentration / in_widest if in_widest else float("nan")


def top_class_members(capped: torch.Tensor, fused_classes: torch.Tensor) -> torch.Tensor:
    """The `capped` samples (indices) in their most common fused class (none if none)."""
    if len(capped) == 0:
        return capped
    own = fused_classes[capped]
    return capped[own == own.mode().values]


def source_share(members: torch.Tensor, ensemble_classes: torch.Tensor) -> float:
    """Of the cap's samples in its top fused class (`top_class_members`), the share the
    client ensemble's most common class holds (nan if none).

    A one-target backdoor stamps images of every other class, which the clean ensemble
    still sees as those classes, so its classes there spread; a clean class the fused model
    wins over a non-IID ensemble's bias is mistaken for the few classes that bias favours.
    """
    return top_class_share(members, ensemble_classes)


def source_lift(members: torch.Tensor, ensemble_classes: torch.Tensor) -> float:
    """`source_share` over the share of every sample the ensemble puts in the same class.

    A weak non-IID ensemble sends much of everything to the classes its clients hold, the
    poison's stamped sources too, so the raw share cannot tell that bias from a clean class
    it confuses with one other: the lift divides the bias out (1: the sources look like
    everything else; nan if nothing is capped).
    """
    if len(members) == 0:
        return float("nan")
    sources = ensemble_classes[members]
    top = sources.mode().values
    return ((sources == top).float().mean() / (ensemble_classes == top).float().mean()).item()


def fused_confidence(members: torch.Tensor, fused_logits: torch.Tensor) -> float:
    """The fused model's mean probability of its class on the cap's samples of its top
    class (`top_class_members`; nan if none): a learnt trigger is a sure shortcut."""
    if len(members) == 0:
        return float("nan")
    return fused_logits[members].softmax(1).max(1).values.mean().item()


def one_class_share(candidates: torch.Tensor, classes: torch.Tensor, gate: float) -> torch.Tensor:
    """The `candidates` (indices) of their most common class, if it holds >= `gate` of them.

    A label-flipping FM sends its poisoned samples to one target class, so the samples the
    bounds break for a backdoor concentrate there; a clean D_syn's hard samples spread over
    the classes. `gate` 0 excuses every candidate; with no concentration it excuses none.
    """
    if gate <= 0 or len(candidates) == 0:
        return candidates
    own = classes[candidates]
    mine = candidates[own == own.mode().values]
    return mine if len(mine) >= gate * len(candidates) else candidates[:0]


def fidelity_reference(
    objective: str,
    fused_logits: torch.Tensor,
    ensemble_logits: torch.Tensor | None,
    disagree_weight: float = 1.0,
    class_gate: float = 0.0,
    overrule_cap: float = 1.0,
    unsure_weight: float = 1.0,
    overrule_rank: str = "confidence",
    bounded_logits: torch.Tensor | None = None,
    excuse_flips: float = 0.0,
    overrule_gate: float = 0.0,
    gate_class_weight: float = 1.0,
    overrule_source_max: float = 0.0,
    overrule_lift_max: float = 0.0,
    overrule_confidence_min: float = 0.0,
    gate_classes: tuple[int, ...] | None = None,
    overrule_cap_halvings: int = 0,
    overrule_target: str = "ensemble",
) -> Reference:
    """Targets and weights of `objective`; without an ensemble every objective is MM-BM's.

    The ensemble overrules the fused model on at most `overrule_cap` of the samples: the
    disagreements most suspect by `overrule_rank` (`suspicion`; "confidence-drop" needs
    `bounded_logits`, the fused model's through last round's bounds). With
    `class_gate`, only on the disagreements of one dominant fused class (`one_class_share`):
    a backdoor sends its samples there. With `overrule_gate`, the capped set is overruled
    only if one fused class holds at least that share of it (`top_class_share`): a
    backdoor's poison fills the cap with its target, while a clean non-IID ensemble's most
    suspect disagreements spread over the classes and are mostly its own errors; and, with
    `overrule_source_max` > 0, only if the ensemble's classes on that class's capped
    samples spread: its most common one holding at most `overrule_source_max` times the
    share each of the other classes would hold were they spread evenly (`source_share`);
    with `overrule_lift_max` > 0, only if that share is at most that many times the share
    of all samples the ensemble puts in the same class (`source_lift`); with
    `overrule_confidence_min` > 0, only if the fused model's mean probability of its class
    on those samples is at least that (`fused_confidence`); with `gate_classes`, only if
    that class is one of them (None: any class may be named). With `overrule_cap_halvings`,
    the capped set is the widest of the cap and its halvings that one class fills
    (`gated_cap`). The overruled samples are fitted to `overrule_targets`' logits.
    Below the gate the fused model is trusted on every sample and counted in `keep`: MM-BM's
    reference, since the non-IID disagreements left out of the agreement count let the
    penalty tighten the bounds until they cost clean ACC. The other disagreements, mostly
    a weaker non-IID ensemble's errors but also any poisoned sample the cap missed, keep
    the fused model's own outputs as targets with weight `unsure_weight` (0 drops them);
    they are not counted in `keep`. With `excuse_flips` > 0, the agreements that last round's bounds
    flip (`bounded_logits`) are dropped too when at least that share of them sit in one
    fused class, and only that class's (`one_class_share`): poison the ensemble shares,
    sent to one target, whose trigger those bounds already cut and which the fused targets
    would otherwise reopen. A clean D_syn's flips, the bounds' own errors, spread over the
    classes and stay, so the errors cannot pile up round after round. With
    `gate_class_weight` < 1, the agreements in the class that fills the overruled cap (the
    backdoor's target once the gate passes) leave `keep` and weigh that much: poison the
    ensemble shares sits there, and fidelity to it would restore the backdoor.
    """
    check_known("objective", objective, OBJECTIVES)
    everyone = torch.ones(len(fused_logits), dtype=torch.bool)
    if ensemble_logits is None or objective in ("mm-bm", "mmac"):
        return Reference(fused_logits, everyone.float(), everyone, ~everyone)
    fused_classes, ensemble_classes = fused_logits.argmax(1), ensemble_logits.argmax(1)
    agree = fused_classes == ensemble_classes
    disagree = torch.nonzero(~agree).flatten()
    candidates = one_class_share(disagree, fused_classes, class_gate)
    overruled = ~everyone
    scores = suspicion(overrule_rank, fused_logits, bounded_logits)
    caps = halved_caps(candidates, scores, overrule_cap, overrule_cap_halvings)
    capped = gated_cap(caps, fused_classes, overrule_gate)
    concentration = top_class_share(capped, fused_classes)
    members = top_class_members(capped, fused_classes)  # the named class's, once it passes
    sources = source_share(members, ensemble_classes)
    lift = source_lift(members, ensemble_classes)
    sure = fused_confidence(members, fused_logits)
    top_class = int(fused_classes[members[0]]) if len(members) else -1
    diagnostics = {"cap_source_lift": lift, "cap_fused_confidence": sure,
                   "cap_top_class": top_class, "capped_share": len(capped) / len(fused_logits),
                   "ensemble_top_share": top_class_share(torch.arange(len(ensemble_classes)),
                                                         ensemble_classes),
                   "cap_rise": cap_rise(concentration, top_class, caps[0], fused_classes)}
    even = 1.0 / max(fused_logits.shape[1] - 1, 1)  # the share of each other class if spread
    clean_signs = (overrule_source_max > 0 and sources > overrule_source_max * even,
                   overrule_lift_max > 0 and lift > overrule_lift_max,
                   overrule_confidence_min > 0 and sure < overrule_confidence_min,
                   gate_classes is not None and top_class not in gate_classes)
    one_target = concentration >= overrule_gate and not any(clean_signs)
    if overrule_gate > 0 and not one_target:  # nan: nothing capped
        # no sign of a one-target poison: the fused model is trusted everywhere (MM-BM's fit)
        return Reference(fused_logits, everyone.float(), everyone, ~everyone,
                         cap_top_class_share=concentration, cap_source_share=sources,
                         **diagnostics)
    overruled[capped] = True
    # the other disagreements: the fused model's own outputs, outside the agreement count
    unsure = torch.where(agree, 1.0, float(unsure_weight))
    excused = torch.zeros(0, dtype=torch.long)
    if excuse_flips > 0:
        if bounded_logits is None:
            raise ValueError("bounds excuse-flips needs the bounded logits")
        flipped = torch.nonzero(flipped_agreements(agree, fused_logits, bounded_logits)).flatten()
        excused = one_class_share(flipped, fused_classes, excuse_flips)
        agree[excused], unsure[excused] = False, 0.0
    spared = torch.zeros_like(agree)
    if gate_class_weight < 1.0 and len(capped):
        spared = agree & (fused_classes == top_class)
        agree, unsure = agree & ~spared, torch.where(spared, float(gate_class_weight), unsure)
    found = {"flips_excused": len(excused), "cap_top_class_share": concentration,
             "cap_source_share": sources, "gate_class_spared": int(spared.sum()),
             "gate_class": top_class, **diagnostics}
    if objective == "agree":
        return Reference(fused_logits, torch.where(overruled, 0.0, unsure), agree, overruled,
                         **found)
    overruling = overrule_targets(ensemble_logits, overrule_target)
    targets = torch.where(overruled[:, None], overruling, fused_logits)
    weights = torch.where(overruled, float(disagree_weight), unsure)
    return Reference(targets, weights, agree, overruled, **found)


def overrule_targets(ensemble_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The logits the overruled samples are fitted to.

    "ensemble": the client ensemble's own. "ensemble-centred": the same with each class's
    mean over the fit's samples moved to the mean of all its logits, so a non-IID ensemble
    that calls most of D_syn one class gives each overruled sample its opinion beyond that
    bias, not the bias (CIFAR-10 Dirichlet seed 2, round 1: one class took 92% of the cap
    and of every sample, and the served model 62% of the test set; docs/defense.md, stop 51).
    """
    check_known("overrule-target", kind, OVERRULE_TARGETS)
    if kind == "ensemble":
        return ensemble_logits
    return ensemble_logits - ensemble_logits.mean(0, keepdim=True) + ensemble_logits.mean()


def flipped_agreements(agree: torch.Tensor, fused_logits: torch.Tensor,
                       bounded_logits: torch.Tensor) -> torch.Tensor:
    """The `agree` samples whose fused class last round's bounds (`bounded_logits`) change."""
    return agree & (bounded_logits.argmax(1) != fused_logits.argmax(1))


def suspicion(rank: str, fused_logits: torch.Tensor, bounded_logits: torch.Tensor | None
              ) -> torch.Tensor:
    """Per sample, how likely a disagreement is poisoned rather than a non-IID error.

    "confidence": the fused model's confidence in its class (a trigger makes the backdoored
    fused model sure of its target; a weak ensemble's errors fall mostly where it is less
    sure). "confidence-drop": that confidence plus how much of it last round's bounds take
    away (a trigger's abnormal activations are clipped, a clean image's hardly are); it
    caught more of the poisoned samples (docs/defense.md, "The overrule rank and the
    warm-fit epochs").
    """
    check_known("overrule-rank", rank, OVERRULE_RANKS)
    own = fused_logits.argmax(1, keepdim=True)
    confidence = fused_logits.softmax(1).gather(1, own).squeeze(1)
    if rank == "confidence":
        return confidence
    if bounded_logits is None:
        raise ValueError("bounds overrule-rank='confidence-drop' needs the bounded logits")
    return 2 * confidence - bounded_logits.softmax(1).gather(1, own).squeeze(1)


def most_suspect(candidates: torch.Tensor, scores: torch.Tensor, cap: float) -> torch.Tensor:
    """The `candidates` (indices), at most `cap` of all samples, highest `scores` first.

    The cap is the share of D_syn the defender allows to be poisoned.
    """
    limit = int(cap * len(scores))
    if len(candidates) <= limit:
        return candidates
    return candidates[scores[candidates].topk(limit).indices]


def fidelity_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean over samples of the logits' MSE to the targets."""
    per_sample = per_sample_error(logits, targets)
    return (weights * per_sample).sum() / weights.sum().clamp_min(1e-12)


def per_sample_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's MSE of the logits to its targets: what the fidelity term weighs."""
    return (logits - targets).pow(2).mean(1)


@torch.no_grad()
def trimmed_weights(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    trim: float,
    gate: float = 0.0,
) -> torch.Tensor:
    """`weights` with the worst-fitted `trim` share of the `keep` samples set to 0.

    A poisoned sample the bounds start to break is the one they fit worst; dropping it from
    the fidelity term lets them finish the job instead of restoring the backdoor. With
    `gate`, only the worst-fitted of one dominant class are dropped (`one_class_share`).
    """
    per_sample = per_sample_error(logits, targets)
    drop = int(trim * int(keep.sum()))
    if drop == 0:
        return weights
    worst = per_sample.masked_fill(~keep, float("-inf")).topk(drop).indices
    worst = one_class_share(worst, targets.argmax(1), gate)
    return weights.clone().index_fill_(0, worst, 0.0)


def norm_penalty(bounds: list[torch.Tensor], norm: str = "l2") -> torch.Tensor:
    """sum_l ||Z_l||_2 (MM-BM); `rms` divides each by sqrt(numel) so wide layers do not rule."""
    check_known("norm", norm, NORMS)
    terms = [z.norm() / (z.numel() ** 0.5 if norm == "rms" else 1.0) for z in bounds]
    return torch.stack(terms).sum()


def class_margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """f_t(x) - max_{k != t} f_k(x) per sample."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def margin_inputs(
    model: nn.Module,
    image_shape: tuple[int, ...],
    num_classes: int,
    per_class: int,
    steps: int,
    seed: int,
    lr: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MMAC's probes: per class, images in [0, 1] optimised from noise to max its margin."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.rand((len(classes), *image_shape), generator=generator).requires_grad_()
    optimiser = torch.optim.Adam([images], lr=lr)
    for _ in range(steps):
        loss = -class_margin(model(images), classes).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    return images.detach(), classes
