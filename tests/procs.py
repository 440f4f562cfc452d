"""What tests need to start the project's own commands in child processes."""
import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody on this machine holds now (other jobs may hold any fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(**extra: str) -> dict:
    """The environment with this checkout first on PYTHONPATH. It extends PYTHONPATH and never replaces it:
    on a machine without a package index, deepspeed and other carried wheels are found through it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
