"""One client's round without Flower: the served bounds on or off, the attack flag."""

import copy

import pytest
import torch
from torch.nn import functional as F

from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.config import PLAIN_FEDAVG, ExperimentConfig
from fmfl_flwr.defense import attach_bounds, bound_keys
from fmfl_flwr.defense.bounds import UNBOUNDED
from fmfl_flwr.models import build_model
from fmfl_flwr.training import predict_logits

BENIGN = ClientRole(False, -1, 0)


@pytest.mark.parametrize(("client_bounds", "conv_moves"), [(True, False), (False, True)])
def test_client_update_trains_through_the_served_bounds_or_not(client_bounds, conv_moves):
    config = ExperimentConfig.from_run_config({**PLAIN_FEDAVG, "batch-size": 8,
                                               "client-bounds": client_bounds})
    model = attach_bounds(build_model("cnn", "fashion-mnist", 10, 8), value=0.0)  # all dead
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    state, loss, attacked = client_update(config, model, images, labels, (1, 28, 28), 1, 0, 4,
                                          BENIGN)
    assert not attacked and loss > 0
    assert (not torch.equal(state["conv1.weight"], start["conv1.weight"])) == conv_moves
    assert all(torch.equal(state[k], start[k]) for k in bound_keys(start))


def test_client_distill_keeps_the_served_model_on_the_classes_a_client_lacks():
    """One class of local data: the KL to the served model keeps its other classes alive."""
    model = attach_bounds(build_model("cnn", "fashion-mnist", 10, 8))
    torch.manual_seed(0)
    images, labels = torch.rand(64, 1, 28, 28), torch.zeros(64, dtype=torch.long)
    served = predict_logits(model, images).softmax(1)

    def kl_to_served(weight: float) -> float:
        config = ExperimentConfig.from_run_config({**PLAIN_FEDAVG, "batch-size": 16,
                                                   "local-epochs": 3, "client-distill": weight})
        trained = copy.deepcopy(model)
        client_update(config, trained, images, labels, (1, 28, 28), 1, 0, 4, BENIGN)
        log_probs = predict_logits(trained, images).log_softmax(1)
        return F.kl_div(log_probs, served, reduction="batchmean").item()

    assert kl_to_served(3.0) < 0.5 * kl_to_served(0.0)


@pytest.mark.parametrize(("malicious", "lifted"), [(True, True), (False, False)])
def test_a_malicious_client_lifting_its_bounds_replies_unbounded(malicious, lifted):
    """Only the attacking client's reply carries lifted bounds; its weights still train."""
    config = ExperimentConfig.from_run_config({**PLAIN_FEDAVG, "batch-size": 8,
                                               "client-attack": "badnets",
                                               "attack-lift-bounds": True})
    model = attach_bounds(build_model("cnn", "fashion-mnist", 10, 8), value=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(1, 10, (16,))
    role = ClientRole(True, 0, 1) if malicious else BENIGN
    state, _, attacked = client_update(config, model, images, labels, (1, 28, 28), 1, 0, 4,
                                       role)
    assert attacked == malicious
    assert not torch.equal(state["conv1.weight"], start["conv1.weight"])
    changed = [not torch.equal(state[k], start[k]) for k in bound_keys(start)]
    assert changed and all(c == lifted for c in changed)
    if lifted:
        assert all(state[k].min() == UNBOUNDED for k in bound_keys(start))
