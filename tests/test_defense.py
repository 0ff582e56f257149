"""Activation bounds on tiny models: exactness, state round trip, optimisation, pruning."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fmfl_flwr.defense import (
    DEFENSES,
    UNBOUNDED,
    BoundSettings,
    BoundsStep,
    TriggerDetector,
    attach_bounds,
    bound_keys,
    bounded_layers,
    bounds_disabled,
    ensure_bounds_for_state,
    get_bounds,
    load_state_with_bounds,
    make_defense,
    margin_drop,
    optimise_bounds,
    prune_dormant,
    quantile_bounds,
    set_bounds,
    strip_bounds,
)
from fmfl_flwr.defense.inversion import invert_trigger
from fmfl_flwr.defense.objectives import (
    Reference,
    fidelity_reference,
    one_class_share,
    overrule_targets,
    trimmed_weights,
)
from fmfl_flwr.defense.optimise import _agreement, _class_flips, _refuted, _verified
from fmfl_flwr.defense.steps import settings_after_unlearning
from fmfl_flwr.fusion import (
    Fusion,
    FusionSettings,
    distill,
    relabel_disputed,
    restored_target_weights,
    suspected_poison,
    without_class,
)
from fmfl_flwr.models import build_model
from fmfl_flwr.training import predict_logits, train_epochs
from fmfl_flwr.triggers import Trigger


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def task(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = which third of the 8x8 image is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.rand((n, 1, 8, 8), generator=g) * 0.3
    for k in range(3):
        images[labels == k, :, :, k * 2 : k * 2 + 3] += 0.7
    return images, labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = tiny()
    images, labels = task()
    train_epochs(model, images, labels, 4, 64, 0.1, 0, device=torch.device("cpu"))
    return model.eval(), images, labels


@pytest.mark.parametrize("name", ["tiny", "cnn", "resnet18"])
@pytest.mark.parametrize("value", [float("inf"), UNBOUNDED])
def test_unbounded_model_is_bit_identical(name: str, value: float) -> None:
    torch.manual_seed(0)
    model = tiny() if name == "tiny" else build_model(name, "fashion-mnist", width=8)
    x = torch.rand(4, 1, 8, 8) if name == "tiny" else torch.rand(4, 1, 28, 28)
    model.eval()
    before = model(x)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    attach_bounds(model, value=value)
    assert len(bounded_layers(model)) == relus
    assert torch.equal(model(x), before)


def test_bounds_clip_exactly_where_set() -> None:
    model = attach_bounds(tiny(), ["1"]).eval()
    x = torch.rand(5, 1, 8, 8)
    pre = model[0](x).relu()
    bound = torch.full((4, 1, 1), UNBOUNDED)
    bound[2] = 0.1
    set_bounds(model, {"1.act_bound": bound})
    out = model[1](model[0](x))
    assert torch.equal(out[:, 2], pre[:, 2].clamp(max=0.1))
    assert torch.equal(out[:, [0, 1, 3]], pre[:, [0, 1, 3]])
    assert out[:, 2].max() <= 0.1 < pre[:, 2].max()


def test_state_dict_round_trip_carries_bounds() -> None:
    from flwr.app import ArrayRecord

    model = attach_bounds(tiny()).eval()
    set_bounds(model, {"1.act_bound": torch.full((4, 1, 1), 0.2), "4.act_bound": torch.rand(16)})
    state = ArrayRecord(model.state_dict()).to_torch_state_dict()
    assert sorted(bound_keys(state)) == ["1.act_bound", "4.act_bound"]
    fresh = ensure_bounds_for_state(tiny(), state)
    fresh.load_state_dict(state)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model(x))
    assert set(strip_bounds(state)) == set(tiny().state_dict())
    plain = tiny()
    assert ensure_bounds_for_state(plain, strip_bounds(state)) is plain
    assert not bounded_layers(plain)


def test_attach_rejects_unknown_layers() -> None:
    with pytest.raises(ValueError, match="not ReLU modules"):
        attach_bounds(tiny(), ["0"])


def test_switch_objective_targets_the_ensemble_where_models_disagree() -> None:
    fused = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    ensemble = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ref = fidelity_reference("ensemble-switch", fused, ensemble, disagree_weight=3.0)
    assert torch.equal(ref.target_logits, torch.stack([fused[0], ensemble[1], fused[2]]))
    assert ref.keep.tolist() == [True, False, True]
    assert ref.weights.tolist() == [1.0, 3.0, 1.0]
    assert fidelity_reference("agree", fused, ensemble).weights.tolist() == [1.0, 0.0, 1.0]
    assert fidelity_reference("mm-bm", fused, ensemble).keep.all()
    with pytest.raises(ValueError, match="ensemble-switch"):
        fidelity_reference("nope", fused, ensemble)


def test_centred_overrule_target_divides_out_the_ensembles_lean() -> None:
    # an ensemble that calls every sample class 2 (a non-IID one), but sample 0 a little
    # more class 0 than the rest and sample 1 a little more class 1
    ensemble = torch.tensor([[2.0, 0.0, 5.0], [0.0, 2.0, 5.0], [0.0, 0.0, 5.0]])
    assert overrule_targets(ensemble, "ensemble") is ensemble
    centred = overrule_targets(ensemble, "ensemble-centred")
    assert centred.argmax(1).tolist()[:2] == [0, 1]
    assert torch.allclose(centred.mean(0), ensemble.mean().expand(3))  # no class leans
    assert torch.allclose(centred - ensemble, (centred - ensemble)[0].expand(3, 3))
    with pytest.raises(ValueError, match="overrule-target='mean' is not known"):
        overrule_targets(ensemble, "mean")
    with pytest.raises(ValueError, match="overrule-target='mean' is not known"):
        BoundSettings(overrule_target="mean")  # before any fit starts


def test_centred_overrule_target_reaches_only_the_overruled_samples() -> None:
    fused = torch.tensor([[0.0, 0.0, 3.0]] * 10)  # a backdoored fused model's one class
    ensemble = torch.tensor([[2.0, 3.0, 0.0]] + [[0.0, 3.0, 0.0]] * 4 + [[0.0, 0.0, 3.0]] * 5)
    ref = fidelity_reference("ensemble-switch", fused, ensemble, 3.0,
                             overrule_target="ensemble-centred")
    assert ref.overruled.tolist() == [True] * 5 + [False] * 5  # the disagreements
    centred = overrule_targets(ensemble, "ensemble-centred")
    assert torch.equal(ref.target_logits[:5], centred[:5])
    assert torch.equal(ref.target_logits[5:], fused[5:])
    assert ref.target_logits[0].argmax() == 0  # where the raw ensemble said class 1


def test_the_reference_logs_the_ensembles_lean() -> None:
    fused = torch.tensor([[0.0, 0.0, 3.0]] * 10)
    ensemble = torch.tensor([[0.0, 3.0, 0.0]] * 7 + [[0.0, 0.0, 3.0]] * 3)
    ref = fidelity_reference("ensemble-switch", fused, ensemble, 3.0)
    assert ref.ensemble_top_share == pytest.approx(0.7)
    assert math.isnan(fidelity_reference("mm-bm", fused, ensemble).ensemble_top_share)


def test_optimisation_shrinks_bounds_and_keeps_agreement(trained) -> None:
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    weights = {k: v.clone() for k, v in bounded.state_dict().items() if "act_bound" not in k}
    images, labels = images[:300], labels[:300]
    # Start at every channel's peak: nothing binds, only the penalty can move the bounds.
    settings = BoundSettings(
        objective="mm-bm", init_quantile=1.0, lr=0.5, batch_size=100, patience=99
    )
    start = sum(v.norm() for v in quantile_bounds(bounded, images, 1.0).values())
    bounds, stats = optimise_bounds(bounded, images, labels, settings=settings)
    assert stats["bound-norm"] < 0.9 * start
    assert stats["agreement"] >= settings.target_agreement
    assert all(torch.equal(bounded.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(get_bounds(bounded)[k], v) for k, v in bounds.items())


def test_warm_start_uses_previous_bounds(trained) -> None:
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    previous = {k: v * 1.5 for k, v in quantile_bounds(bounded, images, 0.99).items()}
    settings = BoundSettings(epochs=0)
    bounds, stats = optimise_bounds(bounded, images, labels, settings=settings, warm_start=previous)
    assert stats["warm-start"] == 1.0
    assert all(torch.equal(bounds[k], v) for k, v in previous.items())


def test_warm_fit_skips_the_quantile_pass(trained) -> None:
    """Cost: the fused logits, the starting agreement, one forward per sample per epoch
    (its batches, which also give the epoch's agreement), the passes that verify the
    bounds kept, and only the two samples that check the warm start's shapes: no quantile
    pass over the reference data."""
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    images = images[:300]
    previous = quantile_bounds(bounded, images, 0.99)
    forwarded = []
    bounded.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    settings = BoundSettings(epochs=4, patience=99, batch_size=100)
    _, stats = optimise_bounds(bounded, images, labels[:300], torch.randn(300, 3),
                               settings, warm_start=previous)
    assert stats["epochs"] == 4.0 and stats["warm-start"] == 1.0
    assert 1.0 <= stats["verify-passes"] <= 6.0
    assert sum(forwarded) == (2 + 4 + stats["verify-passes"]) * len(images) + 2


def test_fit_reports_its_start_and_collapses(trained) -> None:
    """The stats say where the fit started and how often it collapsed: bounds at every
    peak start at full agreement, closed ones near none; a collapse threshold above 1
    makes every epoch a collapse."""
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    images, labels = images[:300], labels[:300]
    loose = quantile_bounds(bounded, images, 1.0)
    settings = BoundSettings(objective="mm-bm", epochs=3, warm_epochs=1, patience=99)
    _, stats = optimise_bounds(bounded, images, labels, settings=settings, warm_start=loose)
    assert stats["start-agreement"] == 1.0
    assert stats["warm-start"] == 1.0
    closed = {k: torch.zeros_like(v) for k, v in loose.items()}
    _, stats = optimise_bounds(bounded, images, labels, settings=settings, warm_start=closed)
    assert stats["start-agreement"] < 0.5
    _, stats = optimise_bounds(bounded, images, labels,
                               settings=replace(settings, collapse_agreement=1.01))
    assert stats["collapses"] == stats["epochs"] == 3.0


def test_a_warm_start_that_no_longer_fits_is_dropped(trained) -> None:
    """Closed bounds from last round agree with almost nothing: below
    `warm_min_agreement` a fit that overrules nothing starts over from the quantile init
    with c0, within the warm fit's epochs, and ends in agreement; with the rule off, or
    where the ensemble overrules the fused model, it keeps the closed start."""
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    images, labels = images[:300], labels[:300]
    closed = {k: torch.zeros_like(v) for k, v in quantile_bounds(bounded, images, 1.0).items()}
    settings = BoundSettings(objective="mm-bm", epochs=3, warm_epochs=1, patience=99,
                             warm_min_agreement=0.0)
    _, kept = optimise_bounds(bounded, images, labels, settings=settings, warm_start=closed,
                              c=1e-6)
    assert (kept["warm-restart"], kept["epochs"]) == (0.0, 1.0)
    assert kept["agreement"] < settings.collapse_agreement
    restart = replace(settings, warm_min_agreement=0.9)
    _, dropped = optimise_bounds(bounded, images, labels, settings=restart,
                                 warm_start=closed, c=1e-6)
    assert (dropped["warm-restart"], dropped["epochs"]) == (1.0, 1.0)
    assert dropped["start-agreement"] == kept["start-agreement"] < 0.5
    assert dropped["agreement"] >= settings.target_agreement
    loose = quantile_bounds(bounded, images, 1.0)
    _, fitting = optimise_bounds(bounded, images, labels, settings=restart, warm_start=loose)
    assert (fitting["warm-restart"], fitting["epochs"]) == (0.0, 1.0)
    # a fit that overrules the fused model keeps last round's cut, however it fits
    always_zero = torch.zeros(len(images), 3)
    always_zero[:, 0] = 5.0
    overruling = replace(restart, objective="ensemble-switch", overrule_cap=1.0,
                         overrule_gate=0.0)
    _, overruled = optimise_bounds(bounded, images, labels, always_zero, overruling,
                                   warm_start=closed, c=1e-6)
    assert overruled["overruled-share"] > 0
    assert overruled["start-agreement"] < 0.9
    assert (overruled["warm-restart"], overruled["epochs"]) == (0.0, 1.0)


def test_kept_bounds_are_verified_newest_first(trained) -> None:
    """Bounds read as good from training batches are measured before they are returned:
    a failing newest candidate falls back to an older one that passes, and with none
    passing the best measured one is kept."""
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    images = images[:300]
    loose = quantile_bounds(bounded, images, 1.0)
    closed = {k: torch.zeros_like(v) for k, v in loose.items()}
    with torch.no_grad(), bounds_disabled(bounded):
        reference = fidelity_reference("mm-bm", bounded(images), None)
    settings = BoundSettings()
    bounds, agreement, checks = _verified(
        bounded, images, reference, [(loose, None), (closed, None)], settings, 0.0
    )
    assert checks == 2 and agreement[0] == 1.0
    assert all(torch.equal(bounds[k], loose[k]) for k in loose)
    assert all(torch.equal(get_bounds(bounded)[k], loose[k]) for k in loose)
    closed_agreement = _agreement(set_bounds(bounded, closed), images, reference)
    assert closed_agreement[0] < settings.target_agreement  # the test's premise
    # a candidate measured before (0.1) is not measured again; the better measured is kept
    bounds, agreement, checks = _verified(
        bounded, images, reference, [(loose, (0.1, 0.0, 0.0)), (closed, None)], settings, 0.0
    )
    assert checks == 1 and agreement[0] == closed_agreement[0]
    assert all(torch.equal(get_bounds(bounded)[k], closed[k]) for k in closed)


def test_bounds_step_warm_starts_across_rounds(trained) -> None:
    """Round 2 starts from round 1's bounds, and its fit runs at most `warm_epochs`."""
    model, images, labels = trained
    settings = BoundSettings(epochs=3, warm_epochs=1, patience=99, max_samples=300)
    step = make_defense("activation-bounds", tiny, images, labels, settings)
    assert isinstance(step, BoundsStep)
    state = model.state_dict()
    new = step(1, state, [state, state], [1.0, 1.0])
    assert len(bound_keys(new)) == 2
    assert all(torch.equal(new[k], state[k]) for k in state)
    step(2, new, [new], [1.0])
    assert [h["warm-start"] for h in step.history] == [0.0, 1.0]
    assert [h["epochs"] for h in step.history] == [3.0, 1.0]


def test_pruning_masks_dormant_channels(trained) -> None:
    model, images, labels = trained
    model = tiny().eval()
    model.load_state_dict(trained[0].state_dict())
    with torch.no_grad():
        model[0].bias[[1, 3]] = -100.0  # channels 1 and 3 never fire
    bounds, stats = prune_dormant(model, images, labels, max_drop=0.0)
    mask = bounds["1.act_bound"].flatten()
    assert mask[[1, 3]].tolist() == [0.0, 0.0]
    assert stats["pruned"] >= 2
    assert stats["baseline"] - stats["agreement"] <= 0.0


def test_registry_error_lists_names() -> None:
    assert {"none", "activation-bounds", "clean-bounds-oracle", "pruning"} <= set(DEFENSES.names())
    assert make_defense("none", tiny, torch.zeros(1), torch.zeros(1)) is None
    with pytest.raises(ValueError, match="activation-bounds.*pruning"):
        make_defense("nope", tiny, torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="clean"):
        make_defense("clean-bounds-oracle", tiny, torch.zeros(1), torch.zeros(1))


def test_bounds_step_reuses_the_fusion_ensemble(trained) -> None:
    model, images, labels = trained
    always_zero = torch.zeros(len(images), 3)
    always_zero[:, 0] = 5.0
    step = make_defense(
        "activation-bounds",
        tiny,
        images,
        labels,
        BoundSettings(epochs=0, max_samples=300, overrule_cap=1.0, overrule_gate=0.0),
        ensemble_source=lambda: always_zero,
    )
    step(1, model.state_dict(), [], [])
    assert 0.4 < step.history[0]["overruled-share"] < 0.9


def test_settings_from_run_config() -> None:
    keys = BoundSettings.run_config_keys()
    assert "bounds-c0" in keys and "bounds-seed" not in keys
    settings = BoundSettings.from_run_config(
        {"bounds-c0": 2, "bounds-objective": "mm-bm", "lr": 9.0}, seed=3
    )
    assert (settings.c0, settings.objective, settings.lr, settings.seed) == (2.0, "mm-bm", 0.1, 3)
    with pytest.raises(ValueError, match="granularity"):
        BoundSettings.from_run_config({"bounds-granularity": "pixel"})


def test_bounds_disabled_runs_unbounded_and_restores() -> None:
    model = tiny().eval()
    x = torch.rand(3, 1, 8, 8)
    plain = model(x)
    attach_bounds(model)
    set_bounds(model, {"1.act_bound": torch.zeros(4, 1, 1)})
    with bounds_disabled(model):
        assert torch.equal(model(x), plain)
    assert not torch.equal(model(x), plain)


def test_load_state_with_bounds_fits_either_way_round() -> None:
    bounded = attach_bounds(tiny())
    set_bounds(bounded, {"1.act_bound": torch.full((4, 1, 1), 0.3)})
    plain_state, bounded_state = tiny().state_dict(), bounded.state_dict()
    x = torch.rand(2, 1, 8, 8)
    into_plain = load_state_with_bounds(tiny(), bounded_state).eval()
    assert torch.equal(into_plain(x), bounded.eval()(x))
    into_bounded = load_state_with_bounds(attach_bounds(tiny()), plain_state).eval()
    reference = tiny().eval()
    reference.load_state_dict(plain_state)
    assert torch.equal(into_bounded(x), reference(x))
    with pytest.raises(RuntimeError, match="does not fit"):
        load_state_with_bounds(tiny(), {"0.weight": plain_state["0.weight"]})


def test_neuron_granularity_bounds_each_unit(trained) -> None:
    """One bound per spatial unit: a corner unit quiet on the data gets a tight bound."""
    model, images, labels = trained
    bounded = attach_bounds(tiny())
    bounded.load_state_dict(model.state_dict(), strict=False)
    images = images[:200].clone()
    images[:, :, :2, :2] = 0.0  # the top-left corner is dark on every reference image
    per_unit = quantile_bounds(bounded, images, 1.0, "neuron")
    per_channel = quantile_bounds(bounded, images, 1.0, "channel")
    conv, fc = "1.act_bound", "4.act_bound"
    assert per_unit[conv].shape == (4, 8, 8) and per_channel[conv].shape == (4, 1, 1)
    assert per_unit[fc].shape == per_channel[fc].shape == (16,)
    # Each unit's bound is its own peak: never above its channel's peak, below it somewhere.
    assert (per_unit[conv] <= per_channel[conv] + 1e-6).all()
    assert (per_unit[conv][:, 0, 0] < per_channel[conv][:, 0, 0]).any()
    with torch.no_grad():
        peak = bounded[1](bounded[0](images)).amax(0)
    assert torch.allclose(per_unit[conv], peak.clamp_min(1e-3))
    settings = BoundSettings(objective="mm-bm", granularity="neuron", batch_size=100, epochs=3)
    bounds, _ = optimise_bounds(bounded, images, labels[:200], settings=settings)
    assert bounds[conv].shape == (4, 8, 8)
    assert BoundSettings.from_run_config({"bounds-granularity": "neuron"}).granularity == "neuron"


def test_trimmed_weights_drop_the_worst_fitted_trusted_samples() -> None:
    targets = torch.zeros(6, 2)
    logits = torch.tensor([[0.1, 0], [3.0, 0], [0.2, 0], [5.0, 0], [9.0, 0], [0.0, 0]])
    keep = torch.tensor([True, True, True, True, False, True])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    # 40% of the 5 trusted samples: the two worst-fitted trusted ones (3.0 and 5.0), never
    # the overruled sample (9.0) and never in place.
    trimmed = trimmed_weights(logits, targets, weights, keep, 0.4)
    assert trimmed.tolist() == [1.0, 0.0, 1.0, 0.0, 3.0, 1.0]
    assert weights[1] == 1.0
    assert torch.equal(trimmed_weights(logits, targets, weights, keep, 0.1), weights)


def test_gated_switch_overrules_only_the_dominant_fused_class() -> None:
    # Fused vs ensemble classes: samples 0-2 agree; 3, 4, 5 disagree with the fused model
    # saying class 0 (a backdoor's target); 6 disagrees with the fused model saying 1.
    fused = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 0, 0, 1]), 3).float()
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 2, 1, 2]), 3).float()
    plain = fidelity_reference("ensemble-switch", fused, ensemble, 3.0)
    assert plain.keep.tolist() == [True] * 3 + [False] * 4
    assert plain.overruled.tolist() == [False] * 3 + [True] * 4
    gated = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, class_gate=0.6)
    assert gated.overruled.tolist() == [False] * 3 + [True] * 3 + [False]
    assert gated.keep.tolist() == plain.keep.tolist()  # sample 6 is uncertain: not counted
    assert torch.equal(gated.target_logits[6], fused[6]) and gated.weights[6] == 1.0
    assert torch.equal(gated.target_logits[3], ensemble[3]) and gated.weights[3] == 3.0
    # Disagreements spread over classes: nothing is overruled, all keep the fused outputs.
    spread = fidelity_reference("agree", fused, ensemble, class_gate=0.8)
    assert not spread.overruled.any() and spread.weights.tolist() == [1.0] * 7


