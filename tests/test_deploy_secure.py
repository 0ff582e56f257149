"""The secured deployment on loopback: TLS on every link and SuperNode authentication.

Real `flower-superlink`, `flower-supernode` and `flwr` processes with certificates and keys
made by the scripts in deploy/, as the deployment guide (deploy/README.md) documents.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import psutil
import pytest

from fmfl_flwr.config import PLAIN_FEDAVG
from fmfl_flwr.launch import Deployment, run_deployment
from fmfl_flwr.secure import Security, public_key

# A refused SuperNode gives up at once; the bound only keeps a regression from hanging CI.
REFUSAL_TIMEOUT_S = 90


def _processes_under(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or [])]


def test_scripts_make_a_ca_signed_certificate_for_loopback_and_ec_keys(tmp_path: Path) -> None:
    security = Security.make(tmp_path, 2)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(security.ca_cert),
                             str(security.server_cert)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(security.server_cert), "-noout",
                           "-text"], capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    for key in security.node_keys:
        assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_key(key).read_text().startswith("ecdsa-sha2-nistp384 ")
    assert security.superlink_args()[-1] == "--enable-supernode-auth"
    assert "--insecure" not in security.superlink_args() + security.supernode_args(None)


def test_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    """Only the registered key comes online; an unknown key and no key are turned away."""
    security = Security.make(tmp_path / "sec", 3)
    registered, unknown = security.node_keys[0], security.node_keys[1]
    with Deployment(tmp_path / "deploy", security=security) as deployment:
        node_id = deployment.register(public_key(registered))
        intruder = deployment.start_supernode("partition-id=1 num-partitions=2", unknown,
                                              max_wait_s=30)
        keyless = deployment.start_supernode("partition-id=1 num-partitions=2", None,
                                             max_wait_s=30)
        member = deployment.start_supernode("partition-id=0 num-partitions=2", registered,
                                            max_wait_s=30)
        assert intruder.wait(timeout=REFUSAL_TIMEOUT_S) != 0
        assert keyless.wait(timeout=REFUSAL_TIMEOUT_S) != 0
        assert member.poll() is None, "the registered SuperNode must stay connected"
        nodes = deployment.nodes()
    log = deployment.log_path.read_text()
    # The SuperLink's side: one known node, and both refusals in its log.
    assert [int(n["node-id"]) for n in nodes] == [node_id]
    assert "No SuperNode found with the given public key" in log
    assert "All SuperNodes must be registered via the CLI" in log
    assert "Uvicorn running on https://" in log
    assert not _processes_under(str(tmp_path))


@pytest.mark.slow
def test_secured_deployment_completes_two_rounds(tmp_path: Path) -> None:
    # 2 SuperNodes on 2 of 10 partitions: a small, quick run on a shared CPU.
    nodes = [f"partition-id={i} num-partitions=10" for i in range(2)]
    config = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 64,
              "fraction-evaluate": 0.0, "output-dir": str(tmp_path / "out"),
              **PLAIN_FEDAVG, "run-name": "secure"}
    security = Security.make(tmp_path / "sec", 2)
    code = run_deployment(config, nodes, tmp_path / "deploy", security=security)
    log = (tmp_path / "deploy" / "deployment.log").read_text()
    assert code == 0, log[-3000:]
    with (tmp_path / "out" / "secure" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert float(rows[-1]["acc"]) > 0.5
    assert "Uvicorn running on https://" in log
    assert log.count("[Fleet.ActivateNode] Activated") == 2
    assert not _processes_under(str(tmp_path))
