"""The client ensemble: the mean of the finite client models' logits."""

import torch
from torch import nn

from fmfl_flwr.ensemble import ensemble_logits
from fmfl_flwr.training import predict_logits


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _nan_model() -> nn.Module:
    model = _tiny()
    with torch.no_grad():
        model[3].bias[1] = float("nan")
    return model


def test_the_ensemble_is_the_mean_of_the_clients():
    x = torch.rand(10, 1, 2, 2)
    a, b = _tiny(), _tiny()
    logits, left_out = ensemble_logits([a, b], x)
    assert left_out == 0
    assert torch.allclose(logits, (predict_logits(a, x) + predict_logits(b, x)) / 2, atol=1e-6)


def test_a_client_model_with_non_finite_outputs_is_left_out():
    x = torch.rand(10, 1, 2, 2)
    a, b = _tiny(), _tiny()
    logits, left_out = ensemble_logits([a, _nan_model(), b], x)
    assert left_out == 1
    assert torch.allclose(logits, (predict_logits(a, x) + predict_logits(b, x)) / 2, atol=1e-6)
    assert ensemble_logits([_nan_model(), _nan_model()], x) == (None, 2)