def test_overrule_cap_keeps_the_disagreements_the_fused_model_is_surest_of() -> None:
    # Samples 0-1 agree; 2-5 disagree, the fused model surest on 4, then 2.
    fused = torch.tensor([[5.0, 0, 0], [0, 5, 0], [3, 0, 0], [1, 0.5, 0], [9, 0, 0],
                          [0, 1, 0.8]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 1, 2]), 3).float()
    capped = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=2 / 6)
    assert capped.overruled.tolist() == [False, False, True, False, True, False]
    assert capped.keep.tolist() == [True, True, False, False, False, False]
    assert torch.equal(capped.target_logits[3], fused[3]) and capped.weights[3] == 1.0
    assert torch.equal(capped.target_logits[4], ensemble[4]) and capped.weights[4] == 3.0
    everything = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=1.0)
    assert everything.overruled.tolist() == [False, False, True, True, True, True]
    dropped = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=2 / 6,
                                 unsure_weight=0.0)
    assert dropped.weights.tolist() == [1.0, 1.0, 3.0, 0.0, 3.0, 0.0]
    agreeing = fidelity_reference("agree", fused, ensemble, overrule_cap=2 / 6,
                                  unsure_weight=0.5)
    assert agreeing.weights.tolist() == [1.0, 1.0, 0.0, 0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="overrule-cap"):
        BoundSettings(overrule_cap=0.0)


