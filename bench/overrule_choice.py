"""Which disagreements should the client ensemble overrule? One round's fit, several ways.

Under Dirichlet 0.1 the non-IID client ensemble disagrees with the fused model on 40-50%
of D_syn, far more than the poisoned share, and following it everywhere costs ACC. This
bench runs the FM-FL loop in one process (as `bench/fmfl_loop.py`: pre-training and the
round-0 fit, clients through the served bounds, FedAvg, fusion), and after each round's
fusion fits the bounds with every `--variants` setting from the same fused model, warm
start and ensemble; the loop itself goes on with the run config's settings. Each fit is
measured on the real public split (no client trains on it; the test set is not used), and
on D_syn it reports how many poisoned samples the disagreements and the capped overrule
hold under each overrule rank (the poisoned ones are those that differ from the clean
D_syn of the same seed).

    python bench/overrule_choice.py --set partition="'dirichlet'" seed=1 \
        bounds-overrule-rank="'confidence'" bounds-warm-epochs=10 \
        --out bench/results/overrule_choice_dirichlet_seed1.json
    python bench/overrule_choice.py --set partition="'dirichlet'" seed=0 \
        bounds-overrule-rank="'confidence'" bounds-warm-epochs=10 --variants \
        switch-cap0.2 switch-cap0.2-confidence-drop switch-cap0.2-warm5 \
        switch-cap0.2-confidence-drop-warm5 --out bench/results/overrule_rank_dirichlet_seed0.json
    python bench/overrule_choice.py --set partition="'dirichlet'" seed=1 fm-attack="'none'" \
        bounds-overrule-gate=0.0 --rounds 3 --variants stop17-gate0.0 stop17-gate0.5 \
        stop17-mm-bm --out bench/results/gate_clean_dir_s1.json
    # the census only (no fit), with the poison the ensemble agrees with (stop 19); the
    # committed bench/results/shared_poison_dir_s0.json holds the same census and the
    # fits of two variants that existed at 63d2d67
    python bench/overrule_choice.py --set partition="'dirichlet'" seed=0 --rounds 3 \
        --variants --out /tmp/shared_poison_census_dir_s0.json
    # where an ACC gap starts (stop 20): the census rows carry the client ensemble, and
    # defense="'none'" (census only) runs the undefended loop as their reference
    python bench/overrule_choice.py --set partition="'dirichlet'" seed=1 fm-attack="'none'" \
        defense="'none'" --rounds 3 --variants \
        --out bench/results/ensemble_gap_dir_s1_clean_none.json
    # stop 24: the CIFAR-10 census and single-fit variants (the Flower cell's settings),
    # recorded while the gate-class weight was 1 (the rows' "shipped"), hence the --set
    python bench/overrule_choice.py --set dataset="'cifar10'" model="'resnet18'" \
        model-width=16 data-fraction=0.5 bounds-gate-class-weight=1.0 --rounds 3 \
        --variants shipped gate-class-w0 \
        gate-class-w0.3 excuse-flips0.5 --out bench/results/gate_class_cifar10_iid_s0.json
    python bench/overrule_choice.py --set dataset="'cifar10'" model="'resnet18'" \
        model-width=16 data-fraction=0.5 bounds-gate-class-weight=1.0 --rounds 3 \
        --variants cap0.5-gate0 cap1-gate0 \
        disagree-w10 batch50 target0.75 --out bench/results/fit_variants_cifar10_iid_s0.json
    python bench/overrule_choice.py --set partition="'dirichlet'" seed=0 \
        bounds-gate-class-weight=1.0 --rounds 3 \
        --variants shipped gate-class-w0 disagree-w10 batch50 cap1-gate0 \
        --out bench/results/fit_variants_fashion_dir_s0.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from fmfl_loop import fedavg  # the sibling bench's FedAvg by sample count

from fmfl_flwr import attacks
from fmfl_flwr.app_config import bound_settings, fusion_settings, parse_app_config
from fmfl_flwr.cli import app_defaults, parse_overrides
from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.data import load_dataset, to_float
from fmfl_flwr.defense import attach_bounds, bound_keys, load_state_with_bounds, optimise_bounds
from fmfl_flwr.defense.bounds import bounds_disabled, strip_bounds
from fmfl_flwr.defense.objectives import (
    OVERRULE_RANKS,
    flipped_agreements,
    most_suspect,
    suspicion,
    top_class_share,
)
from fmfl_flwr.defense.steps import round_subset
from fmfl_flwr.ensemble import ensemble_logits
from fmfl_flwr.fusion import (
    Fusion,
    flipped_from_target,
    suspected_poison,
)
from fmfl_flwr.metrics import acc_and_asr
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import client_indices, public_split
from fmfl_flwr.training import logits_and_features, predict_logits
from server_app import defense_step, pretrain_and_defend, seed_everything, synthetic_data

# stop 16's fit: the fused confidence ranks the capped disagreements, 10 epochs every round
STOP16 = {"overrule_rank": "confidence", "warm_epochs": 10, "excuse_flips": 0.0}
STOP17 = {"overrule_cap": 0.2, "overrule_rank": "confidence-drop", "warm_epochs": 5,
          "excuse_flips": 0.0, "overrule_gate": 0.0}
VARIANTS = {
    "switch-all": {**STOP16, "overrule_cap": 1.0},
    "switch-all-weight1": {**STOP16, "overrule_cap": 1.0, "disagree_weight": 1.0},
    "agree": {**STOP16, "objective": "agree", "overrule_cap": 1.0},
    "switch-cap0.2": {**STOP16, "overrule_cap": 0.2, "unsure_weight": 1.0},
    "switch-cap0.2-unsure-dropped": {**STOP16, "overrule_cap": 0.2, "unsure_weight": 0.0},
    "switch-cap0.2-confidence-drop": {**STOP16, "overrule_cap": 0.2,
                                      "overrule_rank": "confidence-drop"},
    "switch-cap0.2-warm5": {**STOP16, "overrule_cap": 0.2, "warm_epochs": 5},
    "switch-cap0.2-confidence-drop-warm5": {"overrule_cap": 0.2, "excuse_flips": 0.0,
                                            "overrule_rank": "confidence-drop", "warm_epochs": 5},
    "switch-cap0.2-confidence-drop-warm5-excuse-flips0.5": {
        "overrule_cap": 0.2, "overrule_rank": "confidence-drop", "warm_epochs": 5,
        "excuse_flips": 0.5},
    # stop 18: the stop-17 defaults with the overrule gate (at the time of
    # bench/results/gate_*.json it overruled only the dominant class of the cap)
    **{f"stop17-gate{gate}": {**STOP17, "overrule_gate": gate} for gate in (0.0, 0.5)},
    "stop17-mm-bm": {**STOP17, "objective": "mm-bm"},
    # stop 20: the run config's own fit, and a higher agreement target (bench/results/
    # agreement_dir_s{0,1}.json also hold `count-unsure`, an option tried and removed)
    "shipped": {},
    "target0.97": {"target_agreement": 0.97},
    # stop 22: clean agreements stamped with the trigger inverted toward the gate's target
    **{f"invert-w{w:g}": {"invert_weight": w} for w in (1.0, 3.0)},
    # stop 24: the agreements in the gate's class out of the agreement count, at a weight
    **{f"gate-class-w{w:g}": {"gate_class_weight": w} for w in (0.0, 0.3)},
    "excuse-flips0.5": {"excuse_flips": 0.5},
    # stop 24, CIFAR-10: the ensemble overrules more of the disagreements (gate off), the
    # overruled weigh more, more steps per epoch, an agreement target the warm fit can meet
    **{f"cap{cap:g}-gate0": {"overrule_cap": cap, "overrule_gate": 0.0} for cap in (0.5, 1.0)},
    "disagree-w10": {"disagree_weight": 10.0},
    "batch50": {"batch_size": 50},
    "target0.75": {"target_agreement": 0.75, "collapse_agreement": 0.6},
}


def poison_census(fused_logits, bounded_logits, ensemble_logits, poisoned, clean_labels, cap,
                  features, labels) -> dict[str, float]:
    """Share of D_syn in disagreement, and how the poisoned samples sit in it and in the
    cap under each overrule rank (`bounded_logits`: the fused model through last round's
    bounds, the warm start); per rank also how much of the cap its top fused class holds
    (what `overrule_gate` tests) and who is right there by the clean D_syn's labels."""
    fused_classes, ensemble_classes = fused_logits.argmax(1), ensemble_logits.argmax(1)
    disagree = fused_classes != ensemble_classes
    candidates = torch.nonzero(disagree).flatten()
    census = {"disagree-share": disagree.float().mean().item(),
              "poisoned-among-disagree": poisoned[disagree].float().mean().item(),
              "poisoned-caught-by-disagree": disagree[poisoned].float().mean().item()}
    flipped = flipped_agreements(~disagree, fused_logits, bounded_logits)
    census.update({"flipped-agreement-share": flipped.float().mean().item(),
                   "flipped-top-class-share": top_class_share(torch.nonzero(flipped).flatten(),
                                                              fused_classes),
                   "poisoned-among-flipped-agreement": poisoned[flipped].float().mean().item(),
                   "poisoned-caught-by-flipped-agreement": flipped[poisoned].float().mean().item()})
    fused_right, ensemble_right = fused_classes == clean_labels, ensemble_classes == clean_labels
    for rank in OVERRULE_RANKS:
        scores = suspicion(rank, fused_logits, bounded_logits)
        capped = most_suspect(candidates, scores, cap)
        chosen = torch.zeros_like(disagree)
        chosen[capped] = True
        census[f"poisoned-among-cap[{rank}]"] = poisoned[chosen].float().mean().item()
        census[f"poisoned-caught-by-cap[{rank}]"] = chosen[poisoned].float().mean().item()
        census[f"top-class-share-of-cap[{rank}]"] = top_class_share(capped, fused_classes)
        census[f"fused-right-in-cap[{rank}]"] = fused_right[chosen].float().mean().item()
        census[f"ensemble-right-in-cap[{rank}]"] = ensemble_right[chosen].float().mean().item()
        if rank == "confidence-drop":  # the shipped rank's cap names the target
            census.update(target_agreement_census(fused_logits, bounded_logits,
                                                  ensemble_logits, poisoned, features,
                                                  scores, capped))
            if len(capped):
                census.update(suspects_census(features, fused_logits, bounded_logits, labels,
                                              poisoned, int(fused_classes[capped].mode().values)))
    return census


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    above = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return above.mean().item()


