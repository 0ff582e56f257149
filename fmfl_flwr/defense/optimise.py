"""Fit the activation bounds Z of a bounded model on reference data, weights frozen.

Adam over Z only (clamped at 0), fidelity to the objective's targets plus c times a
penalty (see `objectives`). The penalty weight c adapts to what the defender can see:
the bounded model's agreement with the fused model on the `keep` samples (those whose
target is the fused model's own output). High agreement pushes harder (c *= c_up); a
collapse below `collapse_agreement` halves c at once and restores the last good bounds;
the zone between backs off slowly. Agreement on samples where the ensemble overrules
the fused model never lowers c, so keeping the backdoor is never rewarded. Each epoch's
agreement is read from its own training batches (every sample once, before its step), which
saves the separate pass that cost a quarter of an epoch; since the bounds move within the
epoch, the bounds remembered as good are verified by a real pass before they are returned,
newest first, falling back to older ones while they fail (docs/defense.md, "Cost control").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from fmfl_flwr.defense.bounds import (
    BOUND_BUFFER,
    bound_shape,
    bounded_layers,
    bounds_disabled,
    set_bounds,
    weights_frozen,
)
from fmfl_flwr.defense.inversion import invert_trigger
from fmfl_flwr.defense.objectives import (
    FLIP_COUNTS,
    OVERRULE_RANKS,
    OVERRULE_TARGETS,
    Reference,
    check_known,
    class_margin,
    fidelity_loss,
    fidelity_reference,
    margin_inputs,
    norm_penalty,
    one_class_share,
    trimmed_weights,
)
from fmfl_flwr.training import predict_logits, seeded_generator

GRANULARITIES = ("channel", "neuron", "layer")
# Objectives that trust a client ensemble: without one (round 0) they trim instead.
TRIMMING = ("agree", "ensemble-switch")
RUN_CONFIG_PREFIX = "bounds-"


@dataclass
class BoundSettings:
    """Every knob of the bound optimisation; defaults measured in bench/defense_pilot.py."""

    objective: str = "ensemble-switch"
    # "channel": [C,1,1] / [F]; "neuron": one per unit, [C,H,W] / [F]; "layer": a scalar
    granularity: str = "channel"
    init: str = "quantile"  # "quantile" of each channel's per-sample peak, or "constant"
    init_quantile: float = 0.99
    init_value: float = 8.0  # the constant init (MM-BM)
    lr: float = 0.1
    batch_size: int = 200
    epochs: int = 10  # warm starts carry the fit across rounds; 20 cost up to 25% of a round
    # at most this many of `epochs` when last round's bounds start the fit: 5 halved the
    # fit's time at the same ACC / ASR (bench/overrule_choice.py, docs/defense.md)
    warm_epochs: int = 5
    # a fit that overrules nothing (the fused model trusted everywhere) drops a warm start
    # whose starting agreement is below this: it starts over from `init` with `c0`, within
    # `warm_epochs` (0 keeps every warm start). Last round's bounds that no longer fit the
    # fused model are restored on every collapse, a state that was never good (CIFAR-10,
    # stop 31: starts at 18-48%, every epoch collapsed). A fit that overrules keeps them:
    # their cut is what holds the backdoor out (stop 23, "a warm start that no longer fits").
    # 5 epochs gave the bounds 10 gave in all five round-2 replays (bench/warm_restart.py)
    warm_min_agreement: float = 0.9
    max_samples: int = 1000  # random subset of the reference data per call (cost)
    c0: float = 0.5
    c_up: float = 1.2
    target_agreement: float = 0.95
    collapse_agreement: float = 0.9
    patience: int = 2  # checks with the norm shrinking < min_delta before stopping early
    min_delta: float = 0.01
    norm: str = "rms"  # per-layer RMS: 86.3/8.5 vs l2 85.2/10.9 (ACC/ASR %, pilot)
    disagree_weight: float = 3.0
    # round 0 (no client ensemble yet): the share of D_syn that may be poisoned, trimmed
    # from the fidelity term, worst-fitted first; MM-BM and MMAC never trim
    trim: float = 0.2
    # > 0: the trim (round 0) and the ensemble's overrule (later rounds) act only on samples
    # of one dominant class holding >= this share of the candidates (a backdoor's target).
    # Off: it saved clean ACC but let the FM attack through under Dirichlet 0.1 (37% ASR)
    class_gate: float = 0.0
    # later rounds: the ensemble overrules the fused model on at most this share of the
    # reference, the most suspect disagreements (`overrule_rank`); 1 overrules them all
    overrule_cap: float = 0.2
    # > 0: where no class holds `overrule_gate` of the capped set, the gate tries the cap
    # halved up to this many times (`objectives.gated_cap`): a poison under half the cap
    # cannot fill it (5% of D_syn held 27% of the 20% cap, stop 41) but tops the rank; 2
    # finds a poison down to half the 5% cap, and closed on every clean round 1 measured
    overrule_cap_halvings: int = 2
    # which disagreements the cap keeps (`objectives.suspicion`)
    overrule_rank: str = "confidence-drop"
    # what the overruled samples are fitted to (`objectives.overrule_targets`)
    overrule_target: str = "ensemble"
    # > 0: overrule the capped set only if one fused class holds >= this share of it (a
    # backdoor's target; a clean D_syn's suspects spread over the classes), else fit
    # MM-BM's reference; 0.5 kept clean ACC within a point (docs/defense.md, stop 18)
    overrule_gate: float = 0.5
    # > 0: and only if the ensemble's most common class on that class's capped samples holds
    # at most this many times an even share of the other classes (`objectives.source_share`:
    # a backdoor stamps every class). Off: on CIFAR-10 Dirichlet the weak non-IID ensemble
    # gave the poison 4.2 times and clean classes 4.4-8.9 (docs/defense.md, stop 38)
    overrule_source_max: float = 0.0
    # > 0: and only if that share is at most this many times the share of every sample the
    # ensemble puts in the same class (`objectives.source_lift`: the poison's sources look
    # like the rest of D_syn to it, whatever its bias). Off: the poison's 1.0-1.7 came
    # within 0.2 of a clean class's 1.9 on CIFAR-10 (docs/defense.md, stop 39)
    overrule_lift_max: float = 0.0
    # > 0: and only if the fused model's mean probability of that class on those samples is
    # at least this (`objectives.fused_confidence`: a learnt trigger is a sure shortcut).
    # 0.75: the poison's rounds gave 0.89-0.93, clean classes' 0.49-0.64 in rounds 1-3
    # (stop 39) but 0.83-0.87 by rounds 6-8 (stop 40): `overrule_gate_rounds` keeps those out
    overrule_confidence_min: float = 0.75
    # > 0: and only if the fit that overrules the capped set takes at least this share of
    # the gate's class there to the ensemble's classes (`overruled-class-agreement`); else
    # the fit is redone with the gate closed: bounds cut a trigger's out-of-range
    # activations, not a clean class's features. Off: it separates them within a data set
    # (Fashion-MNIST poison 0.79-0.91, a clean class 0.44; CIFAR-10 0.34 and 0.07), not
    # across them (docs/defense.md, stop 42)
    overrule_flip_min: float = 0.0
    # > 0: and only if it takes that class's capped samples there more than this many times
    # as often as the cap's other overruled samples (`overruled-rest-agreement`: how far the
    # fit flips anything on this data set and model); else the same refit. 0.4, the
    # geometric middle of 0.26 and 0.62: a trigger's samples flipped 0.62-0.93 times as
    # often as the rest in three CIFAR-10 round 1s (stops 45-46; 1 refuted the first and
    # the backdoor stayed) and 1.82-21 times in eleven others; of five clean classes the
    # gate was made to name, two flipped 0 and 0.26 times, three 0.90-3.34 (docs/defense.md,
    # stops 43-46)
    overrule_flip_lift_min: float = 0.4
    # which flips those two tests count (`objectives.FLIP_COUNTS`): "onto-target", the
    # share taken to the overruling target's class (the tests' thresholds were set on it);
    # "off-fused", the share taken off the fused model's class to any other. A centred
    # target names a class the bounds need not reach, the fused one among them: its
    # onto-target count refuted CIFAR-10 seed 2's poison at 0.31 and 0.39 times the rest,
    # the off-fused count passed it at 2.43 and 1.29 (docs/defense.md, stops 52-53)
    overrule_flip_count: str = "onto-target"
    # > 0: the last round in which the gate may name a new target; later gates pass only
    # for the class already named. D_syn and its poison are fixed before round 1, whose fit
    # named the target in every attacked run; clean classes filled the cap in rounds 3 and
    # 6, as the fused model outgrew its non-IID clients (docs/defense.md, stop 40)
    overrule_gate_rounds: int = 1
    # the classes this round's gate may name (None: any); `BoundsStep` sets it from
    # `overrule_gate_rounds` and the target already named
    gate_classes: tuple[int, ...] | None = None
    # > 0: drop from the fit the agreements last round's bounds flip, if >= this share of
    # them sit in one fused class (poison the ensemble shares; `fidelity_reference`)
    excuse_flips: float = 0.0
    # < 1: the agreements in the class the gate names leave the agreement count and weigh
    # this much in the fit (`fidelity_reference`); 1 treats them as any agreement. 0 cut
    # ASR in 14 of the 15 FM-attack rounds rerun, at a cost of 1.9 ACC points in one
    # Dirichlet seed (docs/defense.md, "The agreements in the gate's class")
    gate_class_weight: float = 0.0
    # fidelity weight of the disagreements neither overruled nor trusted (fused targets)
    unsure_weight: float = 1.0
    # > 0: once the gate names a target, invert its trigger on the fused model (bounds off)
    # and add clean agreements stamped with it, their clean targets at this weight
    # (`inversion.invert_trigger`); `invert_share` of the reference are stamped
    invert_weight: float = 0.0
    invert_share: float = 0.2
    invert_steps: int = 200
    invert_mask_weight: float = 10.0
    margin_per_class: int = 30  # mmac probes
    margin_steps: int = 100
    prune_max_drop: float = 0.04  # the pruning baseline's allowed reference-accuracy drop
    seed: int = 0

    def __post_init__(self) -> None:
        check_known("granularity", self.granularity, GRANULARITIES)
        if not 0.0 <= self.trim < 1.0:
            raise ValueError(f"bounds trim={self.trim!r} must be in [0, 1)")
        if self.unsure_weight < 0.0:
            raise ValueError(f"bounds unsure-weight={self.unsure_weight!r} must be >= 0")
        if not 0.0 < self.overrule_cap <= 1.0:
            raise ValueError(f"bounds overrule-cap={self.overrule_cap!r} must be in (0, 1]")
        if self.overrule_cap_halvings < 0:
            raise ValueError(
                f"bounds overrule-cap-halvings={self.overrule_cap_halvings!r} must be >= 0")
        if not 0.0 <= self.excuse_flips <= 1.0:
            raise ValueError(f"bounds excuse-flips={self.excuse_flips!r} must be in [0, 1]")
        if not 0.0 <= self.gate_class_weight <= 1.0:
            raise ValueError(
                f"bounds gate-class-weight={self.gate_class_weight!r} must be in [0, 1]"
            )
        if not 0.0 <= self.overrule_gate <= 1.0:
            raise ValueError(f"bounds overrule-gate={self.overrule_gate!r} must be in [0, 1]")
        if self.overrule_source_max < 0.0:
            raise ValueError(
                f"bounds overrule-source-max={self.overrule_source_max!r} must be >= 0")
        if self.overrule_lift_max < 0.0:
            raise ValueError(
                f"bounds overrule-lift-max={self.overrule_lift_max!r} must be >= 0")
        if not 0.0 <= self.overrule_confidence_min <= 1.0:
            raise ValueError(f"bounds overrule-confidence-min={self.overrule_confidence_min!r}"
                             " must be in [0, 1]")
        if not 0.0 <= self.overrule_flip_min <= 1.0:
            raise ValueError(f"bounds overrule-flip-min={self.overrule_flip_min!r}"
                             " must be in [0, 1]")
        if self.overrule_flip_lift_min < 0.0:
            raise ValueError(f"bounds overrule-flip-lift-min={self.overrule_flip_lift_min!r}"
                             " must be >= 0")
        check_known("overrule-flip-count", self.overrule_flip_count, FLIP_COUNTS)
        if self.overrule_gate_rounds < 0:
            raise ValueError(
                f"bounds overrule-gate-rounds={self.overrule_gate_rounds!r} must be >= 0")
        if self.invert_weight < 0.0:
            raise ValueError(f"bounds invert-weight={self.invert_weight!r} must be >= 0")
        if not 0.0 < self.invert_share <= 1.0:
            raise ValueError(f"bounds invert-share={self.invert_share!r} must be in (0, 1]")
        if self.invert_steps < 1:
            raise ValueError(f"bounds invert-steps={self.invert_steps!r} must be >= 1")
        if self.invert_mask_weight < 0.0:
            raise ValueError(
                f"bounds invert-mask-weight={self.invert_mask_weight!r} must be >= 0"
            )
        if not 0.0 <= self.class_gate <= 1.0:
            raise ValueError(f"bounds class-gate={self.class_gate!r} must be in [0, 1]")
        check_known("overrule-rank", self.overrule_rank, OVERRULE_RANKS)
        check_known("overrule-target", self.overrule_target, OVERRULE_TARGETS)
        check_known("init", self.init, ("quantile", "constant"))

    @classmethod
    def run_config_keys(cls) -> tuple[str, ...]:
        """`bounds-<field>` run-config keys (all but the seed, which is the run's)."""
        return tuple(
            RUN_CONFIG_PREFIX + f.name.replace("_", "-") for f in fields(cls) if f.name != "seed"
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], seed: int = 0) -> BoundSettings:
        """Settings from Flower's run config; absent keys keep the measured defaults."""
        values: dict[str, Any] = {"seed": seed}
        for f in fields(cls):
            key = RUN_CONFIG_PREFIX + f.name.replace("_", "-")
            if f.name != "seed" and key in run_config:
                values[f.name] = type(f.default)(run_config[key])
        return cls(**values)


