"""The ServerApp fails before round 1 on bad input, without touching the grid."""

from unittest.mock import Mock

import pytest
from flwr.app import Context, RecordDict

import server_app
from fmfl_flwr.config import ConfigError
from fmfl_flwr.data import DatasetNotFoundError


def _run(run_config):
    grid = Mock()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    with pytest.raises((ConfigError, DatasetNotFoundError, ValueError)) as err:
        server_app.main(grid, context)
    grid.send_and_receive.assert_not_called()
    return str(err.value)


@pytest.mark.parametrize(("override", "expected"), [
    ({"dataset": "imagenet"}, "dataset='imagenet' is not known; accepted: fashion-mnist"),
    ({"partition": "foo"}, "partition='foo' is not known; accepted: iid, dirichlet"),
    ({"dirichlet-alpha": -1.0}, "dirichlet-alpha=-1.0 must be > 0.0"),
    ({"aggregation": "fedsgd"}, "aggregation='fedsgd' is not known; accepted: fedavg"),
    ({"defense": "shield"}, "defense='shield' is not known; accepted: none, activation-bounds"),
])
def test_bad_values_fail_before_round_one(override, expected, tmp_path):
    assert expected in _run({"output-dir": str(tmp_path), **override})
    assert not any(tmp_path.iterdir())


def test_missing_data_dir_fails_before_round_one(tmp_path):
    message = _run({"data-dir": str(tmp_path / "no-data"), "output-dir": str(tmp_path / "out")})
    assert "no-data" in message and "fashion-mnist" in message
    assert not (tmp_path / "out").exists()


def test_round_zero_defends_the_pretrained_model_before_clients_get_it():
    import torch

    from fmfl_flwr.defense import BoundSettings, bound_keys, make_defense
    from fmfl_flwr.fusion import FusionSettings

    images = torch.rand(120, 1, 4, 4)
    labels = torch.randint(0, 3, (120,))
    step = make_defense("activation-bounds", _tiny, images, labels,
                        BoundSettings(epochs=1, max_samples=60))
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    server_app.pretrain_and_defend(model, (images, labels),
                                   FusionSettings(pretrain_epochs=1, batch_size=32), step)
    state = model.state_dict()
    assert bound_keys(state) == ["2.act_bound"]  # the ReLU
    assert not torch.equal(state["1.weight"], before["1.weight"])  # pre-trained first
    metrics = server_app.step_metrics(step, 0, "defense")
    assert metrics["defense-trimmed-share"] == pytest.approx(0.2)
    assert server_app.step_metrics(step, 1, "defense") == {}
    assert server_app.step_metrics(None, 0, "defense") == {}


def test_pretraining_time_leaves_out_the_round_zero_defense():
    # The defense's time is already in its own `defense-time` column: counted once.
    import time

    import torch

    from fmfl_flwr.fusion import FusionSettings

    def slow_defense(server_round, state, client_states, client_weights):
        time.sleep(0.5)
        return state

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    seconds = server_app.pretrain_and_defend(
        model, (torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))),
        FusionSettings(pretrain_epochs=1, batch_size=32), slow_defense)
    assert 0.0 < seconds < 0.5


def test_pretraining_logs_each_epoch(monkeypatch):
    # CIFAR-10's pre-training takes minutes an epoch on a CPU: the log shows it moving.
    import torch

    from fmfl_flwr.fusion import FusionSettings

    lines = []
    monkeypatch.setattr(server_app, "log", lambda level, text, *args: lines.append(text % args))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    server_app.pretrain_and_defend(
        model, (torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))),
        FusionSettings(pretrain_epochs=2, batch_size=32), None)
    assert [line.split(", loss")[0] for line in lines] == [
        "fmfl: pre-training on D_syn, epoch 1/2", "fmfl: pre-training on D_syn, epoch 2/2"]


def test_a_second_run_loads_the_pretrained_model_from_the_cache(monkeypatch, tmp_path):
    # Every grid cell with the same model, seed and D_syn pre-trains the same weights.
    import torch

    from fmfl_flwr.fusion import FusionSettings

    monkeypatch.setenv("FMFL_CACHE_DIR", str(tmp_path))
    lines = []
    monkeypatch.setattr(server_app, "log", lambda level, text, *args: lines.append(text % args))
    syn = (torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,)))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)))
        server_app.pretrain_and_defend(models[-1], syn, FusionSettings(pretrain_epochs=2,
                                                                       batch_size=32), None)
    assert [line.split(" (")[0] for line in lines[2:]] == [
        "fmfl: pre-trained model from the cache"]
    assert str(tmp_path / "pretrained") in lines[2]
    for first, second in zip(models[0].state_dict().values(), models[1].state_dict().values(),
                             strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("defense", ["none", "mm-bm", "pruning", "clean-bounds-oracle"])
def test_fusion_runs_beside_defenses_that_name_no_target(defense):
    """FM-FL fusion without the gated defense: nothing to relabel or unlearn, and fusion
    must not ask a missing defense for its target (it did from 08a895e to stop 28)."""
    import torch

    from fmfl_flwr.app_config import parse_app_config
    from fmfl_flwr.cli import app_defaults

    config = parse_app_config({**app_defaults(), "defense": defense, "pretrain-epochs": 0})
    syn = (torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,)))
    fusion, _ = server_app.server_steps(config, _tiny_dataset(), _tiny, syn)
    state = _tiny().state_dict()
    fused = fusion(1, state, [state, state], [1.0, 1.0])
    assert fused.keys() == state.keys() and fusion.history == [] and fusion.unlearned_share == 0


def _tiny():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def _tiny_dataset():
    from types import SimpleNamespace

    import numpy as np

    return SimpleNamespace(train_x=np.zeros((40, 1, 4, 4), np.uint8),
                           train_y=np.zeros(40, np.int64))


def test_the_defense_reads_what_fusion_unlearned():
    """The bounds step reads `Fusion.unlearned_share` each round (its `trust_source`)."""
    import torch

    from fmfl_flwr.app_config import parse_app_config
    from fmfl_flwr.cli import app_defaults

    config = parse_app_config({**app_defaults(), "fusion": True, "defense": "activation-bounds",
                               "distill-unlearn-poison": True})
    syn = (torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,)))
    fusion, defense = server_app.server_steps(config, _tiny_dataset(), _tiny, syn)
    assert defense.trust_source() == 0.0
    fusion.unlearned_share = 0.18
    assert defense.trust_source() == 0.18


@pytest.mark.parametrize("cap", ["off", "pretrain", "all"])
def test_the_label_cap_cuts_the_copies_it_names(cap):
    import torch

    from fmfl_flwr.config import ExperimentConfig

    config = ExperimentConfig.from_run_config({"syn-per-class": 3, "syn-label-cap": cap})
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    syn = (torch.rand(10, 1, 2, 2), labels)
    steps, pretraining, dropped = server_app.capped_synthetic_data(config, syn)
    assert dropped == (0 if cap == "off" else 2)
    assert (steps is syn) == (cap != "all") and (pretraining is syn) == (cap == "off")
    capped = [] if cap == "off" else [pretraining] if cap == "pretrain" else [steps, pretraining]
    for images, kept in capped:
        assert torch.bincount(kept).tolist() == [3, 3, 2] and len(images) == 8
    assert server_app.capped_synthetic_data(config, None) == (None, None, 0)
