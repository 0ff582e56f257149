"""One client's round without Flower: the served bounds on or off, the attack flag."""

import pytest
import torch

from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.config import PLAIN_FEDAVG, ExperimentConfig
from fmfl_flwr.defense import attach_bounds, bound_keys
from fmfl_flwr.models import build_model

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