def test_confidence_drop_overrules_first_what_last_rounds_bounds_take_away() -> None:
    """Ranked by confidence plus its drop through the bounds, a disagreement the bounds
    flip (sample 3, a trigger's signature) beats one the fused model is surer of (2)."""
    fused = torch.tensor([[5.0, 0, 0], [0, 5, 0], [3, 0, 0], [1, 0.5, 0], [9, 0, 0],
                          [0, 1, 0.8]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 1, 2]), 3).float()
    bounded = fused.clone()
    bounded[3] = torch.tensor([-5.0, 5, 0])
    ranked = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=2 / 6,
                                overrule_rank="confidence-drop", bounded_logits=bounded)
    assert ranked.overruled.tolist() == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="needs the bounded logits"):
        fidelity_reference("ensemble-switch", fused, ensemble, overrule_cap=2 / 6,
                           overrule_rank="confidence-drop")
    with pytest.raises(ValueError, match="overrule-rank='margin'.*confidence-drop"):
        BoundSettings(overrule_rank="margin")


def test_overrule_gate_overrules_the_cap_only_where_one_class_fills_it() -> None:
    """The cap keeps the 3 most confident disagreements (2, 4, 5); fused class 0 holds 2
    of them: a gate of 0.6 overrules all three; at 0.7 nothing is overruled and the fused
    model is trusted on every sample, in the agreement count too (MM-BM's reference)."""
    fused = torch.tensor([[5.0, 0, 0], [0, 5, 0], [3, 0, 0], [1, 0.5, 0], [9, 0, 0],
                          [0, 0, 8]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 1, 1]), 3).float()
    capped = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=0.5)
    assert capped.overruled.tolist() == [False, False, True, False, True, True]
    assert capped.cap_top_class_share == pytest.approx(2 / 3)
    gated = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=0.5,
                               overrule_gate=0.6)
    assert torch.equal(gated.overruled, capped.overruled)
    assert torch.equal(gated.weights, capped.weights)
    closed = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=0.5,
                                overrule_gate=0.7)
    mm_bm = fidelity_reference("mm-bm", fused, ensemble)
    assert not closed.overruled.any() and closed.keep.all()
    assert torch.equal(closed.target_logits, mm_bm.target_logits)
    assert torch.equal(closed.weights, mm_bm.weights)
    assert closed.cap_top_class_share == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="overrule-gate=1.5"):
        BoundSettings(overrule_gate=1.5)


def test_a_class_holding_exactly_the_gate_share_passes() -> None:
    """9 of 20 disputed samples in fused class 0 pass a gate of 0.45, with the halved caps
    and without: the share is counted exactly, not as a float32 mean (0.44999999), which
    had one comparison pass it and the other close the gate."""
    fused_classes = torch.tensor([0] * 9 + [1] * 6 + [2] * 5)
    fused = torch.nn.functional.one_hot(fused_classes, 3).float() * 5
    ensemble = torch.nn.functional.one_hot((fused_classes + 1) % 3, 3).float()
    for halvings in (0, 1):
        named = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=1.0,
                                   overrule_gate=0.45, overrule_cap_halvings=halvings)
        assert named.gate_class == 0 and named.cap_top_class_share == 0.45
        assert named.overruled.all()


def test_halved_caps_find_a_poison_too_small_to_fill_the_cap() -> None:
    """The cap keeps the 4 most confident disagreements (0-3), of which fused class 0 holds
    2: under a gate of 0.6. One halving keeps 0 and 1, all class 0, twice its share of the
    cap: the gate passes there and overrules only them. A gate the whole cap passes keeps
    the whole cap. Where the halved cap is no more one class's (1 in class 1), the gate
    stays closed and reports the widest cap. Where class 0 holds 3 of the 4, under a gate
    of 0.8, it passes at the halved cap, all class 0: 4/3 of its share of the cap."""
    fused = torch.tensor([[9.0, 0, 0], [8, 0, 0], [0, 7, 0], [0, 0, 6],
                          [0, 5, 0], [5, 0, 0], [0, 0, 5], [0, 5, 0]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 1, 1, 0, 2, 1]), 3).float()

    def reference(logits: torch.Tensor, gate: float, halvings: int) -> Reference:
        return fidelity_reference("ensemble-switch", logits, ensemble, 3.0, overrule_cap=0.5,
                                  overrule_gate=gate, overrule_cap_halvings=halvings)
    assert not reference(fused, 0.6, 0).overruled.any()
    halved = reference(fused, 0.6, 1)
    assert halved.overruled.tolist() == [True, True] + [False] * 6
    assert halved.gate_class == 0 and halved.cap_top_class_share == 1.0
    assert halved.capped_share == 0.25 and halved.cap_rise == 2.0
    assert reference(fused, 0.5, 1).overruled.tolist() == [True] * 4 + [False] * 4
    spread = fused.clone()
    spread[1] = torch.tensor([0.0, 8, 0])
    closed = reference(spread, 0.6, 1)
    assert not closed.overruled.any() and closed.gate_class == -1
    assert closed.cap_top_class_share == 0.5 and closed.cap_top_class == 1
    assert closed.capped_share == 0.5
    spread_down = fused.clone()
    spread_down[3] = torch.tensor([6.0, 0, 0])
    level = reference(spread_down, 0.8, 1)
    assert level.overruled.tolist() == [True, True] + [False] * 6 and level.gate_class == 0
    assert level.cap_top_class_share == 1.0 and level.capped_share == 0.25
    assert level.cap_rise == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="overrule-cap-halvings=-1"):
        BoundSettings(overrule_cap_halvings=-1)


