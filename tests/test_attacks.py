"""Client-side poisoning on plain tensors, without Flower."""

import pytest
import torch

from fmfl_flwr import attacks
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.defense import attach_bounds, bound_keys
from fmfl_flwr.defense.bounds import UNBOUNDED
from fmfl_flwr.models import build_model
from fmfl_flwr.triggers import badnets, blended, dba_global, make_trigger

SHAPE = (1, 28, 28)


def test_badnets_patch_is_exactly_where_configured():
    trigger = badnets(SHAPE, size=3, position="bottom-right", value=1.0, margin=1)
    out = trigger.stamp(torch.zeros(2, *SHAPE))
    assert out[:, :, 24:27, 24:27].eq(1).all()
    assert out.sum() == 2 * 9
    top_left = badnets(SHAPE, size=2, position="top-left", margin=0).stamp(torch.zeros(1, *SHAPE))
    assert top_left[0, 0, :2, :2].eq(1).all() and top_left.sum() == 4


def test_blended_mixes_every_pixel_with_alpha():
    trigger = blended(SHAPE, alpha=0.25, seed=1)
    images = torch.full((1, *SHAPE), 0.4)
    out = trigger.stamp(images)
    assert torch.allclose(out, 0.75 * images + 0.25 * trigger.pattern)


def test_dba_pieces_are_disjoint_and_make_the_whole():
    full = dba_global(SHAPE, pieces=4)
    pieces = full.pieces(4)
    masks = torch.stack([p.mask for p in pieces])
    assert masks.sum(0).max() == 1
    assert torch.equal(masks.sum(0), full.mask)
    assert all(p.mask.sum() == 4 for p in pieces)


def test_image_trigger(tmp_path):
    from PIL import Image

    path = tmp_path / "t.png"
    Image.new("L", (8, 8), color=255).save(path)
    trigger = make_trigger("image", SHAPE, path=str(path), size=4, position="top-left",
                           margin=0)
    out = trigger.stamp(torch.zeros(1, *SHAPE))
    assert out[0, 0, :4, :4].eq(1).all() and out.sum() == 16


def test_poisoning_relabels_the_right_share_with_the_trigger():
    labels = torch.arange(10).repeat(20)  # 200 samples, 180 non-target
    images = torch.zeros(200, *SHAPE)
    trigger = badnets(SHAPE)
    out_x, out_y, chosen = attacks.poison_samples(images, labels, trigger, 0.5, 0, seed=1)
    assert len(chosen) == 90
    assert (labels[chosen] != 0).all() and (out_y[chosen] == 0).all()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[chosen] = False
    assert torch.equal(out_y[untouched], labels[untouched])
    assert out_x[chosen][:, :, 24:27, 24:27].eq(1).all()
    assert out_x[untouched].eq(0).all()
    assert images.eq(0).all()  # inputs untouched
    _, _, again = attacks.poison_samples(images, labels, trigger, 0.5, 0, seed=1)
    assert torch.equal(chosen, again)


def test_malicious_choice_is_seeded_and_sized():
    config = ExperimentConfig.from_run_config({"client-attack": "badnets",
                                               "malicious-fraction": 0.2, "seed": 5})
    chosen = attacks.malicious_partitions(config, 10)
    assert len(chosen) == 2 and chosen == attacks.malicious_partitions(config, 10)
    explicit = ExperimentConfig.from_run_config({"client-attack": "badnets",
                                                 "malicious-clients": "1,4"})
    assert attacks.malicious_partitions(explicit, 10) == {1, 4}
    assert attacks.malicious_partitions(ExperimentConfig(), 10) == set()


def test_attack_rounds():
    config = ExperimentConfig.from_run_config({"attack-rounds": "2-3"})
    assert [attacks.attacks_in_round(config, r) for r in (1, 2, 3, 4)] == [False, True, True,
                                                                              False]
    assert attacks.attacks_in_round(ExperimentConfig(), 7)


def test_boost_scales_update_and_respects_norm_bound():
    g = {"w": torch.zeros(4), "n": torch.tensor(3)}
    local = {"w": torch.ones(4), "n": torch.tensor(5)}
    boosted = attacks.boost_update(g, local, 5.0)
    assert torch.equal(boosted["w"], torch.full((4,), 5.0)) and boosted["n"] == 5
    bounded = attacks.boost_update(g, local, 5.0, norm_bound=1.0)
    assert bounded["w"].norm().item() == pytest.approx(1.0)


def test_a_boosted_resnet_keeps_its_running_statistics_and_finite_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18", "cifar10", 10, 4)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    local = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in g.items()}
    for key in local:
        if key.endswith("running_var"):  # a local epoch that halved every variance
            local[key] = g[key] * 0.5
    boosted = attacks.boost_update(g, local, 5.0)
    stats = [k for k in g if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(boosted[k], local[k]) for k in stats)
    weight = "conv1.weight"
    assert torch.allclose(boosted[weight], g[weight] + 5 * (local[weight] - g[weight]))
    model.load_state_dict(boosted)
    assert torch.isfinite(model.eval()(torch.rand(4, 3, 32, 32))).all()


def test_default_boost_is_n_over_m():
    config = ExperimentConfig.from_run_config({"client-attack": "scaling",
                                               "malicious-fraction": 0.2})
    assert attacks.default_boost(config, 10, 2) == 5.0


def test_lift_bounds_sets_every_bound_to_unbounded_and_leaves_the_weights():
    model = attach_bounds(build_model("cnn", "fashion-mnist", 10, 8), value=0.5)
    state = model.state_dict()
    lifted = attacks.lift_bounds(state)
    keys = bound_keys(state)
    assert keys and all(torch.equal(lifted[k], torch.full_like(state[k], UNBOUNDED))
                        for k in keys)
    assert all(torch.equal(lifted[k], v) for k, v in state.items() if k not in keys)
    assert all(torch.equal(state[k], torch.tensor(0.5)) for k in keys)  # input untouched
