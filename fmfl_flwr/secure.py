"""TLS and SuperNode authentication for a deployment, with Flower's own options.

A backdoor study's server must not be the easy way in: the documented deployment encrypts
every link with TLS (the SuperLink holds a certificate signed by a CA that SuperNodes, the
SuperExec and the flwr CLI trust) and lets in only SuperNodes whose public key was
registered with `flwr supernode register`. The files come from `deploy/make-certs.sh` and
`deploy/make-supernode-keys.sh`; this module turns them into the flags and the connection
config that `fmfl_flwr.launch` passes to Flower's processes.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"


@dataclass(frozen=True)
class Security:
    """Paths of a TLS CA, the SuperLink's certificate and key, and SuperNode private keys.

    `node_keys[i]` is the private key of the i-th SuperNode; its public half is
    `node_keys[i]` + ".pub" (as ssh-keygen writes them).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...] = ()

    @classmethod
    def make(cls, directory: Path, num_nodes: int) -> Security:
        """Fresh test certificates and `num_nodes` key pairs under `directory`, by the scripts."""
        directory = Path(directory).resolve()
        for script, args in (("make-certs.sh", [str(directory / "certs")]),
                             ("make-supernode-keys.sh", [str(directory / "keys"),
                                                         str(num_nodes)])):
            subprocess.run(["bash", str(DEPLOY_DIR / script), *args], check=True,
                           capture_output=True, text=True, timeout=120)
        certs = directory / "certs"
        return cls(certs / "ca.crt", certs / "server.pem", certs / "server.key",
                   tuple(directory / "keys" / f"supernode-{i}" for i in range(num_nodes)))

    def superlink_args(self) -> list[str]:
        """`flower-superlink` flags: TLS on all APIs, only registered SuperNodes."""
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key), "--enable-supernode-auth"]

    def supernode_args(self, private_key: Path | None) -> list[str]:
        """`flower-supernode` flags: verify the SuperLink by the CA, sign with `private_key`."""
        args = ["--root-certificates", str(self.ca_cert)]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        return args

    def connection_lines(self) -> str:
        """Lines of a `[superlink.<name>]` table in `$FLWR_HOME/config.toml` (absolute path)."""
        return f'root-certificates = "{Path(self.ca_cert).resolve()}"\n'


def public_key(private_key: Path) -> Path:
    """The OpenSSH public key beside a private key made by make-supernode-keys.sh."""
    return Path(f"{private_key}.pub")
