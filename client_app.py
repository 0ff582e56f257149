"""ClientApp: benign or malicious local training, and local evaluation.

Thin glue over the library: read the partition from the node config, train with
`fmfl_flwr.training`, poison with `fmfl_flwr.attacks` when this client is malicious.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fmfl_flwr import attacks
from fmfl_flwr.app_config import parse_app_config
from fmfl_flwr.client_update import ClientRole, client_update
from fmfl_flwr.config import ExperimentConfig
from fmfl_flwr.data import ImageDataset, load_dataset, to_float
from fmfl_flwr.defense import ensure_bounds_for_state
from fmfl_flwr.models import build_model
from fmfl_flwr.partition import client_indices, partition_indices
from fmfl_flwr.training import accuracy

app = ClientApp()


@lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str) -> ImageDataset:
    return load_dataset(name, data_dir)


def _node(context: Context) -> tuple[int, int, str]:
    """(partition-id, num-partitions, role); role '' means "decided by the run config"."""
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"]), str(node.get("role", ""))
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from err


def _role(config: ExperimentConfig, partition_id: int, num_partitions: int,
          node_role: str) -> ClientRole:
    """This client's role: from the node config's `role`, else the run config's choice."""
    if node_role not in ("", "benign", "malicious"):
        raise ValueError(f"node config role={node_role!r}; accepted: benign, malicious")
    chosen = sorted(attacks.malicious_partitions(config, num_partitions))
    if node_role:
        malicious = node_role == "malicious" and config.client_attack != "none"
        return ClientRole(malicious, partition_id, max(len(chosen), 1))
    if partition_id in chosen:
        return ClientRole(True, chosen.index(partition_id), len(chosen))
    return ClientRole(False, -1, len(chosen))


def _model(config: ExperimentConfig, dataset: ImageDataset, arrays: ArrayRecord):
    """The global model as served: with its activation bounds where it carries them."""
    state = arrays.to_torch_state_dict()
    model = build_model(config.model, config.dataset, dataset.num_classes, config.model_width)
    ensure_bounds_for_state(model, state).load_state_dict(state)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD for `local-epochs`; malicious clients poison and may boost their update."""
    started = time.perf_counter()
    config = parse_app_config(context.run_config)
    partition_id, num_partitions, node_role = _node(context)
    server_round = int(msg.content["config"]["server-round"])
    dataset = _dataset(config.dataset, config.data_dir)
    idx = client_indices(dataset.train_y, partition_id, num_partitions, config.partition,
                         config.dirichlet_alpha, config.public_fraction, config.seed,
                         config.data_fraction)
    images, labels = to_float(dataset.train_x[idx]), torch.as_tensor(dataset.train_y[idx])

    role = _role(config, partition_id, num_partitions, node_role)
    model = _model(config, dataset, msg.content["arrays"])
    state, loss, attacking = client_update(config, model, images, labels, dataset.image_shape,
                                           server_round, partition_id, num_partitions, role)

    metrics = MetricRecord({
        "num-examples": len(labels),
        "train-loss": loss,
        "train-time": time.perf_counter() - started,
        "malicious": int(attacking),
    })
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition, so it can sample reproducibly."""
    partition_id, num_partitions, _ = _node(context)
    metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy on this client's share of the real test set (its "local test accuracy")."""
    config = parse_app_config(context.run_config)
    partition_id, num_partitions, _ = _node(context)
    dataset = _dataset(config.dataset, config.data_dir)
    parts = partition_indices(dataset.test_y, config.partition, num_partitions,
                              config.dirichlet_alpha, config.seed)
    idx = np.asarray(parts[partition_id])
    model = _model(config, dataset, msg.content["arrays"])
    acc = accuracy(model, to_float(dataset.test_x[idx]), torch.as_tensor(dataset.test_y[idx]))
    metrics = MetricRecord({"num-examples": len(idx), "local-acc": acc})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
