"""The experiment configuration: Flower's run config, typed and checked before any work.

Keys are the run-config names (`num-server-rounds`); fields are the same in snake_case.
Defaults here mirror `[tool.flwr.app.config]` in pyproject.toml, which is the default
experiment. Every key is documented in README.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fmfl_flwr.data import DATASETS
from fmfl_flwr.defense.objectives import FLIP_COUNTS, OVERRULE_RANKS, OVERRULE_TARGETS
from fmfl_flwr.models import MODELS
from fmfl_flwr.partition import PARTITIONS
from fmfl_flwr.training import LR_SCHEDULES

FM_ATTACKS = ("none", "poisoned-pipeline", "poisoned-weights")
CLIENT_ATTACKS = ("none", "badnets", "blended", "dba", "scaling")
TRIGGER_NAMES = ("badnets", "blended", "dba", "image")
# where the server cuts D_syn to `syn-per-class` rows per label (fmfl_flwr.foundation.intake)
SYN_LABEL_CAPS = ("off", "pretrain", "all")
# Run-config values that turn the default experiment (the mission's case) into plain FedAvg.
PLAIN_FEDAVG = {"fusion": False, "fm-attack": "none", "defense": "none"}


class ConfigError(ValueError):
    """A run-config key has a value the project cannot use."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class ExperimentConfig:
    # data and model
    dataset: str = field(default="fashion-mnist", metadata=_choices(*DATASETS))
    data_dir: str = ""
    model: str = field(default="cnn", metadata=_choices(*MODELS))
    model_width: int = field(default=64, metadata={"min": 1})
    partition: str = field(default="iid", metadata=_choices(*PARTITIONS))
    dirichlet_alpha: float = field(default=0.1, metadata={"min_exclusive": 0.0})
    public_fraction: float = field(default=0.1, metadata={"min": 0.0, "max_exclusive": 1.0})
    data_fraction: float = field(default=1.0, metadata={"min_exclusive": 0.0, "max": 1.0})
    # federated learning
    num_server_rounds: int = field(default=5, metadata={"min": 1})
    fraction_train: float = field(default=1.0, metadata={"min_exclusive": 0.0, "max": 1.0})
    fraction_evaluate: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    min_replies: int = field(default=1, metadata={"min": 1})
    local_epochs: int = field(default=1, metadata={"min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    lr: float = field(default=0.05, metadata={"min_exclusive": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    seed: int = 0
    round_timeout: float = field(default=3600.0, metadata={"min_exclusive": 0.0})
    aggregation: str = "fedavg"  # checked against the strategy registry by the ServerApp
    # FM-FL
    fusion: bool = True
    fm: str = ""
    fm_steps: int = field(default=10, metadata={"min": 1})
    syn_per_class: int = field(default=1000, metadata={"min": 1})
    syn_label_cap: str = field(default="off", metadata=_choices(*SYN_LABEL_CAPS))
    pretrain_epochs: int = field(default=2, metadata={"min": 0})
    pretrain_lr_schedule: str = field(default="constant", metadata=_choices(*LR_SCHEDULES))
    distill_epochs: int = field(default=1, metadata={"min": 0})
    distill_alpha: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    distill_tau: float = field(default=2.0, metadata={"min_exclusive": 0.0})
    distill_lr: float = field(default=0.001, metadata={"min_exclusive": 0.0})
    distill_batch_size: int = field(default=64, metadata={"min": 1})
    distill_bounds: bool = False  # fusion distils with the served bounds off (docs/defense.md)
    # fusion relabels the named target's disputed D_syn labels (docs/defense.md)
    distill_relabel_target: bool = False
    # fusion teaches the named target's suspected poison away from it (docs/defense.md);
    # acts only where fusion runs with activation-bounds, whose overrule gate names targets
    distill_unlearn_poison: bool = True
    # ... and teaches that poison the client ensemble's other classes (KL without the target)
    distill_unlearn_teacher: bool = False
    # ... at most bounds-overrule-cap of D_syn, the target's kept images weighted up to the
    # requested count (acts only where fusion unlearns; docs/defense.md, stop 56)
    distill_unlearn_restore_target: bool = True
    defense: str = "activation-bounds"  # checked against the registry (fmfl_flwr.app_config)
    # activation-bounds knobs (fmfl_flwr.defense.BoundSettings; docs/defense.md)
    bounds_objective: str = field(default="ensemble-switch", metadata=_choices(
        "mm-bm", "agree", "ensemble-switch", "mmac"))
    bounds_granularity: str = field(default="channel",
                                    metadata=_choices("channel", "neuron", "layer"))
    bounds_epochs: int = field(default=10, metadata={"min": 1})  # the cost cap (<= 10% of a round)
    # the cap when the fit starts from last round's bounds (every round after the first fit)
    bounds_warm_epochs: int = field(default=5, metadata={"min": 1})
    # a fit that overrules nothing drops a warm start the fused model agrees with on less
    # than this share for a fresh one (init, c0, warm epochs); 0 keeps every warm start
    bounds_warm_min_agreement: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    bounds_samples: int = field(default=1000, metadata={"min": 1})
    bounds_lr: float = field(default=0.1, metadata={"min_exclusive": 0.0})
    bounds_c0: float = field(default=0.5, metadata={"min": 0.0})
    bounds_init_quantile: float = field(default=0.99, metadata={"min_exclusive": 0.0,
                                                                 "max": 1.0})
    bounds_target_agreement: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})
    # round 0 (no client ensemble yet): the share of D_syn assumed poisoned, trimmed from
    # the bounds' fidelity term
    bounds_trim: float = field(default=0.2, metadata={"min": 0.0, "max_exclusive": 1.0})
    # > 0: the trim and the ensemble's overrule act only on one class holding >= this share
    bounds_class_gate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # later rounds: the ensemble overrules the fused model on at most this share of D_syn
    bounds_overrule_cap: float = field(default=0.2, metadata={"min_exclusive": 0.0, "max": 1.0})
    # > 0: where no class fills the cap, the gate tries it halved up to this many times (a
    # poison under half the cap tops the suspicion rank without filling it)
    bounds_overrule_cap_halvings: int = field(default=2, metadata={"min": 0})
    # which disagreements the cap keeps: the fused model's confidence (+ its drop under
    # last round's bounds)
    bounds_overrule_rank: str = field(default="confidence-drop",
                                      metadata=_choices(*OVERRULE_RANKS))
    # what the overruled samples are fitted to: the client ensemble's logits, or those
    # with its per-class mean over the fit's samples divided out (a non-IID ensemble's bias)
    bounds_overrule_target: str = field(default="ensemble",
                                        metadata=_choices(*OVERRULE_TARGETS))
    # > 0: overrule the cap only where one fused class holds >= this share of it, else
    # fit MM-BM's reference
    bounds_overrule_gate: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    # > 0: and only where the client ensemble's classes on that class's capped samples
    # spread (a backdoor's sources), its most common one holding at most this many times
    # an even share of the other classes (off: it did not separate them on CIFAR-10)
    bounds_overrule_source_max: float = field(default=0.0, metadata={"min": 0.0})
    # > 0: and only where that share is at most this many times the share of all D_syn the
    # ensemble puts in the same class (its own bias divided out; off: it did not separate
    # them on CIFAR-10)
    bounds_overrule_lift_max: float = field(default=0.0, metadata={"min": 0.0})
    # > 0: and only where the fused model's mean probability of that class on those samples
    # is at least this (a learnt trigger is a sure shortcut; a clean class's reach it late)
    bounds_overrule_confidence_min: float = field(default=0.75,
                                                  metadata={"min": 0.0, "max": 1.0})
    # > 0: and only where the fit that overrules the capped set takes at least this share
    # of the gate's class there to the client ensemble's classes; else the fit is redone
    # with the gate closed (bounds cut a trigger, not a clean class's features; off: no
    # one value separated them on both data sets)
    bounds_overrule_flip_min: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # > 0: and only where it takes that class there more than this many times as often as
    # the cap's other overruled samples; else the same refit (a clean class can resist the
    # bounds that a trigger's samples give way to; CIFAR-10's poison flipped 0.62-0.93
    # times as often as the rest, two of five clean classes 0 and 0.26 times)
    bounds_overrule_flip_lift_min: float = field(default=0.4, metadata={"min": 0.0})
    # which flips those two tests count: onto the overruling target's class, or off the
    # fused model's class (a centred target names a class the bounds need not reach)
    bounds_overrule_flip_count: str = field(default="onto-target",
                                            metadata=_choices(*FLIP_COUNTS))
    # > 0: the last round whose gate may name a new target (D_syn's poison is there from
    # round 1; later, only the named class passes); 0: every round
    bounds_overrule_gate_rounds: int = field(default=1, metadata={"min": 0})
    # > 0: drop from the fit the agreements last round's bounds flip, if >= this share of
    # them sit in one fused class (poison the client ensemble shares)
    bounds_excuse_flips: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # < 1: the agreements in the class the gate names leave the agreement count and weigh
    # this much in the fit (the poison the client ensemble shares sits there)
    bounds_gate_class_weight: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # the fidelity weight of the disagreements it does not overrule (fused targets)
    bounds_unsure_weight: float = field(default=1.0, metadata={"min": 0.0})
    # > 0: once the gate names a target, clean agreements stamped with its inverted trigger
    # join the fit at this weight (`invert-share` of the reference; Neural Cleanse's steps
    # and mask penalty)
    bounds_invert_weight: float = field(default=0.0, metadata={"min": 0.0})
    bounds_invert_share: float = field(default=0.2, metadata={"min_exclusive": 0.0, "max": 1.0})
    bounds_invert_steps: int = field(default=200, metadata={"min": 1})
    bounds_invert_mask_weight: float = field(default=10.0, metadata={"min": 0.0})
    client_bounds: bool = True
    # metrics.csv also holds acc-unbounded and asr-unbounded: the served model with its
    # bounds off, what fusion made, so a round's ACC gap splits into the bounds' and fusion's
    eval_unbounded: bool = False
    # > 0: clients add this weight times the KL divergence from the served model's softmax
    # on their own data, so training on a few classes forgets less of the others
    client_distill: float = field(default=0.0, metadata={"min": 0.0})
    # threats
    fm_attack: str = field(default="poisoned-pipeline", metadata=_choices(*FM_ATTACKS))
    client_attack: str = field(default="none", metadata=_choices(*CLIENT_ATTACKS))
    trigger: str = field(default="badnets", metadata=_choices(*TRIGGER_NAMES))
    trigger_image: str = ""
    malicious_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    malicious_clients: str = ""
    poison_ratio: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    target_label: int = field(default=0, metadata={"min": 0, "max": 9})
    attack_rounds: str = ""
    boost: float = field(default=0.0, metadata={"min": 0.0})
    attack_norm_bound: float = field(default=0.0, metadata={"min": 0.0})
    # adaptive: malicious clients send their activation bounds back lifted (UNBOUNDED), so
    # the server would aggregate and distil from their unbounded models if it trusted them
    attack_lift_bounds: bool = False
    # results
    output_dir: str = ""
    run_name: str = ""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any],
                        extra_keys: tuple[str, ...] = ()) -> ExperimentConfig:
        """Parse and check every key; unknown keys and bad values raise ConfigError.

        `extra_keys` are keys that other components parse themselves (e.g. the
        aggregation rules' own parameters); they are let through unchecked here.
        """
        by_key = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(by_key) - set(extra_keys))
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; accepted: {sorted(by_key)}")
        values = {by_key[k].name: _coerce(k, v, by_key[k]) for k, v in run_config.items()
                  if k in by_key}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f.name.replace("_", "-"), getattr(self, f.name), f.metadata)
        if self.partition == "dirichlet" and not math.isfinite(self.dirichlet_alpha):
            raise ConfigError(f"dirichlet-alpha={self.dirichlet_alpha} must be finite")
        if self.trigger == "image" and not self.trigger_image:
            raise ConfigError("trigger='image' needs trigger-image=<path to an image file>")
        parse_int_list("malicious-clients", self.malicious_clients)
        parse_int_list("attack-rounds", self.attack_rounds)
        if self.attack_lift_bounds and self.client_attack == "none":
            raise ConfigError("attack-lift-bounds=true needs a client-attack (the malicious "
                              f"clients lift their bounds); got client-attack='none'. "
                              f"Accepted: {', '.join(CLIENT_ATTACKS[1:])}")
        if self.fm_attack != "none" and not self.fusion:
            raise ConfigError(
                f"fm-attack={self.fm_attack!r} needs fusion=true: the FM only reaches the "
                "model through FM-FL pre-training and fusion"
            )
        if self.distill_relabel_target and (not self.fusion or
                                            self.defense != "activation-bounds"):
            raise ConfigError(
                "distill-relabel-target=true needs fusion=true and "
                "defense='activation-bounds' (the defense whose overrule gate names the "
                f"target); got fusion={self.fusion}, defense={self.defense!r}"
            )
        if self.distill_unlearn_teacher and not self.distill_unlearn_poison:
            raise ConfigError("distill-unlearn-teacher=true changes how the suspected poison "
                              "is unlearned and needs distill-unlearn-poison=true; got "
                              "distill-unlearn-poison=false")

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved_run_name(self) -> str:
        """The run folder's name: `run-name`, else one derived from the main settings."""
        if self.run_name:
            return self.run_name
        threat = "-".join(a for a in (self.fm_attack, self.client_attack) if a != "none")
        parts = [self.dataset, self.model, self.partition, self.aggregation,
                 "fusion" if self.fusion else "", threat, self.defense if self.defense != "none"
                 else "", f"seed{self.seed}"]
        return "-".join(p for p in parts if p)


