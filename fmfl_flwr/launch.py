"""Run the Flower app in simulation from Python: `flwr run .` with everything it needs.

Each launch gets its own FLWR_HOME and free loopback ports, so its managed SuperLink
inherits this process's environment (data dir, cache dir) and never collides with another
run's; the SuperLink and everything under it is stopped by PID when the run ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any

import psutil

from fmfl_flwr.results import git_commit
from fmfl_flwr.secure import Security, public_key

APP_DIR = Path(__file__).resolve().parent.parent

# The trained FM pipelines of this checkout, found by `fm` = "" (fmfl_flwr.app_config).
FM_DIR = APP_DIR / "assets" / "fm"

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def flower_env(extra: dict[str, str] | None, flwr_home: Path) -> dict[str, str]:
    """The environment of the Flower processes a launch starts.

    The interpreter's bin folder goes first on PATH: Flower starts its own executables
    (flower-superlink, flower-superexec, flwr-serverapp) by name, and a virtual
    environment used without activation (`.venv/bin/pytest`) is not on PATH otherwise.
    """
    bin_dir = str(Path(sys.executable).parent)
    return {"FMFL_FM_DIR": str(FM_DIR), **os.environ, **FLOWER_ENV, **(extra or {}),
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home)}


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
    full_env = {**flower_env(env, flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    full_env.setdefault("FMFL_GIT_COMMIT", git_commit(Path(app_dir)))
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir),
               "--run-config", str(overrides), "--stream",
               "--federation-config", federation_config(num_supernodes, cpus_per_client)]
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    try:
        code = subprocess.run(command, env=full_env, stdout=log, stderr=subprocess.STDOUT
                              if log else None, check=False).returncode
        return checked_exit_code(code, command[0], full_env, log)
    finally:
        stop_processes_under(str(flwr_home))
        if log:
            log.close()


def run_deployment(run_config: dict[str, Any], node_configs: list[str], workdir: Path,
                   app_dir: Path = APP_DIR, env: dict[str, str] | None = None,
                   log_path: Path | None = None, security: Security | None = None) -> int:
    """A real SuperLink and one SuperNode per node config, as separate loopback processes.

    With `security` every link uses TLS and the SuperLink admits only SuperNodes whose
    public key was registered; the i-th SuperNode registers and signs with
    `security.node_keys[i]`. Returns `flwr run`'s exit code; every process started here is
    stopped by PID.
    """
    with Deployment(workdir, env=env, log_path=log_path, security=security) as deployment:
        keys: list[Path | None] = [None] * len(node_configs)
        if security is not None:
            if len(security.node_keys) < len(node_configs):
                raise ValueError(f"{len(node_configs)} SuperNodes need as many keys; "
                                 f"security has {len(security.node_keys)}")
            keys = list(security.node_keys[:len(node_configs)])
            for key in keys:
                deployment.register(public_key(key))
        for node_config, key in zip(node_configs, keys, strict=True):
            deployment.start_supernode(node_config, key)
        return deployment.flwr_run(run_config, app_dir)


class Deployment:
    """A SuperLink on a free loopback port, its SuperNodes and the flwr CLI pointed at it.

    A context manager so that tests and launchers can do steps one by one (register a key,
    start a node, look at the node list) and still stop every process by PID at the end.
    The CLI connection is called "deployment" in `<workdir>/flwr-home/config.toml`.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 log_path: Path | None = None, security: Security | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.log_path = Path(log_path or self.workdir / "deployment.log")
        self.security = security
        self.port = free_port()
        self.env = flower_env(env, self.flwr_home)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._bin = Path(sys.executable).parent
        self._log: IO[str] | None = None

    def __enter__(self) -> Deployment:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        transport = self.security.connection_lines() if self.security else "insecure = true\n"
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
            f'address = "127.0.0.1:{self.port}"\n{transport}'
        )
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in __exit__
        try:
            self.superlink = self._start(
                ["flower-superlink", "--port", str(self.port),
                 "--database", str(self.workdir / "state.db"),
                 *(self.security.superlink_args() if self.security else ["--insecure"])])
            self.wait_until_listening()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in reversed(self.processes):
            stop_process_tree(process.pid)
        if self._log:
            self._log.close()
            self._log = None

    def _start(self, command: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([str(self._bin / command[0]), *command[1:]], env=self.env,
                                   stdout=self._log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def wait_until_listening(self, timeout: float = 120.0) -> None:
        """Block until the SuperLink accepts connections (the CLI does not retry)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {self.superlink.returncode}; "
                                   f"see {self.log_path}")
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"SuperLink not listening on port {self.port} after {timeout} s")

    def start_supernode(self, node_config: str, private_key: Path | None = None,
                        max_wait_s: float | None = None) -> subprocess.Popen[bytes]:
        """One SuperNode with its own runtime port; `max_wait_s` bounds its reconnect tries."""
        args = self.security.supernode_args(private_key) if self.security else ["--insecure"]
        if max_wait_s is not None:
            args += ["--max-wait-time", str(max_wait_s)]
        return self._start(["flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
                            "--port", str(free_port()), "--node-config", node_config, *args])

    def flwr(self, *args: str, timeout: float | None = None
             ) -> subprocess.CompletedProcess[str]:
        """The flwr CLI against this deployment, output captured."""
        return subprocess.run([str(self._bin / "flwr"), *args], env=self.env, text=True,
                              capture_output=True, check=False, timeout=timeout)

    def register(self, public_key_path: Path) -> int:
        """`flwr supernode register`: admit the SuperNode holding this key; its node id."""
        result = self.flwr("supernode", "register", str(public_key_path), "deployment",
                           "--format", "json", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {result.stdout}{result.stderr}")
        return int(_last_json(result.stdout)["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """`flwr supernode list`: the SuperNodes the SuperLink knows, with their status."""
        result = self.flwr("supernode", "list", "deployment", "--format", "json", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode list failed: {result.stdout}{result.stderr}")
        return list(_last_json(result.stdout)["nodes"])

    def flwr_run(self, run_config: dict[str, Any], app_dir: Path = APP_DIR) -> int:
        """`flwr run <app_dir> deployment --stream` with `run_config` overrides; exit code."""
        overrides = self.flwr_home / "run-config.toml"
        overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        command = [str(self._bin / "flwr"), "run", str(app_dir), "deployment",
                   "--run-config", str(overrides), "--stream"]
        earlier = set(run_records(command[0], self.env))
        code = subprocess.run(command, env=self.env, stdout=self._log,
                              stderr=subprocess.STDOUT, check=False).returncode
        return checked_exit_code(code, command[0], self.env, self._log, earlier)


def run_records(flwr: str, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`flwr ls --format json` on the default connection: run id -> its record."""
    result = subprocess.run([flwr, "ls", "--format", "json"], env=env, text=True,
                            capture_output=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"flwr ls failed: {result.stdout}{result.stderr}")
    return {run["run-id"]: run for run in _last_json(result.stdout)["runs"]}


def checked_exit_code(code: int, flwr: str, env: dict[str, str], log: IO[str] | None,
                      earlier: Collection[str] = ()) -> int:
    """`flwr run`'s exit code, or 1 where a run it started did not complete.

    `flwr run --stream` exits 0 once the log stream ends, also when the ServerApp failed;
    the SuperLink's run record says how the run ended (`earlier`: runs not ours). Why a
    run failed goes to `log` (stderr without one).
    """
    if code != 0:
        return code
    try:
        records = run_records(flwr, env)
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as err:
        problems = [f"cannot tell how the run ended: {err}"]
    else:
        runs = [run for run_id, run in records.items() if run_id not in earlier]
        problems = [f"run {run['run-id']} ended {run['status']}: "
                    f"{run.get('status-details') or 'no reason given'}"
                    for run in runs if run["status"] != "finished:completed"
                    ] if runs else ["the SuperLink lists no run"]
    for problem in problems:
        print(f"fmfl: Flower {problem}", file=log or sys.stderr, flush=True)
    return 1 if problems else 0


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object the flwr CLI prints with --format json (after any banner lines)."""
    return json.loads(text[text.index("{"):])


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