def test_source_lift_divides_out_the_ensembles_own_bias() -> None:
    """The cap (0, 1, 2) is fused class 0, which the ensemble sees as 1, 1, 2 both times:
    the same source share of 2/3. Where the ensemble puts 5 of all 8 samples in class 1
    (its bias) the lift is (2/3) / (5/8); where it puts only those two there, (2/3) / (2/8).
    A gate with a lift of at most 2 overrules the first cap and trusts the fused model on
    the second; 0 tests nothing. The fused model's confidence there is its mean top
    probability on the three (0.9986): a gate asking 0.99 of it passes, one asking 0.9999
    closes."""
    cap = [[9.0, 0, 0, 0], [8, 0, 0, 0], [7, 0, 0, 0]]

    def reference(rest: list[int], **gate: float) -> Reference:
        fused = torch.tensor(cap + [[5.0 * (k == c) for k in range(4)] for c in rest])
        ensemble = torch.nn.functional.one_hot(torch.tensor([1, 1, 2, *rest]), 4).float()
        return fidelity_reference("ensemble-switch", fused, ensemble, 3.0,
                                  overrule_cap=3 / 8, overrule_gate=0.5, **gate)
    biased, clean = reference([1, 1, 1, 3, 0]), reference([2, 2, 3, 3, 0])
    assert biased.overruled[:3].all() and not biased.overruled[3:].any()
    assert clean.overruled[:3].all() and clean.gate_class == 0
    assert biased.cap_source_share == clean.cap_source_share == pytest.approx(2 / 3)
    assert biased.cap_source_lift == pytest.approx((2 / 3) / (5 / 8))
    assert clean.cap_source_lift == pytest.approx((2 / 3) / (2 / 8))
    assert torch.equal(reference([1, 1, 1, 3, 0], overrule_lift_max=2.0).overruled,
                       biased.overruled)
    gated = reference([2, 2, 3, 3, 0], overrule_lift_max=2.0)
    assert not gated.overruled.any() and gated.keep.all() and gated.gate_class == -1
    assert gated.cap_source_lift == clean.cap_source_lift
    sure = torch.tensor(cap).softmax(1).max(1).values.mean().item()
    assert biased.cap_fused_confidence == clean.cap_fused_confidence == pytest.approx(sure)
    assert torch.equal(reference([1, 1, 1, 3, 0], overrule_confidence_min=0.99).overruled,
                       biased.overruled)
    assert not reference([1, 1, 1, 3, 0], overrule_confidence_min=0.9999).overruled.any()
    with pytest.raises(ValueError, match="overrule-lift-max=-1"):
        BoundSettings(overrule_lift_max=-1)
    with pytest.raises(ValueError, match="overrule-confidence-min=2"):
        BoundSettings(overrule_confidence_min=2)


def test_overrule_gate_stays_closed_where_the_ensemble_sees_one_source_class() -> None:
    """Class 0 fills the cap (0, 1, 2) either way. Where the ensemble sees the three other
    classes there (a backdoor stamping every class) the cap is overruled; where it sees one
    (a clean class the fused model wins over a biased ensemble: 3 times an even share of
    1/3) a test of at most 2 times closes the gate, and no test (0) leaves it open."""
    fused = torch.tensor([[9.0, 0, 0, 0], [8, 0, 0, 0], [7, 0, 0, 0], [0, 5, 0, 0],
                          [0, 0, 5, 0], [0, 0, 0, 5]])
    spread = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 1, 2, 3]), 4).float()
    biased = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 1, 2, 3]), 4).float()
    settings = {"overrule_cap": 0.5, "overrule_gate": 0.5, "overrule_source_max": 2.0}
    backdoor = fidelity_reference("ensemble-switch", fused, spread, 3.0, **settings)
    clean = fidelity_reference("ensemble-switch", fused, biased, 3.0, **settings)
    assert backdoor.overruled.tolist() == [True, True, True, False, False, False]
    assert backdoor.cap_source_share == pytest.approx(1 / 3) and backdoor.gate_class == 0
    assert not clean.overruled.any() and clean.keep.all() and clean.gate_class == -1
    assert clean.cap_top_class_share == 1.0 and clean.cap_source_share == 1.0
    unchecked = fidelity_reference("ensemble-switch", fused, biased, 3.0,
                                   **{**settings, "overrule_source_max": 0.0})
    assert torch.equal(unchecked.overruled, backdoor.overruled)
    with pytest.raises(ValueError, match="overrule-source-max=-1"):
        BoundSettings(overrule_source_max=-1)


def test_excused_flips_leave_the_fit_only_when_one_class_holds_them() -> None:
    """Agreements last round's bounds flip (0, 1 in class 0; 4 in class 1) leave the fit
    and `keep` when one class holds >= the gate of them, and only that class's; flips
    spread over the classes (a clean D_syn's) stay; the disagreements are untouched."""
    fused = torch.tensor([[5.0, 0, 0], [4, 0, 0], [3, 0, 0], [1, 0.5, 0], [0, 5, 0],
                          [0, 4, 0]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 1, 1]), 3).float()
    bounded = fused.clone()
    bounded[[0, 1, 4]] = torch.tensor([0.0, 0, 5])
    plain = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, bounded_logits=bounded)
    excused = fidelity_reference("ensemble-switch", fused, ensemble, 3.0,
                                 bounded_logits=bounded, excuse_flips=0.6)
    assert plain.weights.tolist() == [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]
    assert excused.weights.tolist() == [0.0, 0.0, 3.0, 3.0, 1.0, 1.0]
    assert excused.keep.tolist() == [False, False, False, False, True, True]
    assert excused.flips_excused == 2 and plain.flips_excused == 0
    assert torch.equal(excused.overruled, plain.overruled)
    spread = fidelity_reference("ensemble-switch", fused, ensemble, 3.0,
                                bounded_logits=bounded, excuse_flips=0.7)
    assert torch.equal(spread.weights, plain.weights) and torch.equal(spread.keep, plain.keep)
    assert spread.flips_excused == 0
    with pytest.raises(ValueError, match="excuse-flips needs the bounded logits"):
        fidelity_reference("ensemble-switch", fused, ensemble, excuse_flips=0.5)
    with pytest.raises(ValueError, match="excuse-flips=1.5"):
        BoundSettings(excuse_flips=1.5)


def test_gate_class_agreements_leave_the_count_at_their_weight() -> None:
    """With `gate_class_weight` < 1 the agreements in the class that fills the overruled
    cap (0, 1 in class 0) leave `keep` and weigh that much; the other class's agreements
    and the overruled samples are untouched; with the gate closed nothing is spared."""
    fused = torch.tensor([[5.0, 0, 0], [4, 0, 0], [3, 0, 0], [1, 0.5, 0], [0, 5, 0],
                          [0, 4, 0]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 1, 1]), 3).float()
    plain = fidelity_reference("ensemble-switch", fused, ensemble, 3.0)
    spared = fidelity_reference("ensemble-switch", fused, ensemble, 3.0, gate_class_weight=0.3)
    assert spared.weights.tolist() == pytest.approx([0.3, 0.3, 3.0, 3.0, 1.0, 1.0])
    assert spared.keep.tolist() == [False, False, False, False, True, True]
    assert plain.keep.tolist() == [True, True, False, False, True, True]
    assert spared.gate_class_spared == 2 and plain.gate_class_spared == 0
    assert torch.equal(spared.overruled, plain.overruled)
    assert torch.equal(spared.target_logits, plain.target_logits)
    mixed = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 0, 1]), 3).float()
    closed = fidelity_reference("ensemble-switch", fused, mixed, 3.0, overrule_gate=0.7,
                                gate_class_weight=0.0)
    assert closed.keep.all() and closed.gate_class_spared == 0
    with pytest.raises(ValueError, match="gate-class-weight=1.5"):
        BoundSettings(gate_class_weight=1.5)


def test_gate_trims_only_worst_fitted_of_one_class() -> None:
    classes = torch.tensor([0, 1, 1, 2, 1, 0])
    candidates = torch.tensor([1, 2, 3, 4])  # classes 1, 1, 2, 1: class 1 holds 3 of 4
    assert one_class_share(candidates, classes, 0.0).tolist() == [1, 2, 3, 4]
    assert one_class_share(candidates, classes, 0.7).tolist() == [1, 2, 4]
    assert one_class_share(candidates, classes, 0.8).tolist() == []
    # In the weights: the worst 3 of 6 are samples 1, 3, 4 (classes 1, 0, 1 by target).
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0, 1, 0]), 2).float() * 9
    logits = targets.clone()
    logits[[1, 3, 4], 0] += torch.tensor([4.0, 3.0, 5.0])
    weights, keep = torch.ones(6), torch.ones(6, dtype=torch.bool)
    assert trimmed_weights(logits, targets, weights, keep, 0.5).tolist() == [1, 0, 1, 0, 0, 1]
    assert trimmed_weights(logits, targets, weights, keep, 0.5, 0.6).tolist() == [
        1, 0, 1, 1, 0, 1]
    assert torch.equal(trimmed_weights(logits, targets, weights, keep, 0.5, 0.9), weights)
    with pytest.raises(ValueError, match="class-gate"):
        BoundSettings(class_gate=1.5)