def target_agreement_census(fused_logits, bounded_logits, ensemble_logits, poisoned, features,
                            scores, capped) -> dict[str, float]:
    """The poison the ensemble agrees with: the agreements on the cap's top fused class
    (the target when the gate passes). How much poison they hold, how well scores that
    need no labels separate it from the clean samples of that class (AUROC), and what
    cuts of those scores would drop from the fit: at the cap's lowest or median
    suspicion (confidence-drop), Otsu's split, or nearer the cap's mean penultimate
    feature than the class's. `scores` and `capped`: the suspicion (confidence-drop) and
    the cap it keeps."""
    if len(capped) == 0:
        return {}
    fused_classes = fused_logits.argmax(1)
    target = fused_classes[capped].mode().values
    mine = (fused_classes == target) & (ensemble_logits.argmax(1) == target)

    def confidence(logits):  # in the fused model's class
        return logits.softmax(1).gather(1, fused_classes[:, None]).squeeze(1)

    fused_conf, ensemble_conf = confidence(fused_logits), confidence(ensemble_logits)
    candidates = {"suspicion": scores, "drop": fused_conf - confidence(bounded_logits),
                  "ensemble-unsure": -ensemble_conf,
                  "fused-minus-ensemble": fused_conf - ensemble_conf}
    unit = torch.nn.functional.normalize(features, dim=1)
    to_cap = unit @ torch.nn.functional.normalize(unit[capped].mean(0), dim=0)
    to_class = unit @ torch.nn.functional.normalize(unit[mine].mean(0), dim=0)
    candidates.update({"feature-near-cap": to_cap, "feature-cap-minus-class": to_cap - to_class})
    census = {"target-agreement-share": mine.float().mean().item(),
              "poisoned-among-target-agreement": poisoned[mine].float().mean().item(),
              "poisoned-caught-by-target-agreement": mine[poisoned].float().mean().item()}
    for name, score in candidates.items():
        census[f"auroc-target-agreement[{name}]"] = auroc(score[mine], poisoned[mine])
    rules = {f"cap-q{q}": mine & (scores >= scores[capped].quantile(q)) for q in (0.0, 0.5)}
    for name in ("suspicion", "drop", "feature-cap-minus-class"):
        score = candidates[name]
        rules[f"otsu[{name}]"] = mine & (score > otsu_threshold(score[mine]))
    rules["feature-closer-to-cap"] = mine & (candidates["feature-cap-minus-class"] > 0)
    for name, chosen in rules.items():
        census[f"excused-share[{name}]"] = chosen.float().mean().item()
        census[f"poisoned-among-excused[{name}]"] = poisoned[chosen].float().mean().item()
        census[f"poisoned-caught-by-excused[{name}]"] = chosen[poisoned].float().mean().item()
    return census


