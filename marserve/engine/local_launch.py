"""Starts N ranks of one command on this host with torchrun's environment variables and a free port (what
`marserve bench ep` and the expert-parallel tests use instead of torchrun, to own the processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(args: list[str], size: int, extra_env: dict | None = None, **popen) -> list[subprocess.Popen]:
    """`python args...` once per rank 0..size-1, all in one torch.distributed group on 127.0.0.1."""
    env = dict(os.environ, WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), **(extra_env or {}))
    # The ranks import this checkout, as the parent does (a source tree run with PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    return [subprocess.Popen([sys.executable, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), **popen)
            for r in range(size)]
