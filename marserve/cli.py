"""The `marserve` command line: one sub-command per module in marserve/commands/.

Building the parser imports the command modules, which import no torch at module level (they import the
engine inside run()), so `--help`, `--version` and usage errors answer at once; tests/test_cli.py holds
them to it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from marserve import progress
from marserve.errors import MarserveError

# name -> (module defining add_arguments(parser) and run(args) -> int, one-line help); the modules must
# import no heavy dependency (torch, transformers, the server) at module level.
COMMANDS = {
    "generate": ("marserve.commands.generate", "generate text from prompts (offline)"),
    "inspect": ("marserve.commands.inspect", "describe a checkpoint; --routing analyses expert use"),
    "serve": ("marserve.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "train": ("marserve.commands.train", "train a small MoE with (or without) MAR on a local corpus"),
    "bench": ("marserve.commands.bench", "benchmarks: throughput, moe, linear, serve, ep, experts, reads"),
    "calibrate": ("marserve.commands.calibrate", "record routing on sample text: expert preferences for offloading"),
    "doctor": ("marserve.commands.doctor", "what marserve makes of this machine: ISA, native kernels, dtype auto"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def _version() -> str:
    from marserve import __version__
    return f"marserve {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"marserve: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper() if hasattr(args, "log_level") else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress.set_quiet(getattr(args, "quiet", False))  # bars and stage lines, shown on a terminal unless --quiet
    # Before torch (and so libgomp) loads: OpenMP threads spin at most ~10k iterations at a barrier before they
    # sleep, not libgomp's 300k. The native decode kernels cross ~100 barriers a step; when another process
    # holds a core, the full spin burns the time slices the descheduled thread needs (batch-1 decode on the
    # 2-core AVX2 host under load: 4-29 tok/s with the default, 23-95 with 10k; quiet, 91-134 either way).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except MarserveError as e:
        print(f"marserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