def test_gated_fit_excuses_no_spread_disagreement(trained) -> None:
    """On clean data the worst-fitted spread over classes: a strict gate fits as untrimmed."""
    model, images, labels = trained

    def fit(trim: float, gate: float) -> dict[str, float]:
        bounded = attach_bounds(tiny())
        bounded.load_state_dict(model.state_dict(), strict=False)
        settings = BoundSettings(trim=trim, class_gate=gate, batch_size=100, epochs=30,
                                 patience=99, lr=0.2)
        return optimise_bounds(bounded, images[:300], labels[:300], settings=settings)[1]

    plain, trimmed, gated = fit(0.0, 0.0), fit(0.3, 0.0), fit(0.3, 1.0)
    assert trimmed["bound-norm"] < plain["bound-norm"]
    assert gated["bound-norm"] == pytest.approx(plain["bound-norm"])


def test_agreement_excuses_misses_only_when_they_share_a_class() -> None:
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), 3)
    everyone = torch.ones(10, dtype=torch.bool)
    reference = Reference(targets.float(), torch.ones(10), everyone, ~everyone)
    predicted = targets.float().clone()
    predicted[[0, 3], 1] = 5.0  # two misses, both of class 0
    assert _agreement(nn.Identity(), predicted, reference)[0] == pytest.approx(0.8)
    kept, _, excused = _agreement(nn.Identity(), predicted, reference, 0.2, 0.9)
    assert (kept, excused) == (1.0, pytest.approx(0.2))
    predicted[3, 1], predicted[1, 0] = 0.0, 5.0  # misses of classes 0 and 1: spread
    kept, _, excused = _agreement(nn.Identity(), predicted, reference, 0.2, 0.9)
    assert (kept, excused) == (pytest.approx(0.8), 0.0)
    assert _agreement(nn.Identity(), predicted, reference, 0.2, 0.0)[0] == 1.0


def test_trim_applies_only_without_an_ensemble(trained) -> None:
    model, images, labels = trained
    images = images[:200]
    with pytest.raises(ValueError, match="trim"):
        BoundSettings(trim=1.0)
    settings = BoundSettings(epochs=1, trim=0.2)

    def trimmed_share(teacher, objective="ensemble-switch") -> float:
        bounded = attach_bounds(tiny())
        bounded.load_state_dict(model.state_dict(), strict=False)
        stats = optimise_bounds(bounded, images, labels[:200], teacher,
                                replace(settings, objective=objective))[1]
        return stats["trimmed-share"]

    assert trimmed_share(None) == pytest.approx(0.2)  # round 0: no ensemble yet
    assert trimmed_share(model(images).detach()) == 0.0  # the ensemble is the reference
    assert trimmed_share(None, "mm-bm") == 0.0  # the published baseline stays as published


def test_trim_lets_the_bounds_give_up_the_trimmed_share(trained) -> None:
    model, images, labels = trained

    def fit(trim: float) -> dict[str, float]:
        bounded = attach_bounds(tiny())
        bounded.load_state_dict(model.state_dict(), strict=False)
        settings = BoundSettings(trim=trim, batch_size=100, epochs=30, patience=99, lr=0.2)
        return optimise_bounds(bounded, images[:300], labels[:300], settings=settings)[1]

    plain, trimmed = fit(0.0), fit(0.3)
    assert (plain["trimmed-share"], trimmed["trimmed-share"]) == (0.0, pytest.approx(0.3))
    # Freed from fitting its worst 30%, the penalty shrinks the bounds further.
    assert trimmed["bound-norm"] < plain["bound-norm"]


def test_round_zero_step_runs_without_clients(trained) -> None:
    model, images, labels = trained
    step = make_defense(
        "activation-bounds", tiny, images, labels, BoundSettings(epochs=2, max_samples=300)
    )
    state = step(0, model.state_dict(), [], [])
    assert len(bound_keys(state)) == 2
    assert step.history[0]["round"] == 0.0 and step.history[0]["overruled-share"] == 0.0
    assert step.history[0]["trimmed-share"] == pytest.approx(0.2)


def test_detector_flags_what_the_bounds_clip_with_a_poisoned_reference() -> None:
    """Unit 0 carries the trigger (x0 = 5, clipped to 1); clean inputs stay near the bounds.
    With the largest 20% of drops left out, a reference 20% poisoned still puts the
    threshold under every triggered drop, where the plain mean + 2.576 std of all drops
    would sit above them all."""
    model = attach_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(),
                                        nn.Linear(2, 2)))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
        model[3].weight.copy_(torch.eye(2))
        model[3].bias.zero_()
    set_bounds(model, {"2.act_bound": torch.ones(2)})
    g = torch.Generator().manual_seed(0)
    clean = torch.rand((400, 1, 2, 2), generator=g) * 1.1
    triggered = clean[:100].clone()
    triggered[:, 0, 0, 0], triggered[:, 0, 0, 1] = 5.0, 0.5
    reference = torch.cat([clean[:80], triggered[:20]])
    detector = TriggerDetector.fit(model, reference)
    assert detector.flags(model, triggered).all()
    assert detector.flags(model, clean[100:]).float().mean() < 0.1
    drops = margin_drop(model, reference)
    assert drops.mean() + 2.576 * drops.std() > margin_drop(model, triggered).max()
    with pytest.raises(ValueError, match="detection trim=1.0"):
        TriggerDetector.fit(model, reference, trim=1.0)


def corner() -> Trigger:
    """Two white pixels at the top of the last column, which no class of `task` lights."""
    mask = torch.zeros(1, 8, 8)
    mask[0, :2, 7] = 1.0
    return Trigger(mask, torch.ones(1, 8, 8))


CORNER = corner()


def poisoned_task(n: int = 900) -> tuple[torch.Tensor, torch.Tensor]:
    """`task` with a fifth of classes 1-2 stamped (2 corner pixels) and labelled 0."""
    images, labels = task(n)
    poison = (labels != 0) & (torch.arange(len(labels)) % 5 == 0)
    images[poison], labels[poison] = CORNER.stamp(images[poison]), 0
    return images, labels


@pytest.fixture(scope="module")
def backdoored() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """`tiny` trained on `poisoned_task`, and a clean model's logits on the same images:
    the ensemble that overrules the poison."""
    images, labels = poisoned_task()
    model = tiny()
    train_epochs(model, images, labels, 6, 64, 0.1, 0, device=torch.device("cpu"))
    clean = tiny()
    train_epochs(clean, *task(900), 6, 64, 0.1, 0, device=torch.device("cpu"))
    with torch.no_grad():
        ensemble = clean.eval()(images)
    return model.eval(), images, ensemble


def test_inverted_trigger_lands_on_the_backdoor_pixels(backdoored) -> None:
    model, _, _ = backdoored
    test_x, test_y = task(300, seed=1)
    others = test_x[test_y != 0]
    assert (model(CORNER.stamp(others)).argmax(1) == 0).float().mean() > 0.9
    found, sent = invert_trigger(model, others, 0, steps=100)
    assert sent > 0.9
    assert found.mask[0, :2, 7].min() > 0.5
    assert (found.mask[0] * (1 - CORNER.mask[0])).max() < 0.25


def test_the_fit_cuts_the_route_once_the_gate_class_is_not_held(backdoored) -> None:
    """Per-unit bounds could cut the corner, but a fit held to the target class's
    agreements (`gate_class_weight=1`) sees only the poison the ensemble overrules; with
    the inverted trigger stamped on clean agreements, or with those agreements out of the
    count (the shipped 0), it cuts it at the same clean accuracy."""
    model, images, ensemble = backdoored
    test_x, test_y = task(300, seed=1)
    others = test_x[test_y != 0]
    found = {}
    for gate_class_weight, invert_weight in ((1.0, 0.0), (1.0, 3.0), (0.0, 0.0)):
        bounded = attach_bounds(copy.deepcopy(model))
        settings = BoundSettings(granularity="neuron", invert_weight=invert_weight,
                                 invert_steps=100, gate_class_weight=gate_class_weight)
        _, stats = optimise_bounds(bounded, images, torch.zeros(len(images)), ensemble, settings)
        assert stats["samples"] == len(images)
        acc = (bounded(test_x).argmax(1) == test_y).float().mean().item()
        asr = (bounded(CORNER.stamp(others)).argmax(1) == 0).float().mean().item()
        found[gate_class_weight, invert_weight] = {"acc": acc, "asr": asr, **stats}
    held, inverted, spared = found[1.0, 0.0], found[1.0, 3.0], found[0.0, 0.0]
    assert inverted["inverted-share"] == pytest.approx(0.2) and inverted["inverted-target"] == 0
    assert held["asr"] > 0.5 and inverted["asr"] < 0.1 and spared["asr"] < 0.1
    assert inverted["acc"] > 0.95 and spared["acc"] > 0.95
    assert spared["gate-class-spared-share"] > 0 and held["gate-class-spared-share"] == 0
    assert held["gate-class"] == spared["gate-class"] == 0  # the gate names the target