def parse_int_list(key: str, text: str) -> list[int]:
    """'1,3,5' or '2-4' (inclusive) or a mix; empty means none given."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                out.extend(range(low, high + 1))
            else:
                out.append(int(part))
        except ValueError as err:
            raise ConfigError(f"{key}={text!r}: expected integers like '1,3' or '2-5'") from err
    return out


def _coerce(key: str, value: Any, spec: dataclasses.Field) -> Any:
    kind = spec.type if isinstance(spec.type, type) else {"int": int, "float": float,
                                                            "bool": bool, "str": str}[spec.type]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or not float(value).is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={value!r}: expected a number") from err
    return str(value)


def _check_field(key: str, value: Any, rules: dict[str, Any]) -> None:
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key}={value!r} is not known; accepted: {', '.join(rules['choices'])}")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{key}={value!r} must be >= {rules['min']}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{key}={value!r} must be <= {rules['max']}")
    if "min_exclusive" in rules and value <= rules["min_exclusive"]:
        raise ConfigError(f"{key}={value!r} must be > {rules['min_exclusive']}")
    if "max_exclusive" in rules and value >= rules["max_exclusive"]:
        raise ConfigError(f"{key}={value!r} must be < {rules['max_exclusive']}")


# What the code did before each of these keys existed, where that is not the key's default
# now: the key came with its new behaviour on, or its default later flipped. None: no value
# of the key reproduces it (before bounds-trim, round 0 had no defense step at all).
BEFORE_THE_KEY: dict[str, Any] = {
    "distill-bounds": True,  # 791339e: fusion distilled through the served bounds
    "bounds-trim": None,  # b8803c4: the round-0 step came with it
    "bounds-overrule-cap": 1.0,  # 37faf6a: the ensemble overruled every disagreement
    "bounds-overrule-rank": "confidence",  # fedd23c
    "bounds-overrule-gate": 0.0,  # bd90953: overrule whatever class fills the cap
    "bounds-gate-class-weight": 1.0,  # 43f6497: the gate's class agreements counted
    "distill-unlearn-poison": False,  # 07a267e: on by default since 970d938 (stop 29)
    "bounds-warm-min-agreement": 0.0,  # 51d5fa3: a warm start was never dropped
    "bounds-overrule-confidence-min": 0.0,  # dfc5888, on since 0f20734: the gate did not ask
    "bounds-overrule-gate-rounds": 0,  # stop 40: any round's gate could name a new target
    "bounds-overrule-cap-halvings": 0,  # stop 41: the gate tested the whole cap alone
    "bounds-overrule-flip-lift-min": 0.0,  # stop 43: the gate did not weigh the fit's flips
    "distill-unlearn-restore-target": False,  # stop 56: the split uncapped, no weights
}


def complete_run_config(recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A run config recorded by an older version, with the keys added since as that version
    ran: `BEFORE_THE_KEY`, else `defaults` (a key that kept the old behaviour)."""
    before = {**BEFORE_THE_KEY,  # before fedd23c a warm fit ran all of bounds-epochs
              "bounds-warm-epochs": recorded.get("bounds-epochs", defaults.get("bounds-epochs"))}
    return {**defaults, **{k: v for k, v in before.items() if k in defaults}, **recorded}
