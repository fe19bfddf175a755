"""The two lines a standalone bench module ends its report with: the command that produced it, and the host's ISA."""

from __future__ import annotations

import sys


def print_provenance(module: str, argv: list[str] | None) -> None:
    """Print `command: python -m <module> <args>` (argv as given, else the process's) and `host: <ISA, CPU>`."""
    from marserve_kernels import cpu_features
    print(f"command: python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"host: {cpu_features.describe()}")