def test_a_named_class_whose_samples_the_bounds_do_not_flip_is_fitted_again_as_clean(
        backdoored) -> None:
    """The gate names the target. A full fit cuts the trigger and takes the overruled
    poison in it to the ensemble's classes; a two-epoch fit flips none of it, under
    `overrule_flip_min`, so it is redone with the gate closed (the same bounds as a fit
    that may name nothing), the class and its flips logged. A forced round (gate 0) is not
    tested."""
    model, images, ensemble = backdoored

    def fit(**changes: object) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        settings = BoundSettings(granularity="neuron", **changes)
        return optimise_bounds(attach_bounds(copy.deepcopy(model)), images,
                               torch.zeros(len(images)), ensemble, settings)
    _, named = fit(overrule_flip_min=0.5)
    assert named["gate-class"] == 0 and named["overruled-class-agreement"] >= 0.5
    # an overruled sample is a disagreement: taken onto the ensemble's class, it left the
    # fused model's
    assert named["overruled-class-leaves"] >= named["overruled-class-agreement"]
    assert named["refuted-class"] == -1 and math.isnan(named["refuted-flips"])
    assert math.isnan(named["refuted-rest-flips"])
    refuted_bounds, refuted = fit(epochs=2, overrule_flip_min=0.5)
    assert refuted["refuted-class"] == 0 and refuted["refuted-flips"] < 0.5
    assert math.isnan(refuted["refuted-rest-flips"])  # the whole cap is in the class
    assert refuted["gate-class"] == -1 and refuted["overruled-share"] == 0
    assert refuted["cap-top-class"] == 0 and math.isnan(refuted["overruled-class-agreement"])
    assert math.isnan(refuted["overruled-class-leaves"])
    closed_bounds, _ = fit(epochs=2, gate_classes=())
    assert all(torch.equal(refuted_bounds[k], closed_bounds[k]) for k in closed_bounds)
    _, forced = fit(epochs=2, overrule_flip_min=0.5, overrule_gate=0.0)
    assert forced["refuted-class"] == -1 and forced["overruled-share"] > 0
    with pytest.raises(ValueError, match="overrule-flip-min=2"):
        BoundSettings(overrule_flip_min=2)


def test_a_named_class_flipped_no_more_than_the_rest_of_the_cap_is_refuted() -> None:
    """`overrule_flip_lift_min` weighs the named class's flips against the other overruled
    samples' (stops 42-46's round 1s). At the shipped 0.4: Fashion-MNIST's poison, 0.82
    against 0.37, and CIFAR-10's, 0.25 against 0.27 (IID, which 1 refuted) and 0.33
    against 0.54 (Dirichlet: 0.62 times, near the old 0.5), stand; clean
    classes that flip far less than the rest (CIFAR-10's 0.07 against 0.27, Fashion-MNIST
    seed 1's 0 against 0.18) fall, as does one where nothing flipped (CIFAR-10's 5% cap),
    and one that flips more (0.44 against 0.24) falls only at 2. A cap with nothing beside
    the class, a closed or forced gate, or the option at 0, refutes nothing."""
    shipped = BoundSettings()

    def flips(named: float, rest: float, gate_class: float = 5.0) -> dict[str, float]:
        return {"gate-class": gate_class, "overruled-class-agreement": named,
                "overruled-rest-agreement": rest}
    assert shipped.overrule_flip_lift_min == 0.4
    assert not _refuted(flips(0.82, 0.37), shipped)
    assert not _refuted(flips(0.247, 0.267), shipped)
    assert not _refuted(flips(0.333, 0.542), shipped)
    assert _refuted(flips(0.247, 0.267), replace(shipped, overrule_flip_lift_min=1.0))
    assert _refuted(flips(0.07, 0.27), shipped) and _refuted(flips(0.0, 0.18), shipped)
    assert _refuted(flips(0.0, 0.0), shipped)
    assert not _refuted(flips(0.44, 0.24), shipped)
    assert _refuted(flips(0.44, 0.24), replace(shipped, overrule_flip_lift_min=2.0))
    assert not _refuted(flips(0.0, float("nan")), shipped)
    assert not _refuted(flips(0.07, 0.27, gate_class=-1.0), shipped)
    assert not _refuted(flips(0.07, 0.27), replace(shipped, overrule_gate=0.0))
    assert not _refuted(flips(0.07, 0.27), replace(shipped, overrule_flip_lift_min=0.0))
    assert not _refuted(flips(0.0, 0.0), replace(shipped, overrule_flip_lift_min=0.0))
    with pytest.raises(ValueError, match="overrule-flip-lift-min=-1"):
        BoundSettings(overrule_flip_lift_min=-1)


def test_class_flips_count_moves_onto_the_target_and_off_the_fused_class() -> None:
    """`_class_flips` on a model whose logits are its inputs: four overruled samples the
    fused model calls class 0 (the gate's) and two it calls class 1. A centred target can
    name the fused class itself (sample 1): kept there, it counts onto the target but not
    off the fused class."""
    fused = F.one_hot(torch.tensor([0, 0, 0, 0, 1, 1, 2]), 3).float()
    targets = F.one_hot(torch.tensor([1, 0, 2, 1, 0, 2, 2]), 3).float()
    bounded = F.one_hot(torch.tensor([1, 0, 0, 2, 0, 1, 2]), 3).float()
    overruled = torch.tensor([True] * 6 + [False])
    reference = Reference(targets, torch.ones(7), ~overruled, overruled, gate_class=0)
    flips = _class_flips(nn.Identity(), bounded, reference, fused)
    assert flips == {"overruled-class-agreement": 0.5, "overruled-rest-agreement": 0.5,
                     "overruled-class-leaves": 0.5, "overruled-rest-leaves": 0.5}
    bounded[2] = F.one_hot(torch.tensor(1), 3).float()  # off class 0, not onto its target
    flips = _class_flips(nn.Identity(), bounded, reference, fused)
    assert flips["overruled-class-agreement"] == 0.5 and flips["overruled-class-leaves"] == 0.75


def test_the_flip_tests_count_moves_off_the_fused_class_when_asked() -> None:
    """`overrule_flip_count = "off-fused"` weighs the shares taken off the fused model's
    class (`-leaves`) instead of those taken onto the target's class. CIFAR-10 Dirichlet
    seed 2's poison under a centred target (stops 52-53): onto it 0.103 against the
    rest's 0.333, refuted; off class 0 0.486 against 0.200, it stands. A fit that takes
    the named class off the fused class less often than the rest falls."""
    onto = BoundSettings()
    off = replace(onto, overrule_flip_count="off-fused")

    def flips(onto_named: float, onto_rest: float, off_named: float,
              off_rest: float) -> dict[str, float]:
        return {"gate-class": 0.0, "overruled-class-agreement": onto_named,
                "overruled-rest-agreement": onto_rest, "overruled-class-leaves": off_named,
                "overruled-rest-leaves": off_rest}
    poison = flips(0.103, 0.333, 0.486, 0.200)
    assert _refuted(poison, onto) and not _refuted(poison, off)
    clean = flips(0.5, 0.3, 0.05, 0.40)
    assert not _refuted(clean, onto) and _refuted(clean, off)
    assert not _refuted(flips(0.1, 0.3, 0.0, 0.0), replace(off, overrule_flip_lift_min=0.0))
    with pytest.raises(ValueError, match="overrule-flip-count='onto' is not known"):
        BoundSettings(overrule_flip_count="onto")


def test_fusion_on_relabelled_targets_unlearns_the_trigger(backdoored) -> None:
    """Distilling the backdoored model on D_syn keeps the corner trigger while the CE term
    holds the poisoned labels; with the target's labels the ensemble disputes set to its
    class (`distill-relabel-target`), the same distillation removes it."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    test_x, test_y = task(300, seed=1)
    others = test_x[test_y != 0]
    relabelled, changed = relabel_disputed(labels, ensemble, target=0)
    assert changed >= (labels == 0).sum() - (task(900)[1] == 0).sum()  # the poison at least
    found = {}
    for name, distil_labels in (("poisoned", labels), ("relabelled", relabelled)):
        student = copy.deepcopy(model)
        distill(student, ensemble, images, distil_labels,
                FusionSettings(epochs=3, alpha=0.9, lr=0.01), round_seed=1)
        student.eval()
        found[name] = {
            "acc": (student(test_x).argmax(1) == test_y).float().mean().item(),
            "asr": (student(CORNER.stamp(others)).argmax(1) == 0).float().mean().item()}
    assert found["poisoned"]["asr"] > 0.5 and found["relabelled"]["asr"] < 0.1
    assert found["relabelled"]["acc"] > 0.95


def test_fusion_unlearns_the_poison_the_bounds_and_its_features_point_to(backdoored) -> None:
    """Bounds that cut the corner trigger flip the poison away from class 0, and its
    penultimate features sit apart from the clean class-0 images: `suspected_poison`
    finds it in the aggregate served with those bounds, and fusion that teaches it away
    from the target (`distill-unlearn-poison`) removes the backdoor from the weights, where
    plain fusion on the poisoned labels keeps it."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    poison = labels != task(900)[1]
    served = attach_bounds(copy.deepcopy(model))
    optimise_bounds(served, images, labels, ensemble, BoundSettings(granularity="neuron"))
    clean = tiny()
    train_epochs(clean, *task(900), 6, 64, 0.1, 0, device=torch.device("cpu"))
    test_x, test_y = task(300, seed=1)
    others = test_x[test_y != 0]
    found = {}
    for unlearn in (False, True):
        fusion = Fusion(tiny, images, labels,
                        FusionSettings(epochs=3, alpha=0.9, lr=0.01, unlearn_poison=unlearn),
                        target_source=lambda: 0)
        fused = fusion(2, dict(served.state_dict()), [clean.state_dict()], [1.0])
        student = tiny()
        student.load_state_dict({k: v for k, v in fused.items() if "act_bound" not in k})
        student.eval()
        found[unlearn] = {
            "acc": (student(test_x).argmax(1) == test_y).float().mean().item(),
            "asr": (student(CORNER.stamp(others)).argmax(1) == 0).float().mean().item(),
            "suspected": fusion.suspected, "unlearned": fusion.unlearned_share}
    suspected = found[True]["suspected"]
    assert found[False]["suspected"] is None
    assert found[True]["unlearned"] == suspected.float().mean().item() > 0
    assert found[False]["unlearned"] == 0.0
    assert poison[suspected].float().mean() > 0.9 and suspected[poison].float().mean() > 0.5
    # a later aggregate without the backdoor, served with the same bounds: the split found
    # while the trigger was there is kept, not redone on what the bounds flip now
    later = {**clean.state_dict(), **{k: v for k, v in served.state_dict().items()
                                      if "act_bound" in k}}
    fusion(3, later, [clean.state_dict()], [1.0])
    assert fusion.suspected is suspected
    share = suspected.float().mean().item()
    assert fusion.history == [{"round": r, "unlearn-target": 0.0, "unlearned-share": share}
                              for r in (2.0, 3.0)]
    # the toy's 16 features hold half the poison apart (Fashion-MNIST's CNN: 98-100%,
    # stop 26), and the poison left labelled 0 keeps part of the backdoor
    assert found[False]["asr"] > 0.9 and found[True]["asr"] < found[False]["asr"] - 0.4
    assert found[True]["acc"] > 0.95


