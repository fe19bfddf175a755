"""Progress of long work (model load, routing analysis, corpus build, benchmarks) on stderr, for a person at a terminal.

Shown only when stderr is a terminal and the command was not given `--quiet`: a server's or a job's log
(stderr redirected to a file or a pipe) never fills with bars. Two forms: `bar()`, a tqdm bar over items
(tensors, windows, runs), and `stage()`, one line per step with its time. The state is per process, set
once by the command line (`set_quiet`), so library code needs no flag threaded through every call.
Importing this module imports neither torch nor tqdm: the CLI parser uses `add_quiet_flag`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

_quiet = False


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or stage lines on stderr (they are shown only on a terminal anyway)")


def set_quiet(quiet: bool) -> None:
    """The command line's --quiet: silences every bar and stage line of this process."""
    global _quiet
    _quiet = bool(quiet)


def is_enabled(stream=None) -> bool:
    """Whether progress goes to `stream` (default: sys.stderr as it is now): a terminal, and not --quiet."""
    stream = sys.stderr if stream is None else stream
    if _quiet or stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it", stream=None):
    """A tqdm bar on stderr (cleared when done), disabled unless is_enabled()."""
    from tqdm import tqdm
    stream = sys.stderr if stream is None else stream
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True,
                disable=not is_enabled(stream))


@contextlib.contextmanager
def stage(what: str, stream=None):
    """`marserve: WHAT ... done (1.2 s)` around a step, on one line (or `failed` if the step raises)."""
    stream = sys.stderr if stream is None else stream
    if not is_enabled(stream):
        yield
        return
    stream.write(f"marserve: {what} ... ")
    stream.flush()
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        stream.write("failed\n")
        raise
    stream.write(f"done ({time.perf_counter() - start:.1f} s)\n")
    stream.flush()
