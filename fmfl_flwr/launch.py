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


def write_connection_config(flwr_home: Path) -> None:
    """`$FLWR_HOME/config.toml` with Flower's local simulation connection as default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )


def federation_config(num_supernodes: int, cpus_per_client: int) -> str:
    """Flower's --federation-config: simulation size, one GPU share per client if any."""
    text = f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(cpus_per_client)}"
    if _cuda_visible():
        text += f" client-resources-num-gpus={1.0 / num_supernodes}"
    return text


def stop_processes_under(marker: str) -> list[int]:
    """Kill every process whose command line holds `marker`, with its children; PIDs."""
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid() or marker not in " ".join(proc.info["cmdline"] or []):
            continue
        killed.append(proc.pid)
        stop_process_tree(proc.pid)
    return killed


def run_simulation(run_config: dict[str, Any], num_supernodes: int = 10,
                   cpus_per_client: int = 1, app_dir: Path = APP_DIR,
                   flwr_home: Path | None = None, log_path: Path | None = None,
                   env: dict[str, str] | None = None) -> int:
    """`flwr run <app_dir> --stream` with `run_config` overrides; returns the exit code."""
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="fmfl-flwr-home-")).resolve()
    write_connection_config(flwr_home)
    overrides = flwr_home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    full_env = {**os.environ, **FLOWER_ENV, **(env or {}), "FLWR_HOME": str(flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir),
               "--run-config", str(overrides), "--stream",
               "--federation-config", federation_config(num_supernodes, cpus_per_client)]
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    try:
        return subprocess.run(command, env=full_env, stdout=log, stderr=subprocess.STDOUT
                              if log else None, check=False).returncode
    finally:
        stop_processes_under(str(flwr_home))
        if log:
            log.close()


def run_deployment(run_config: dict[str, Any], node_configs: list[str], workdir: Path,
                   app_dir: Path = APP_DIR, env: dict[str, str] | None = None,
                   log_path: Path | None = None) -> int:
    """A real SuperLink and one SuperNode per node config, as separate loopback processes.

    Returns `flwr run`'s exit code; every process started here is stopped by PID.
    """
    workdir = Path(workdir).resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    overrides = flwr_home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    full_env = {**os.environ, **FLOWER_ENV, **(env or {}), "FLWR_HOME": str(flwr_home)}
    bin_dir = Path(sys.executable).parent
    log = open(log_path or workdir / "deployment.log", "a")  # noqa: SIM115 - closed below
    processes = [subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--port", str(port),
         "--database", str(workdir / "state.db")],
        env=full_env, stdout=log, stderr=subprocess.STDOUT)]
    try:
        for node_config in node_configs:
            processes.append(subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", node_config],
                env=full_env, stdout=log, stderr=subprocess.STDOUT))
        command = [str(bin_dir / "flwr"), "run", str(app_dir), "deployment",
                   "--run-config", str(overrides), "--stream"]
        return subprocess.run(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    finally:
        for process in processes:
            stop_process_tree(process.pid)
        log.close()


def stop_process_tree(pid: int) -> None:
    """Kill `pid` and all its descendants, and wait for them."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