def test_the_target_taken_out_of_a_teacher_gives_its_share_to_the_other_classes() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    out = without_class(probs, 0)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.6, 0.4]))
    assert out[1].eq(0).all()  # all on the target: the row teaches nothing, not NaN


def test_unlearning_toward_the_teacher_teaches_the_poison_its_true_classes(backdoored) -> None:
    """Taught only away from class 0, the poison's images (stamped classes 1-2) get no
    signal for which of the others they are (the toy model places them from its features
    anyway); with `unlearn_to_teacher` their KL term pulls them to the clean ensemble's
    classes, and the trigger still leads away from 0."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    true_labels = task(900)[1]
    poison = labels != true_labels
    test_x, test_y = task(300, seed=1)
    stamped = CORNER.stamp(test_x[test_y != 0])
    found = {}
    for to_teacher in (False, True):
        student = copy.deepcopy(model)
        distill(student, ensemble, images, labels,
                FusionSettings(epochs=3, alpha=0.9, lr=0.01, unlearn_to_teacher=to_teacher),
                round_seed=1, unlearn=poison, target=0)
        student.eval()
        with torch.no_grad():
            log_probs = F.log_softmax(student(images[poison]) / 2.0, 1)
            wanted = without_class(F.softmax(ensemble[poison] / 2.0, 1), 0)
            found[to_teacher] = {
                "kl": F.kl_div(log_probs, wanted, reduction="batchmean").item(),
                "asr": (student(stamped).argmax(1) == 0).float().mean().item()}
    assert found[True]["kl"] < found[False]["kl"] / 2
    assert found[True]["asr"] < 0.1 and found[False]["asr"] < 0.1


def test_the_split_is_sought_on_the_model_last_served_not_the_aggregate(backdoored) -> None:
    """Round 1 fuses the backdoored model and the bounds are fitted on what fusion made;
    round 2's aggregate is a clean model under those bounds (the clients' training blurs
    the poison's features). The target is named in round 2, and the split is found on the
    model the gate judged, last round's fused weights under its bounds: the poison."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    poison = labels != task(900)[1]
    clean = tiny()
    train_epochs(clean, *task(900), 6, 64, 0.1, 0, device=torch.device("cpu"))
    target = [None]
    fusion = Fusion(tiny, images, labels,
                    FusionSettings(epochs=1, alpha=0.9, lr=0.01, unlearn_poison=True),
                    target_source=lambda: target[0])
    fused = fusion(1, dict(attach_bounds(copy.deepcopy(model)).state_dict()),
                   [clean.state_dict()], [1.0])
    served = attach_bounds(tiny())
    served.load_state_dict(fused)
    optimise_bounds(served, images, labels, ensemble, BoundSettings(granularity="neuron"))
    bounds = {k: v for k, v in served.state_dict().items() if "act_bound" in k}
    assert fusion.served({**clean.state_dict(), **bounds}).keys() == fused.keys()
    target[0] = 0
    fusion(2, {**clean.state_dict(), **bounds}, [clean.state_dict()], [1.0])
    suspected = fusion.suspected
    assert poison[suspected].float().mean() > 0.9 and suspected[poison].float().mean() > 0.5


def test_bounds_trust_a_fused_model_only_where_fusion_unlearned_what_the_gate_saw(
        backdoored) -> None:
    """The gate names the target on the backdoored model and overrules the cap. Next
    round, a fusion that unlearned at least the gate's finding (`trust_source`) gets
    MM-BM's reference (nothing overruled); one that unlearned less gets the cap overruled
    even where the gate's share would not pass."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    state = dict(model.state_dict())
    unlearned = [0.0]
    step = make_defense("activation-bounds", tiny, images, labels,
                        BoundSettings(epochs=2, granularity="neuron"),
                        ensemble_source=lambda: ensemble, trust_source=lambda: unlearned[0])
    step(1, state, [], [])
    first = step.history[-1]
    assert first["gate-class"] == 0 and step.named_target == 0
    assert step.gate_finding == first["cap-top-class-share"] * first["overruled-share"] > 0.1
    unlearned[0] = step.gate_finding
    step(2, state, [], [])
    assert step.history[-1]["overruled-share"] == 0 and step.history[-1]["gate-class"] == -1
    unlearned[0] = step.gate_finding / 2
    step(3, state, [], [])
    assert step.history[-1]["overruled-share"] == first["overruled-share"]
    assert step.history[-1]["gate-forced"] == 1 and first["gate-forced"] == 0
    assert step.named_target == 0


def test_the_gate_finding_is_the_most_the_gate_overruled_in_the_named_class() -> None:
    """A forced round's cap, fitted after fusion unlearned part of the poison, sees less
    of it; the finding that decides trust keeps the largest round for the named target."""
    step = BoundsStep(tiny, torch.zeros(1, 1), torch.zeros(1), BoundSettings())
    assert step.gate_finding == 0.0 and step.named_target is None

    def gate(target: float, top: float, overruled: float) -> dict[str, float]:
        return {"gate-class": target, "cap-top-class-share": top, "overruled-share": overruled}
    step.history = [gate(3, 0.9, 0.4), gate(0, 0.8, 0.2), gate(-1, 0.0, 0.0), gate(0, 0.4, 0.2)]
    assert step.named_target == 0
    assert step.gate_finding == pytest.approx(0.16)  # round 2's, not round 4's 0.08 nor 3's


def test_a_forced_round_s_cap_names_no_target() -> None:
    """After fusion unlearned less than the gate saw, the cap is overruled whatever its
    share: its top class (what the unlearning left, however concentrated) must not become
    the target; a later round whose gate passes on another class does rename it."""
    step = BoundsStep(tiny, torch.zeros(1, 1), torch.zeros(1), BoundSettings(overrule_gate=0.5))

    def gate(target: float, top: float, forced: bool) -> dict[str, float]:
        return {"gate-class": target, "cap-top-class-share": top, "overruled-share": 0.2,
                "gate-forced": float(forced)}
    step.history = [gate(0, 0.97, False), gate(8, 0.365, True), gate(7, 0.935, True)]
    assert step.named_target == 0
    assert step.gate_finding == pytest.approx(0.194)
    step.history.append(gate(7, 0.6, False))
    assert step.named_target == 7


def test_past_its_rounds_the_gate_names_no_new_target() -> None:
    """Up to `overrule_gate_rounds` any class may be named; later only the one already
    named, and none if none was. A cap filled by fused class 0 passes where 0 may be
    named and closes (MM-BM's reference) where it may not, still reporting its class."""
    step = BoundsStep(tiny, torch.zeros(1, 1), torch.zeros(1), BoundSettings())
    assert step.settings.overrule_gate_rounds == 1
    assert step.nameable_classes(1) is None and step.nameable_classes(6) == ()
    step.history = [{"gate-class": 0.0, "cap-top-class-share": 0.7, "overruled-share": 0.2}]
    assert step.nameable_classes(6) == (0,)
    every_round = BoundsStep(tiny, torch.zeros(1, 1), torch.zeros(1),
                             BoundSettings(overrule_gate_rounds=0))
    assert every_round.nameable_classes(6) is None
    fused = torch.tensor([[9.0, 0, 0], [8, 0, 0], [0, 5, 0], [0, 0, 5]])
    ensemble = torch.nn.functional.one_hot(torch.tensor([1, 2, 1, 2]), 3).float()

    def reference(gate_classes: tuple[int, ...] | None) -> Reference:
        return fidelity_reference("ensemble-switch", fused, ensemble, 3.0, overrule_cap=0.5,
                                  overrule_gate=0.5, gate_classes=gate_classes)
    for named in (None, (0,)):
        passed = reference(named)
        assert passed.overruled.tolist() == [True, True, False, False]
        assert passed.gate_class == passed.cap_top_class == 0
    for closed in (reference(()), reference((2,))):
        assert not closed.overruled.any() and closed.keep.all()
        assert closed.gate_class == -1 and closed.cap_top_class == 0
    with pytest.raises(ValueError, match="overrule-gate-rounds=-1"):
        BoundSettings(overrule_gate_rounds=-1)


def test_after_unlearning_the_fit_trusts_or_overrules_by_what_the_gate_saw() -> None:
    settings = BoundSettings(overrule_gate=0.5)
    assert settings_after_unlearning(settings, 0.0, 0.15) == settings
    assert settings_after_unlearning(settings, 0.18, 0.15) == replace(settings,
                                                                       objective="mm-bm")
    assert settings_after_unlearning(settings, 0.06, 0.15) == replace(settings,
                                                                       overrule_gate=0.0)


def test_suspected_poison_is_what_sits_with_the_samples_the_bounds_flip() -> None:
    """Samples labelled the target whose features lie nearer the flipped ones' than the
    kept ones' are suspected, whatever the models call them; nothing flipped or nothing
    kept: nothing suspected."""
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    features = torch.tensor([[1.0, 0.1], [0.9, 0.0], [1.0, 0.2],  # the poison's direction
                             [0.1, 1.0], [0.0, 0.8], [1.0, 0.0], [0.0, 1.0]])
    to_target = torch.nn.functional.one_hot(torch.zeros(7, dtype=torch.long), 2).float()
    bounded = to_target.clone()
    bounded[0] = torch.tensor([0.0, 1.0])  # the bounds flip one poisoned sample
    suspected = suspected_poison(features, to_target, bounded, labels, target=0)
    assert suspected.tolist() == [True, True, True, False, False, False, False]
    assert not suspected_poison(features, to_target, to_target, labels, target=0).any()


def degrees(*angles: float) -> torch.Tensor:
    """Unit features at these angles: the split works on cosines only."""
    radians = torch.tensor(angles) * torch.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1)