def suspects_census(features, fused_logits, bounded_logits, labels, poisoned,
                    target) -> dict[str, float]:
    """What `distill-unlearn-poison` would teach away from `target` (the cap's top fused
    class): the samples labelled `target` that last round's bounds flip away from it, those
    `suspected_poison` finds, and the union; how much poison each holds and catches."""
    flipped = flipped_from_target(labels, fused_logits, bounded_logits, target)
    suspected = suspected_poison(features, fused_logits, bounded_logits, labels, target)
    census = {}
    for name, chosen in (("flipped", flipped), ("suspected", suspected),
                         ("union", flipped | suspected)):
        census[f"unlearn-share[{name}]"] = chosen.float().mean().item()
        census[f"poisoned-among-unlearn[{name}]"] = poisoned[chosen].float().mean().item()
        census[f"poisoned-caught-by-unlearn[{name}]"] = chosen[poisoned].float().mean().item()
    return census


def otsu_threshold(scores: torch.Tensor) -> float:
    """The cut of 1-D `scores` into a low and a high group with the largest between-group
    variance (Otsu); above it is the high group; +inf with fewer than two scores."""
    ordered = scores.sort().values.double()
    if len(ordered) < 2:
        return float("inf")
    low_count = torch.arange(1, len(ordered), dtype=torch.float64)
    low_sum = ordered.cumsum(0)[:-1]
    high_mean = (ordered.sum() - low_sum) / (len(ordered) - low_count)
    between = low_count * (len(ordered) - low_count) * (low_sum / low_count - high_mean) ** 2
    return ordered[between.argmax()].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[],
                        help="run-config overrides key=value, values in TOML as in flwr run")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which fits to run after each fusion (none: the census only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    overrides = parse_overrides(" ".join(args.set))
    config = parse_app_config({**app_defaults(), **overrides})
    if config.defense == "none" and args.variants:
        parser.error("defense='none' runs the undefended loop: its census only, no --variants")
    dataset = load_dataset(config.dataset, config.data_dir)
    syn = synthetic_data(config)
    clean = synthetic_data(parse_app_config({**app_defaults(), **overrides, "fm-attack": "none"}))
    poisoned = (syn[0] != clean[0]).flatten(1).any(1)
    public, _ = public_split(len(dataset.train_y), config.public_fraction, config.seed)
    val_x, val_y = to_float(dataset.train_x[public]), torch.as_tensor(dataset.train_y[public])
    trigger = attacks.evaluation_trigger(config, dataset.image_shape)

    def model_fn():
        return build_model(config.model, config.dataset, dataset.num_classes, config.model_width)

    def validation(model) -> dict[str, float]:
        return acc_and_asr(model, val_x, val_y, trigger, config.target_label)

    def ensemble_validation(states) -> dict[str, float]:
        """The client ensemble (mean logits), bounds as served and off: where an ACC gap
        starts (the clients, their bounds, or the fusion)."""
        keep = val_y != config.target_label
        found = {}

        def client_models(used):
            return (load_state_with_bounds(model_fn(), s) for s in used)

        for name, used in (("ensemble", states), ("ensemble-unbounded",
                                                   [strip_bounds(s) for s in states])):
            clean = ensemble_logits(client_models(used), val_x)[0].argmax(1)
            triggered = ensemble_logits(client_models(used),
                                        trigger.stamp(val_x[keep]))[0].argmax(1)
            found[f"{name}-acc"] = (clean == val_y).float().mean().item()
            found[f"{name}-asr"] = (triggered == config.target_label).float().mean().item()
        return found

    seed_everything(config.seed)
    parts = [client_indices(dataset.train_y, i, args.clients, config.partition,
                            config.dirichlet_alpha, config.public_fraction, config.seed,
                            config.data_fraction) for i in range(args.clients)]
    data = [(to_float(dataset.train_x[p]), torch.as_tensor(dataset.train_y[p])) for p in parts]
    model = model_fn()
    shipped, distilling = bound_settings(config), fusion_settings(config)
    fusion = Fusion(model_fn, *syn, distilling)
    defense = defense_step(config, dataset, model_fn, syn, fusion)
    pretrain_and_defend(model, syn, distilling, defense)
    state = dict(model.state_dict())
    rows = [{"round": 0, "variant": "run", **validation(model)}]
    print(rows[-1], flush=True)
    for server_round in range(1, args.rounds + 1):
        states = [client_update(config, load_state_with_bounds(model_fn(), state), *data[i],
                                dataset.image_shape, server_round, i, args.clients,
                                ClientRole(False, -1, 0))[0] for i in range(args.clients)]
        weights = [float(len(d[1])) for d in data]
        fused = fusion(server_round, fedavg(states, weights), states, weights)
        ensemble = fusion.last_ensemble_logits
        fused_model = load_state_with_bounds(model_fn(), fused)
        bounded_logits = predict_logits(fused_model, syn[0])  # through last round's bounds
        with bounds_disabled(fused_model):
            fused_logits, features = logits_and_features(fused_model, syn[0])
            rows.append({"round": server_round, "variant": "fused, unbounded",
                         **validation(fused_model), **ensemble_validation(states),
                         **poison_census(fused_logits, bounded_logits, ensemble, poisoned,
                                         clean[1], shipped.overrule_cap, features, syn[1])})
        print(rows[-1], flush=True)
        subset = round_subset(len(syn[0]), shipped, server_round)  # the run's own subset
        for name in args.variants:
            settings = replace(shipped, **VARIANTS[name])
            bounded = attach_bounds(load_state_with_bounds(model_fn(), fused))
            started = time.perf_counter()
            _, stats = optimise_bounds(bounded, syn[0][subset], syn[1][subset],
                                       ensemble[subset], settings, defense.last_bounds,
                                       defense.last_c)
            rows.append({"round": server_round, "variant": name,
                         "seconds": time.perf_counter() - started, **stats,
                         **validation(bounded)})
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()},
                  flush=True)
        # defense="'none'": the undefended loop, the reference the census rows compare with
        state = defense(server_round, fused, states, weights) if defense else fused
        served = load_state_with_bounds(model_fn(), state)
        rows.append({"round": server_round, "variant": "run",
                     "bound-keys": len(bound_keys(state)), **validation(served)})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "overrides": args.set, "clients": args.clients, "variants": VARIANTS,
        "settings": asdict(shipped), "evaluated-on": "real public split",
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }, indent=1))


if __name__ == "__main__":
    main()
