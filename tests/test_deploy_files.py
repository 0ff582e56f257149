"""The Docker files, checked without a Docker engine: they parse and agree with the project.

No engine runs here, so the image is never built; what can go stale is checked instead:
the base images are pinned to the installed flwr, the image installs the app exactly as CI
does, and the compose file wires TLS, SuperNode keys and partitions consistently.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import flwr
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VERSION = flwr.__version__


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, comments and continuations resolved."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
            for line in lines if line and not line.startswith("#")]


def ci_install_command() -> list[str]:
    """CI's pip install step (.ci/run), without the path to its virtual environment."""
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].endswith("pip") and "install" in words:
            return ["pip", *words[1:]]
    raise AssertionError(".ci/run has no pip install step")


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def flags(service: dict[str, Any]) -> dict[str, str]:
    """A service's `--key=value` command flags as a dict (bare flags map to '')."""
    return dict((arg.split("=", 1) + [""])[:2] for arg in service.get("command", []))


def test_dockerfile_builds_on_the_pinned_superexec_image_and_installs_like_ci() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", f"flwr/superexec:{VERSION}")
    runs = [shlex.split(args) for kind, args in instructions if kind == "RUN"]
    assert ci_install_command() in runs
    assert instructions[-1] == ("ENTRYPOINT", '["flower-superexec"]')
    copied = " ".join(args for kind, args in instructions if kind == "COPY")
    for needed in ("pyproject.toml", "README.md", "server_app.py", "client_app.py",
                   "fmfl_flwr", "strategies"):
        assert needed in copied, f"the install step needs {needed} in the image"


def test_project_pins_the_flwr_version_the_images_use() -> None:
    assert f'"flwr[simulation]=={VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_compose_runs_superlink_supernodes_and_superexecs_on_pinned_images() -> None:
    services = compose()["services"]
    assert services["superlink"]["image"] == f"flwr/superlink:{VERSION}"
    supernodes = {k: v for k, v in services.items() if k.startswith("supernode-")}
    assert len(supernodes) >= 2
    for service in supernodes.values():
        assert service["image"] == f"flwr/supernode:{VERSION}"
    for name, service in services.items():
        if name.startswith("superexec-"):
            assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
            assert (DEPLOY / service["build"]["context"] / "Dockerfile").is_file()


def test_compose_turns_tls_and_supernode_auth_on_everywhere() -> None:
    services = compose()["services"]
    link = flags(services["superlink"])
    assert "--enable-supernode-auth" in link
    for name, service in services.items():
        command = flags(service)
        assert "--insecure" not in command, name
        mounted = {v.split(":")[1] for v in service.get("volumes", [])}
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                     "--root-certificates"):
            if flag in command:  # every certificate it names is mounted into it
                path = "/app/" + command[flag]
                assert path in mounted or str(Path(path).parent) in mounted, (name, flag)
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(link)


def test_compose_gives_each_supernode_its_key_partition_role_and_superexec() -> None:
    services = compose()["services"]
    partitions, sizes = [], set()
    for name, service in services.items():
        if not name.startswith("supernode-"):
            continue
        command = flags(service)
        index = name.removeprefix("supernode-")
        key = command["--auth-supernode-private-key"]
        assert key == f"keys/supernode-{index}"
        assert any(v.startswith(f"./{key}:/app/{key}") for v in service["volumes"])
        node = dict(pair.split("=", 1) for pair in shlex.split(command["--node-config"]))
        assert node["role"] in ("benign", "malicious")
        partitions.append(int(node["partition-id"]))
        sizes.add(int(node["num-partitions"]))
        superexec = flags(services[f"superexec-clientapp-{index}"])
        assert superexec["--runtime-api-address"] == f"{name}:{command['--port']}"
        assert command["--superlink"] == "superlink:" + flags(services["superlink"])["--port"]
    assert sorted(partitions) == list(range(len(partitions))) and sizes == {len(partitions)}
    serverapp = flags(services["superexec-serverapp"])
    assert serverapp["--runtime-api-address"] == "superlink:8000"


@pytest.mark.parametrize("overlay", ["compose.gpu.yaml"])
def test_gpu_overlay_only_names_services_of_the_compose_file(overlay: str) -> None:
    base, extra = compose()["services"], compose(overlay)["services"]
    assert set(extra) <= set(base)
    for service in extra.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
