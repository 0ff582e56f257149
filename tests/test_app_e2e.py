"""The Flower app end to end: a simulation through `flwr run`, and a real deployment."""

import csv
import json

import psutil
import pytest

from fmfl_flwr.config import PLAIN_FEDAVG
from fmfl_flwr.launch import run_deployment, run_simulation

pytestmark = pytest.mark.slow

SMALL = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 64, "data-fraction": 0.2,
         **PLAIN_FEDAVG}  # plain FedAvg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _flower_processes(marker):
    return [p for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or [])]


def test_simulation_writes_results_and_stops_its_superlink(tmp_path):
    home = tmp_path / "flwr-home"
    config = {**SMALL, "output-dir": str(tmp_path / "out"), "run-name": "sim"}
    code = run_simulation(config, num_supernodes=3, flwr_home=home, log_path=tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert code == 0, log[-3000:]
    run_dir = tmp_path / "out" / "sim"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert float(rows[-1]["acc"]) > 0.6  # two rounds of FedAvg on a fifth of Fashion-MNIST
    assert float(rows[-1]["client-acc"]) > 0.6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["acc"] == pytest.approx(float(rows[-1]["acc"]))
    assert set(summary["phases_s"]) >= {"client_training_s", "aggregation_s", "fusion_s"}
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["run_config"]["num-server-rounds"] == 2 and config_json["version"]
    assert (run_dir / "model.pt").stat().st_size > 0
    assert not _flower_processes(str(home))


def test_deployment_with_separate_supernode_processes(tmp_path):
    nodes = [f"partition-id={i} num-partitions=2" for i in range(2)]
    config = {**SMALL, "output-dir": str(tmp_path / "out"), "run-name": "deploy",
              "fraction-evaluate": 0.0}
    code = run_deployment(config, nodes, tmp_path / "deploy")
    log = (tmp_path / "deploy" / "deployment.log").read_text()
    assert code == 0, log[-3000:]
    rows = _rows(tmp_path / "out" / "deploy")
    assert [r["round"] for r in rows] == ["0", "1", "2"] and float(rows[-1]["acc"]) > 0.6
    assert not _flower_processes(str(tmp_path / "deploy"))


def test_cifar10_resnet18_runs_end_to_end(tmp_path):
    config = {**SMALL, "dataset": "cifar10", "model": "resnet18", "model-width": 8,
              "num-server-rounds": 1, "batch-size": 64, "data-fraction": 0.05,
              "output-dir": str(tmp_path / "out"), "run-name": "cifar"}
    code = run_simulation(config, num_supernodes=2, log_path=tmp_path / "log")
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    rows = _rows(tmp_path / "out" / "cifar")
    assert [r["round"] for r in rows] == ["0", "1"]
    assert float(rows[-1]["acc"]) > 0.1  # above chance after one short round
