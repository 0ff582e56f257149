"""Run the Flower app in simulation from Python: `flwr run .` with everything it needs.

Each launch gets its own FLWR_HOME and free loopback ports, so its managed SuperLink
inherits this process's environment (data dir, cache dir) and never collides with another
run's; the SuperLink and everything under it is stopped by PID when the run ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

APP_DIR = Path(__file__).resolve().parent.parent

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_connection_config(flwr_home: Path, num_supernodes: int, cpus_per_client: float,
                            gpus_per_client: float = 0.0) -> None:
    """`$FLWR_HOME/config.toml`: the local simulation connection with its size."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {int(num_supernodes)}\n"
        f"options.backend.client-resources.num-cpus = {cpus_per_client}\n"
        f"options.backend.client-resources.num-gpus = {gpus_per_client}\n"
    )


def stop_processes_under(marker: str) -> list[int]:
    """Kill every process whose command line holds `marker`, with its children; PIDs."""
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid() or marker not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            family = [*proc.children(recursive=True), proc]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            try:
                member.kill()
                killed.append(member.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
    return killed


def run_simulation(run_config: dict[str, Any], num_supernodes: int = 10,
                   cpus_per_client: float = 1.0, app_dir: Path = APP_DIR,
                   flwr_home: Path | None = None, log_path: Path | None = None,
                   env: dict[str, str] | None = None) -> int:
    """`flwr run <app_dir> --stream` with `run_config` overrides; returns the exit code."""
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="fmfl-flwr-home-")).resolve()
    gpus = 1.0 / num_supernodes if _cuda_visible() else 0.0
    write_connection_config(flwr_home, num_supernodes, cpus_per_client, gpus)
    overrides = flwr_home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    full_env = {**os.environ, **FLOWER_ENV, **(env or {}), "FLWR_HOME": str(flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir),
               "--run-config", str(overrides), "--stream"]
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    try:
        return subprocess.run(command, env=full_env, stdout=log, stderr=subprocess.STDOUT
                              if log else None, check=False).returncode
    finally:
        stop_processes_under(str(flwr_home))
        if log:
            log.close()


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
