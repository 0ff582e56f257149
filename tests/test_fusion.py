"""FM-FL fusion on plain tensors: pre-training and ensemble distillation."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from fmfl_flwr.defense import attach_bounds, bound_keys
from fmfl_flwr.fusion import (
    PRETRAIN_LR,
    Fusion,
    FusionSettings,
    distill,
    pretrain,
    relabel_disputed,
)
from fmfl_flwr.training import predict_logits


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g)
    y = (x.flatten(1).sum(1) * 3 / 4).long().clamp(max=2)
    return x, y


def test_distillation_with_alpha_zero_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    x, y = _data()
    teacher, student = _tiny(), _tiny()
    teacher_logits = predict_logits(teacher, x)
    settings = FusionSettings(epochs=30, alpha=0.0, tau=1.0, lr=0.01, batch_size=32)

    def gap():
        return (predict_logits(student, x).softmax(1) - teacher_logits.softmax(1)).abs().mean()

    before = gap()
    distill(student, teacher_logits, x, y, settings, round_seed=1)
    assert gap() < 0.3 * before


def test_pretraining_learns_the_synthetic_labels():
    torch.manual_seed(0)
    x, y = _data(300)
    model = _tiny()
    pretrain(model, x, y, FusionSettings(pretrain_epochs=40, batch_size=32))
    assert (predict_logits(model, x).argmax(1) == y).float().mean() > 0.8


def test_pretraining_reports_each_epoch_and_trains_as_without_the_report():
    x, y = _data(100)
    settings = FusionSettings(pretrain_epochs=3, batch_size=32)
    torch.manual_seed(1)
    quiet, reported = _tiny(), _tiny()
    reported.load_state_dict(quiet.state_dict())
    pretrain(quiet, x, y, settings)
    epochs = []
    pretrain(reported, x, y, settings, on_epoch=lambda epoch, loss: epochs.append((epoch, loss)))
    assert [epoch for epoch, _ in epochs] == [1, 2, 3]
    assert all(loss > 0 for _, loss in epochs) and epochs[-1][1] < epochs[0][1]
    assert all(torch.equal(quiet.state_dict()[k], v) for k, v in reported.state_dict().items())


def test_cosine_pretraining_anneals_the_rate_to_zero_by_its_last_step(monkeypatch):
    x, y = _data(100)
    settings = FusionSettings(pretrain_epochs=2, batch_size=32, pretrain_lr_schedule="cosine")
    rates = []
    step = torch.optim.SGD.step

    def recording_step(optimiser, *args, **kwargs):
        rates.append(optimiser.param_groups[0]["lr"])
        return step(optimiser, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    torch.manual_seed(1)
    constant, cosine = _tiny(), _tiny()
    cosine.load_state_dict(constant.state_dict())
    pretrain(cosine, x, y, settings)
    assert len(rates) == 8 and rates[0] == PRETRAIN_LR
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] < 0.01
    assert rates[-1] > 0  # the last step still trains
    rates.clear()
    pretrain(constant, x, y, replace(settings, pretrain_lr_schedule="constant"))
    assert rates == [PRETRAIN_LR] * 8
    assert not torch.equal(constant.state_dict()["1.weight"], cosine.state_dict()["1.weight"])


def test_fusion_step_is_deterministic_and_keeps_the_ensemble():
    x, y = _data()
    clients = [_tiny().state_dict() for _ in range(3)]
    start = _tiny().state_dict()
    fusion = Fusion(_tiny, x, y, FusionSettings(epochs=2, seed=3))
    first = fusion(1, start, clients, [1.0, 1.0, 1.0])
    assert fusion.last_ensemble_logits.shape == (len(x), 3)
    second = Fusion(_tiny, x, y, FusionSettings(epochs=2, seed=3))(1, start, clients, [1, 1, 1])
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], start[k]) for k in first)


def _normed() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3))


def _negative_variance(state: dict) -> dict:
    """A reply whose BatchNorm variance went negative (a boosted update): NaN outputs."""
    return {**state, "2.running_var": -torch.ones(8)}


def test_fusion_leaves_out_a_client_model_with_non_finite_outputs():
    torch.manual_seed(0)
    x, y = _data()
    start, clients = _normed().state_dict(), [_normed().state_dict() for _ in range(3)]
    fusion = Fusion(_normed, x, y, FusionSettings(epochs=2, seed=3))
    fused = fusion(1, start, [*clients[:2], _negative_variance(clients[2])], [1.0] * 3)
    assert all(torch.isfinite(v).all() for v in fused.values() if v.is_floating_point())
    assert fusion.history[-1] == {"round": 1.0, "teachers-left-out": 1.0}
    honest = Fusion(_normed, x, y, FusionSettings(epochs=2, seed=3))(1, start, clients[:2],
                                                                      [1.0] * 2)
    assert all(torch.equal(fused[k], honest[k]) for k in fused)  # as if it had not replied


def test_fusion_without_a_finite_teacher_keeps_the_aggregate():
    x, y = _data()
    start, broken = _normed().state_dict(), _negative_variance(_normed().state_dict())
    fusion = Fusion(_normed, x, y, FusionSettings(epochs=2, seed=3))
    assert fusion(1, start, [broken, broken], [1.0, 1.0]) is start
    assert fusion.last_ensemble_logits is None
    assert fusion.history[-1]["teachers-left-out"] == 2.0


def test_distillation_through_bounds_or_not():
    """With bounds at 0 every hidden unit is dead: no gradient reaches the first layer
    through the bounds; with `through_bounds=False` it trains, and the bounds stay."""
    torch.manual_seed(0)
    x, y = _data()
    clients = [_tiny().state_dict() for _ in range(2)]
    start = attach_bounds(_tiny())
    start[2].act_bound = torch.zeros(8)
    state = start.state_dict()
    first = "1.weight"
    for through, moves in ((True, False), (False, True)):
        fusion = Fusion(lambda: _tiny(), x, y, FusionSettings(epochs=1, through_bounds=through))
        fused = fusion(1, state, clients, [1.0, 1.0])
        assert (not torch.equal(fused[first], state[first])) == moves
        assert all(torch.equal(fused[k], state[k]) for k in bound_keys(state))


def test_relabel_disputed_changes_only_the_target_labels_the_teacher_disputes():
    labels = torch.tensor([0, 0, 0, 1, 2, 1])
    teacher = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 0, 2, 0]), 3).float()
    relabelled, changed = relabel_disputed(labels, teacher, target=0)
    assert relabelled.tolist() == [0, 2, 1, 1, 2, 1]  # 1 and 2 disputed; 3, 5 not class 0
    assert changed == 2 and relabelled.dtype == labels.dtype
    assert labels.tolist() == [0, 0, 0, 1, 2, 1]  # the caller's labels stay as they were
    teacher[1] = torch.tensor([0.0, 0.4, 0.5])  # disputed, but less surely than sample 2
    capped, changed = relabel_disputed(labels, teacher, target=0, cap=1 / 6)
    assert capped.tolist() == [0, 0, 1, 1, 2, 1] and changed == 1


def test_fusion_relabels_only_once_the_defense_names_a_target():
    """Until a target is named the fused model is the plain fusion's; once named it
    differs, and the history says which class and how much of D_syn changed."""
    x, y = _data()
    clients = [_tiny().state_dict() for _ in range(3)]
    start = _tiny().state_dict()
    named: list[int | None] = [None]
    settings = FusionSettings(epochs=1, seed=3, relabel_target=True)
    plain = Fusion(_tiny, x, y, FusionSettings(epochs=1, seed=3))(1, start, clients, [1, 1, 1])
    fusion = Fusion(_tiny, x, y, settings, target_source=lambda: named[0])
    unnamed = fusion(1, start, clients, [1, 1, 1])
    assert all(torch.equal(unnamed[k], plain[k]) for k in plain)
    named[0] = 2
    relabelled = fusion(1, start, clients, [1, 1, 1])
    disputed = ((y == 2) & (fusion.last_ensemble_logits.argmax(1) != 2)).sum().item()
    assert disputed > 0 and any(not torch.equal(relabelled[k], plain[k]) for k in plain)
    assert fusion.history == [
        {"round": 1.0, "relabel-target": -1.0, "relabelled-share": 0.0},
        {"round": 1.0, "relabel-target": 2.0, "relabelled-share": disputed / len(y)},
    ]
    with pytest.raises(ValueError, match="need the defense that names the target"):
        Fusion(_tiny, x, y, settings)