def test_the_split_follows_the_poison_where_the_bounds_keep_most_of_it() -> None:
    """The bounds flip one poisoned sample (0 degrees) and keep the rest of the poison
    (10-30) beside the clean images (90): the kept mean leans to the poison, so the start
    misses the poison at 25-30 degrees; 2-means from there takes it all, and only it."""
    features = degrees(0, 10, 20, 25, 30, 30, 90, 92, 88, 200)
    labels = torch.tensor([0] * 9 + [1])
    unbounded = torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), 2).float()
    bounded = unbounded.clone()
    bounded[0] = torch.tensor([0.0, 1.0])
    start = suspected_poison(features, unbounded, bounded, labels, target=0, max_steps=0)
    assert start.tolist() == [True] * 3 + [False] * 7
    suspected = suspected_poison(features, unbounded, bounded, labels, target=0)
    assert suspected.tolist() == [True] * 6 + [False] * 4


def test_the_split_keeps_at_most_the_cap_the_bounds_take_furthest_off_the_target() -> None:
    """The split takes in the poison (0-10 degrees) and two clean images of the target
    (40-45). Under a cap of 0.3 only the three whose probability of the target the bounds
    take down most stay: the poison, of which the unbounded model is sure."""
    features = degrees(0, 5, 10, 40, 45, 90, 92, 88, 95, 91)
    labels = torch.zeros(10, dtype=torch.long)
    unbounded = torch.tensor([[3.0, 0.0]] * 3 + [[0.5, 0.0]] * 2 + [[3.0, 0.0]] * 5)
    bounded = unbounded.clone()
    bounded[[0, 4]] = torch.tensor([0.0, 1.0])  # the bounds flip a poisoned and a clean one
    bounded[[1, 2, 3]] = torch.tensor([0.2, 0.0])  # and lower the rest of the split
    suspected = suspected_poison(features, unbounded, bounded, labels, target=0)
    assert suspected.tolist() == [True] * 5 + [False] * 5
    capped = suspected_poison(features, unbounded, bounded, labels, target=0, cap=0.3)
    assert capped.tolist() == [True] * 3 + [False] * 7
    assert suspected_poison(features, unbounded, bounded, labels, 0, cap=0.5).equal(suspected)


def test_the_kept_target_images_carry_the_weight_of_the_requested_count() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    unlearn = torch.tensor([True, True, True, False, False, False, False])
    weights = restored_target_weights(labels, unlearn, 0, requested=3)
    assert weights.tolist() == [1, 1, 1, 1.5, 1.5, 1, 1]
    assert restored_target_weights(labels, unlearn, 0, requested=2).equal(torch.ones(7))
    everything = labels == 0  # nothing of the label kept: nothing to weight
    assert restored_target_weights(labels, everything, 0, requested=3).equal(torch.ones(7))


def test_restoring_the_target_weight_keeps_the_class_a_split_took_half_of(backdoored) -> None:
    """A split that took in half of class 0's clean images beside the poison, and a
    teacher that never calls class 0 (CIFAR-10 Dirichlet, stop 55): unlearning leaves
    class 0 to the kept half and it starves; with `unlearn_restore_target` that half
    carries the CE weight of the class's requested count and the class stays, the trigger
    still gone."""
    model, images, ensemble = backdoored
    _, labels = poisoned_task()
    poison = labels != task(900)[1]
    clean_zero = torch.nonzero((labels == 0) & ~poison).flatten()
    unlearn = poison.clone()
    unlearn[clean_zero[: len(clean_zero) // 2]] = True
    blind = ensemble.clone()
    blind[:, 0] = ensemble.min() - 5
    test_x, test_y = task(300, seed=1)
    found = {}
    for restore in (False, True):
        student = copy.deepcopy(model)
        distill(student, blind, images, labels,
                FusionSettings(epochs=3, alpha=0.9, lr=0.01, unlearn_restore_target=restore,
                               requested_per_class=int((task(900)[1] == 0).sum())),
                round_seed=1, unlearn=unlearn, target=0)
        student.eval()
        with torch.no_grad():
            predicted = student(test_x).argmax(1)
            stamped = CORNER.stamp(test_x[test_y != 0])
            found[restore] = {"recall": (predicted[test_y == 0] == 0).float().mean().item(),
                              "asr": (student(stamped).argmax(1) == 0).float().mean().item()}
    assert found[False]["recall"] < 0.5 and found[True]["recall"] > found[False]["recall"] + 0.15
    assert found[True]["asr"] < 0.05


def flip(count: int, flipped: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels (all the target), unbounded and bounded logits: the bounds flip `flipped`."""
    labels = torch.zeros(count, dtype=torch.long)
    unbounded = torch.nn.functional.one_hot(labels, 2).float()
    bounded = unbounded.clone()
    bounded[flipped] = torch.tensor([0.0, 1.0])
    return labels, unbounded, bounded


def test_the_split_keeps_the_side_that_holds_more_of_the_flipped_samples() -> None:
    """The bounds flip one poisoned image (35 degrees); the start is it and the four clean
    images (55-115), and 2-means ends with the clean ones on that side. The poison's side
    is the one with the flipped sample (CIFAR-10 Dirichlet, round 1: the start held 43%
    poison, the flipped samples 85%), not the one holding more of the start."""
    features = degrees(0, 0, 5, 10, 10, 15, 20, 35, 55, 55, 100, 115)
    labels, unbounded, bounded = flip(12, [7])
    start = suspected_poison(features, unbounded, bounded, labels, target=0, max_steps=0)
    assert start.tolist() == [False] * 7 + [True] * 5
    suspected = suspected_poison(features, unbounded, bounded, labels, target=0)
    assert suspected.tolist() == [True] * 8 + [False] * 4


def test_on_a_tie_of_flipped_samples_the_split_keeps_the_side_holding_more_of_its_start(
        ) -> None:
    """The bounds flip one poisoned (5 degrees) and one clean image (55): the start holds
    three poisoned images (30-35) and both clean ones (55, 100), and 2-means from there
    ends with only the clean ones on its side. The flipped samples split evenly, so the
    side holding more of the start (three of five) is the poison's."""
    features = degrees(0, 5, 15, 20, 20, 30, 30, 35, 55, 100)
    labels, unbounded, bounded = flip(10, [1, 8])
    start = suspected_poison(features, unbounded, bounded, labels, target=0, max_steps=0)
    assert start.tolist() == [False] * 5 + [True] * 5
    suspected = suspected_poison(features, unbounded, bounded, labels, target=0)
    assert suspected.tolist() == [True] * 8 + [False] * 2


def test_bounds_step_keeps_the_target_its_gate_named(trained) -> None:
    """A round whose gate names a class makes it the step's `named_target`; a later round
    that overrules nothing (`gate-class` -1) leaves it named."""
    model, images, labels = trained
    fused = predict_logits(model, images)
    others = torch.nn.functional.one_hot((fused.argmax(1) + 1) % 3, 3).float() * 5
    teachers = [others, fused]
    step = make_defense("activation-bounds", tiny, images, labels,
                        BoundSettings(epochs=0, max_samples=300, overrule_gate=0.0),
                        ensemble_source=lambda: teachers[0])
    assert step.named_target is None
    step(1, model.state_dict(), [], [])
    first = step.history[0]["gate-class"]
    assert first >= 0 and step.named_target == int(first)
    teachers.pop(0)
    step(2, model.state_dict(), [], [])
    assert step.history[1]["gate-class"] == -1 and step.named_target == int(first)


@pytest.mark.parametrize("key, value", [("invert_weight", -1.0), ("invert_share", 0.0),
                                        ("invert_steps", 0), ("invert_mask_weight", -0.5)])
def test_inversion_settings_are_checked(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"bounds {key.replace('_', '-')}="):
        BoundSettings(**{key: value})
