"""`marserve serve` with the soak's test-only faults armed: run as `python -m tests.soak.faulty_serve [serve flags]`.

The faults are Python hooks installed in this process before the server starts; nothing in marserve
reads them from a request, a flag or the environment, so no HTTP client of a real server can reach
them. A request opts into a fault only here, by a marker the soak alone sends (FAULT_SEED).
"""

from __future__ import annotations

import sys
import threading

from marserve.engine.sampler import Sampler
from marserve.experts.slow_tier import contiguous_runs
from marserve.experts.store import ExpertStore
from marserve.sampling_params import SamplingParams

# A request with this seed raises in sampling: the engine must fail that request alone (batch, then row
# by row) and every request batched with it must finish as if nothing happened.
FAULT_SEED = 0x50A4F417


def _sampling_fault(params: SamplingParams) -> None:
    if params.seed == FAULT_SEED:
        raise RuntimeError("injected sampling fault (soak test hook)")


class CorruptReads:
    """The store's fault hook: flips one byte in every `every`-th expert read (counted per contiguous run the
    slow tier reads at once), and never in that run's re-read. Only the last piece of a run is damaged, so the
    re-read, which sees the run's pieces again in order, is clean from its first piece to its last: the store
    must catch the checksum, read again and produce the same text; a second bad read would fail the request.
    """

    def __init__(self, index, every: int = 100):
        self.every = every
        self._last = {run[-1] for per in index.pieces.values() for pieces in per for run in contiguous_runs(pieces)}
        self._retry: set = set()  # damaged pieces whose re-read is still to come
        self._lock = threading.Lock()  # reads run on the engine thread and the prefetch threads
        self.reads = self.damaged = 0

    def __call__(self, piece, view: memoryview) -> None:
        with self._lock:
            if piece in self._retry:  # the re-read of a run damaged just before: left clean
                self._retry.discard(piece)
                return
            if piece not in self._last:
                return
            self.reads += 1
            if self.reads % self.every:
                return
            self._retry.add(piece)
            self.damaged += 1
        view[len(view) // 2] ^= 0x10


def _arm_faults(expert_cache: bool) -> None:
    real_init = Sampler.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.fault_hook = _sampling_fault  # Sampler's own test-only hook

    Sampler.__init__ = init
    if not expert_cache:
        return
    # With the offloaded expert cache, 1% of expert reads come back corrupt (the store's own test-only hook):
    # the soak's greedy check (every greedy request equals its reference) proves "never wrong text", and its
    # expert-cache row asks /metrics for the re-reads (marserve:expert_cache_rereads_total).
    real_store_init = ExpertStore.__init__

    def store_init(self, *args, **kwargs):
        real_store_init(self, *args, **kwargs)
        self.fault_hook = CorruptReads(self.index)

    ExpertStore.__init__ = store_init


def main() -> int:
    _arm_faults(expert_cache=any(a.split("=")[0] in ("--expert-cache", "--expert-cache-gb") for a in sys.argv[1:]))
    from marserve.cli import main as marserve_main
    return marserve_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
