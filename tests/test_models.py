import pytest
import torch
from torch import nn

from fmfl_flwr.models import build_model, relu_names
from fmfl_flwr.training import predict_logits


@pytest.mark.parametrize(("name", "dataset", "relus"), [("cnn", "fashion-mnist", 4),
                                                        ("resnet18", "cifar10", 17)])
def test_every_relu_is_its_own_named_module(name, dataset, relus):
    model = build_model(name, dataset, width=8)
    names = relu_names(model)
    assert len(names) == relus
    modules = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in modules}) == relus  # no ReLU module is shared
    channels = 1 if dataset == "fashion-mnist" else 3
    size = 28 if dataset == "fashion-mnist" else 32
    assert model(torch.rand(2, channels, size, size)).shape == (2, 10)


def test_resnet_width_scales_parameters():
    small = sum(p.numel() for p in build_model("resnet18", "cifar10", width=8).parameters())
    large = sum(p.numel() for p in build_model("resnet18", "cifar10", width=16).parameters())
    assert 3.5 < large / small < 4.5


def test_relus_are_hit_in_forward():
    model = build_model("cnn", "fashion-mnist")
    seen = []
    for name in relu_names(model):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.append(n))
    model(torch.rand(1, 1, 28, 28))
    assert seen == relu_names(model)


def test_unknown_model():
    with pytest.raises(ValueError, match="accepted: cnn, resnet18"):
        build_model("vgg", "cifar10")


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_predict_logits_equals_forward_and_keeps_layout(name):
    model = build_model(name, "cifar10", 10, 8).eval()
    x = torch.rand(37, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(predict_logits(model, x, batch_size=16), expected, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
