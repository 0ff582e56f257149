"""The pre-trained model cache: a hit gives the weights training gives, a change misses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from fmfl_flwr import pretrain_cache
from fmfl_flwr.fusion import FusionSettings, pretrain
from fmfl_flwr.pretrain_cache import pretrain_cached, pretrain_key

SETTINGS = FusionSettings(pretrain_epochs=2, batch_size=16, seed=3)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_syn() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(40, 3, 2, 2, generator=generator), torch.randint(0, 3, (40,),
                                                                       generator=generator)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_hit_loads_the_weights_training_gives_without_training(tmp_path, monkeypatch):
    syn = tiny_syn()
    trained = tiny_model()
    pretrain(trained, *syn, SETTINGS)
    first = tiny_model()
    assert pretrain_cached(first, *syn, SETTINGS, root=tmp_path) is False
    assert states_equal(first, trained)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(pretrain_cache, "pretrain", no_training)
    second = tiny_model()
    assert pretrain_cached(second, *syn, SETTINGS, root=tmp_path) is True
    assert states_equal(second, trained)


@pytest.mark.parametrize("change", ["images", "labels", "seed", "epochs", "batch", "schedule",
                                    "init"])
def test_every_input_of_training_changes_the_key(change):
    syn_x, syn_y = tiny_syn()
    model, settings = tiny_model(), SETTINGS
    base = pretrain_key(model, syn_x, syn_y, settings)
    if change == "images":
        syn_x = syn_x.clone()
        syn_x[0, 0, 0, 0] += 0.5
    elif change == "labels":
        syn_y = syn_y.clone()
        syn_y[0] = (syn_y[0] + 1) % 3
    elif change == "seed":
        settings = replace(settings, seed=4)
    elif change == "epochs":
        settings = replace(settings, pretrain_epochs=3)
    elif change == "batch":
        settings = replace(settings, batch_size=8)
    elif change == "schedule":
        settings = replace(settings, pretrain_lr_schedule="cosine")
    else:
        model = tiny_model(seed=1)
    assert pretrain_key(model, syn_x, syn_y, settings) != base


def test_a_broken_copy_is_trained_again(tmp_path):
    syn = tiny_syn()
    key = pretrain_key(tiny_model(), *syn, SETTINGS)
    (tmp_path / f"{key}.pt").write_bytes(b"not a checkpoint")
    model = tiny_model()
    with pytest.warns(UserWarning, match="failed to load"):
        assert pretrain_cached(model, *syn, SETTINGS, root=tmp_path) is False
    trained = tiny_model()
    pretrain(trained, *syn, SETTINGS)
    assert states_equal(model, trained)
    reloaded = tiny_model()
    assert pretrain_cached(reloaded, *syn, SETTINGS, root=tmp_path) is True


def test_no_pretraining_writes_nothing(tmp_path):
    model = tiny_model()
    assert pretrain_cached(model, *tiny_syn(), replace(SETTINGS, pretrain_epochs=0),
                           root=tmp_path) is False
    assert states_equal(model, tiny_model())
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