@torch.no_grad()
def quantile_bounds(
    model: nn.Module,
    images: torch.Tensor,
    quantile: float,
    granularity: str = "channel",
    batch_size: int = 500,
) -> dict[str, torch.Tensor]:
    """Bounds at the `quantile` of each channel's per-sample peak activation (unbounded).

    Starts Z where it already binds a little, so the fidelity term has gradient at once
    (with Z above every activation only the penalty moves it).
    """
    layers = bounded_layers(model)
    peaks: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            shapes[name] = bound_shape(output)
            per_unit = granularity == "neuron" or output.dim() <= 2
            peaks[name].append(output if per_unit else output.flatten(2).amax(2))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with bounds_disabled(model):
            predict_logits(model, images, batch_size, device=torch.device("cpu"))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, chunks in peaks.items():
        peak = torch.cat(chunks)
        if granularity == "layer":
            value = torch.quantile(peak.flatten(), quantile).reshape(())
        elif granularity == "neuron":
            value = _column_quantile(peak.flatten(1), quantile).reshape(peak.shape[1:])
        else:
            value = torch.quantile(peak, quantile, dim=0).reshape(shapes[name])
        out[f"{name}.{BOUND_BUFFER}"] = value.clamp_min(1e-3)
    return out


def _column_quantile(values: torch.Tensor, quantile: float, chunk: int = 2**23) -> torch.Tensor:
    """`torch.quantile(values, q, dim=0)` in column chunks (it refuses inputs over 2**24)."""
    step = max(1, chunk // max(len(values), 1))
    return torch.cat([torch.quantile(values[:, i : i + step], quantile, dim=0)
                      for i in range(0, values.shape[1], step)])


def _initial_bounds(
    model: nn.Module,
    images: torch.Tensor,
    settings: BoundSettings,
    warm_start: dict[str, torch.Tensor] | None,
) -> tuple[dict, str]:
    """Last round's bounds when they fit this model, else the configured init.

    The fit is checked on the shapes of two samples' bounds, so a warm start skips the
    full quantile pass.
    """
    shapes = quantile_bounds(model, images[:2], settings.init_quantile, settings.granularity)
    if warm_start is not None and all(
        k in warm_start and warm_start[k].shape == v.shape for k, v in shapes.items()
    ):
        return {k: warm_start[k].clone() for k in shapes}, "warm"
    shaped = quantile_bounds(model, images, settings.init_quantile, settings.granularity)
    if settings.init == "constant":
        return {k: torch.full_like(v, settings.init_value) for k, v in shaped.items()}, "constant"
    return shaped, "quantile"


Agreement = tuple[float, float, float]


def _agreement(
    model: nn.Module, images: torch.Tensor, reference: Reference, trim: float = 0.0,
    gate: float = 0.0,
) -> Agreement:
    """`_agreement_of` the bounded model's predictions on `images` (one forward pass)."""
    predicted = predict_logits(model, images, device=torch.device("cpu")).argmax(1)
    return _agreement_of(predicted, reference, trim, gate)


def _agreement_of(
    predicted: torch.Tensor, reference: Reference, trim: float = 0.0, gate: float = 0.0,
) -> Agreement:
    """(agreement on keep samples, agreement with the overruling targets elsewhere, the
    share of keep samples excused), from one predicted class per reference sample.

    With `trim`, up to a `trim` share of the keep samples may disagree for free (with
    `gate`, only disagreements concentrated on one class: `one_class_share`).
    """
    classes = reference.target_logits.argmax(1)
    hits = predicted == classes
    rest = reference.overruled & (reference.weights > 0)
    kept, excused = 1.0, 0.0
    trusted = int(reference.keep.sum())
    if trusted:
        missed = torch.nonzero(reference.keep & ~hits).flatten()
        excused = min(len(one_class_share(missed, classes, gate)), trim * trusted)
        kept = hits[reference.keep].sum().item() / (trusted - excused)
    fixed = hits[rest].float().mean().item() if rest.any() else float("nan")
    return kept, fixed, excused / max(trusted, 1)


def _verified(
    model: nn.Module,
    images: torch.Tensor,
    reference: Reference,
    candidates: list[tuple[dict[str, torch.Tensor], Agreement | None]],
    settings: BoundSettings,
    trim: float,
) -> tuple[dict[str, torch.Tensor], Agreement, int]:
    """The last candidate whose measured agreement meets the target, set on `model`.

    Candidates are tried last first; one read from training batches (None) is measured by
    a pass of its own. If none meets the target, the best measured one is kept. Returns
    the bounds, their `_agreement` and how many passes the check took.
    """
    checks, chosen = 0, None
    for bounds, measured in reversed(candidates):
        if measured is None:
            set_bounds(model, bounds)
            measured = _agreement(model, images, reference, trim, settings.class_gate)
            checks += 1
        if measured[0] >= settings.target_agreement:
            chosen = (bounds, measured)
            break
        if chosen is None or measured[0] > chosen[1][0]:
            chosen = (bounds, measured)
    set_bounds(model, chosen[0])
    return chosen[0], chosen[1], checks


def optimise_bounds(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    ensemble_logits: torch.Tensor | None = None,
    settings: BoundSettings | None = None,
    warm_start: dict[str, torch.Tensor] | None = None,
    c: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fit the bounds of an already bounded `model` (see `attach_bounds`) on the reference.

    `images`/`labels` are D_syn (or clean data for the oracle), `ensemble_logits` the
    pre-fusion client ensemble's logits on the same images; `warm_start` and `c` carry
    last round's bounds and penalty. The model ends with the returned bounds set. Its
    weights are never changed. Returns (bounds keyed as in the state dict, stats).
    """
    settings = settings or BoundSettings()
    if not bounded_layers(model):
        raise ValueError("the model has no bounds; call attach_bounds(model) first")
    del labels  # the synthetic labels may be poisoned: the targets come from the models
    with weights_frozen(model):
        bounds, stats = _fit_bounds(model, images, ensemble_logits, settings, warm_start, c)
        if not _refuted(stats, settings):
            return bounds, {**stats, "refuted-class": -1.0, "refuted-flips": float("nan"),
                            "refuted-rest-flips": float("nan")}
        # the capped samples resisted the bounds: a clean class, fitted again as one
        closed = replace(settings, gate_classes=())
        bounds, refit = _fit_bounds(model, images, ensemble_logits, closed, warm_start, c)
    named, rest = _counted_flips(stats, settings)
    return bounds, {**refit, "time": stats["time"] + refit["time"],
                    "refuted-class": stats["gate-class"],
                    "refuted-flips": named, "refuted-rest-flips": rest}


def _counted_flips(stats: dict[str, float], settings: BoundSettings) -> tuple[float, float]:
    """The shares of the gate's class and of the rest of the overruled samples that the
    fit flipped, as `overrule_flip_count` counts a flip."""
    if settings.overrule_flip_count == "off-fused":
        return stats["overruled-class-leaves"], stats["overruled-rest-leaves"]
    return stats["overruled-class-agreement"], stats["overruled-rest-agreement"]


def _refuted(stats: dict[str, float], settings: BoundSettings) -> bool:
    """Whether a fit whose gate passed its own test (a round forced to overrule skips it)
    flipped under `overrule_flip_min` of the overruled samples in the gate's class, or no
    more than `overrule_flip_lift_min` times the share of the other overruled samples it
    flipped (none of those: nothing to compare, not refuted; none of either flipped:
    refuted, as a trigger's samples flip)."""
    if settings.overrule_gate <= 0 or stats["gate-class"] < 0:
        return False
    named, rest = _counted_flips(stats, settings)
    lift = settings.overrule_flip_lift_min
    return named < settings.overrule_flip_min or (lift > 0 and named <= lift * rest)


def _fit_bounds(
    model: nn.Module,
    images: torch.Tensor,
    ensemble_logits: torch.Tensor | None,
    settings: BoundSettings,
    warm_start: dict[str, torch.Tensor] | None,
    c: float | None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`optimise_bounds`' fit, its model's weights frozen."""
    started = time.perf_counter()
    layers = bounded_layers(model)
    model.eval()
    generator = seeded_generator(settings.seed)
    if len(images) > settings.max_samples:
        subset = torch.randperm(len(images), generator=generator)[: settings.max_samples]
        images = images[subset]
        ensemble_logits = None if ensemble_logits is None else ensemble_logits[subset]
    with bounds_disabled(model):
        fused_logits = predict_logits(model, images, device=torch.device("cpu"))
        probes = None
        if settings.objective == "mmac":
            num_classes = fused_logits.shape[1]
            probes = margin_inputs(
                model,
                tuple(images.shape[1:]),
                num_classes,
                settings.margin_per_class,
                settings.margin_steps,
                settings.seed,
            )
    initial, init_kind = _initial_bounds(model, images, settings, warm_start)
    z = {k: v.clone().requires_grad_() for k, v in initial.items()}
    for key, value in z.items():
        layers[key.rsplit(".", 1)[0]].act_bound = value
    # through the starting bounds: the overrule rank's evidence and the starting agreement
    bounded_logits = predict_logits(model, images, device=torch.device("cpu"))
    reference = fidelity_reference(
        settings.objective, fused_logits, ensemble_logits, settings.disagree_weight,
        settings.class_gate, settings.overrule_cap, settings.unsure_weight,
        settings.overrule_rank, bounded_logits, settings.excuse_flips, settings.overrule_gate,
        settings.gate_class_weight, settings.overrule_source_max, settings.overrule_lift_max,
        settings.overrule_confidence_min, settings.gate_classes, settings.overrule_cap_halvings,
        settings.overrule_target,
    )
    trim = settings.trim if ensemble_logits is None and settings.objective in TRIMMING else 0.0
    measured = _agreement_of(bounded_logits.argmax(1), reference, trim, settings.class_gate)
    kept = start_agreement = measured[0]
    warm = init_kind == "warm"
    restarted = (warm and start_agreement < settings.warm_min_agreement
                 and not reference.overruled.any())
    if restarted:  # the reference keeps the warm start's evidence; the fit starts over
        initial, _ = _initial_bounds(model, images, settings, None)
        with torch.no_grad():
            for key, value in z.items():
                value.copy_(initial[key])
        measured = _agreement(model, images, reference, trim, settings.class_gate)
        kept, c = measured[0], None
    optimiser = torch.optim.Adam(list(z.values()), lr=settings.lr)
    c = settings.c0 if c is None else c

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in z.items()}

    reference_size, overruled_share = len(images), float(reference.overruled.float().mean())
    # the stamped copies join the fit after the starting agreement, on the reference only
    inversion: dict[str, float] = {}
    if settings.invert_weight > 0 and reference.overruled.any():
        images, reference, inversion = _with_inverted_trigger(
            model, images, fused_logits, reference, settings, generator)
    # bounds remembered as good, newest last, each with its measured agreement (None: read
    # from the batches of the epoch that ended with them, to be verified before returning)
    good: list[tuple[dict[str, torch.Tensor], Agreement | None]] = []
    if kept >= settings.target_agreement:
        good.append((snapshot(), measured))
    best = (kept, snapshot())
    previous_norm = norm_penalty(list(z.values()), settings.norm).item()
    quiet, epochs_run, collapses = 0, 0, 0
    for _ in range(min(settings.epochs, settings.warm_epochs) if warm else settings.epochs):
        epochs_run += 1
        order = torch.randperm(len(images), generator=generator)
        predicted = torch.empty(len(images), dtype=torch.long)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            logits = model(images[batch])
            predicted[batch] = logits.detach().argmax(1)
            weights = reference.weights[batch]
            if trim:
                weights = trimmed_weights(
                    logits, reference.target_logits[batch], weights, reference.keep[batch], trim,
                    settings.class_gate,
                )
            loss = fidelity_loss(logits, reference.target_logits[batch], weights)
            if probes is None:
                loss = loss + c * norm_penalty(list(z.values()), settings.norm)
            else:
                loss = loss + c * class_margin(model(probes[0]), probes[1]).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for value in z.values():
                    value.clamp_(min=0)
        kept, _, _ = _agreement_of(predicted, reference, trim, settings.class_gate)
        if kept > best[0]:
            best = (kept, snapshot())
        if kept < settings.collapse_agreement:
            c *= 0.5
            collapses += 1
            restore = good[-1][0] if good else best[1]
            with torch.no_grad():
                for key, value in z.items():
                    value.copy_(restore[key])
            quiet = 0
            continue
        if kept >= settings.target_agreement:
            good.append((snapshot(), None))
            c *= settings.c_up
        else:
            c /= settings.c_up
        norm = norm_penalty(list(z.values()), settings.norm).item()
        shrink = (previous_norm - norm) / max(previous_norm, 1e-12)
        previous_norm = norm
        quiet = (
            quiet + 1 if kept >= settings.target_agreement and shrink < settings.min_delta else 0
        )
        if quiet >= settings.patience:
            break
    # the batch-read best is the last resort: tried after every good candidate
    final, (kept, fixed, excused), checks = _verified(
        model, images, reference, [(best[1], None), *good], settings, trim
    )
    stats = {
        "time": time.perf_counter() - started,
        "epochs": float(epochs_run),
        "c": c,
        "agreement": kept,
        "start-agreement": start_agreement,
        "collapses": float(collapses),
        "overruled-agreement": fixed,
        **_class_flips(model, images[:reference_size], reference, fused_logits),
        "overruled-share": overruled_share,
        "capped-share": reference.capped_share,
        "cap-top-class-share": reference.cap_top_class_share,
        "cap-rise": reference.cap_rise,
        "cap-source-share": reference.cap_source_share,
        "cap-source-lift": reference.cap_source_lift,
        "cap-fused-confidence": reference.cap_fused_confidence,
        "cap-top-class": float(reference.cap_top_class),
        "flips-excused-share": reference.flips_excused / reference_size,
        "gate-class-spared-share": reference.gate_class_spared / reference_size,
        "gate-class": float(reference.gate_class),
        "ensemble-top-share": reference.ensemble_top_share,
        "trimmed-share": trim,
        "excused-share": excused,
        "samples": float(reference_size),
        "warm-start": float(warm),
        "warm-restart": float(restarted),
        "verify-passes": float(checks),
        "bound-norm": norm_penalty(list(final.values()), settings.norm).item(),
        **inversion,
    }
    return final, stats


def _class_flips(model: nn.Module, images: torch.Tensor, reference: Reference,
                 fused_logits: torch.Tensor) -> dict[str, float]:
    """Of the overruled samples in the gate's class and of the other overruled ones, the
    shares the bounded `model` gives their overruling target's class (`-agreement`) and
    any class but the fused model's (`-leaves`); nan where there are none: a trigger's
    samples flip once the bounds cut it; a clean class's may not."""
    overruled = reference.overruled[: len(images)]
    counts = ("overruled-class-agreement", "overruled-rest-agreement",
              "overruled-class-leaves", "overruled-rest-leaves")
    if not overruled.any():
        return dict.fromkeys(counts, float("nan"))
    predicted = predict_logits(model, images, device=torch.device("cpu")).argmax(1)
    onto = predicted == reference.target_logits[: len(images)].argmax(1)
    fused = fused_logits.argmax(1)
    off = predicted != fused
    named = overruled & (fused == reference.gate_class)

    def share(flipped: torch.Tensor, chosen: torch.Tensor) -> float:
        return flipped[chosen].float().mean().item() if chosen.any() else float("nan")
    return dict(zip(counts, (share(onto, named), share(onto, overruled & ~named),
                             share(off, named), share(off, overruled & ~named)), strict=True))


def _with_inverted_trigger(
    model: nn.Module,
    images: torch.Tensor,
    fused_logits: torch.Tensor,
    reference: Reference,
    settings: BoundSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, Reference, dict[str, float]]:
    """`images` and `reference` with clean agreements stamped by the inverted trigger.

    The target is the fused class that fills the overruled cap. The trigger is inverted on
    clean agreements of the other classes through the fused model, bounds off; a random
    `invert_share` of the reference (drawn from those agreements) is stamped with it and
    given its clean target at `invert_weight`. The stamped copies stay out of the
    agreement count and the overruled set, so `c` and the stats see the reference only.
    """
    started = time.perf_counter()
    classes = fused_logits.argmax(1)
    target = reference.gate_class
    clean = torch.nonzero(reference.keep & (classes != target)).flatten()
    if len(clean) == 0:
        return images, reference, {}
    with bounds_disabled(model):
        trigger, sent = invert_trigger(
            model, images[clean], target, settings.invert_steps, settings.invert_mask_weight,
            seed=settings.seed)
    count = min(len(clean), max(1, int(settings.invert_share * len(images))))
    chosen = clean[torch.randperm(len(clean), generator=generator)[:count]]
    none = torch.zeros(count, dtype=torch.bool)
    stamped = replace(
        reference,
        target_logits=torch.cat([reference.target_logits, reference.target_logits[chosen]]),
        weights=torch.cat([reference.weights, torch.full((count,), settings.invert_weight)]),
        keep=torch.cat([reference.keep, none]),
        overruled=torch.cat([reference.overruled, none]),
    )
    stats = {
        "inverted-target": float(target),
        "inverted-sent": sent,
        "inverted-mask-pixels": float(trigger.mask[0].sum()),
        "inverted-share": count / len(images),
        "inversion-time": time.perf_counter() - started,
    }
    return torch.cat([images, trigger.stamp(images[chosen])]), stamped, stats
