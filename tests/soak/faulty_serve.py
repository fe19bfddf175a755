"""`marserve serve` with the soak's test-only faults armed: run as `python -m tests.soak.faulty_serve [serve flags]`.

The faults are Python hooks installed in this process before the server starts; nothing in marserve
reads them from a request, a flag or the environment, so no HTTP client of a real server can reach
them. A request opts into a fault only here, by a marker the soak alone sends (FAULT_SEED).
"""

from __future__ import annotations

import sys

from marserve.engine.sampler import Sampler
from marserve.sampling_params import SamplingParams

# A request with this seed raises in sampling: the engine must fail that request alone (batch, then row
# by row) and every request batched with it must finish as if nothing happened.
FAULT_SEED = 0x50A4F417


def _sampling_fault(params: SamplingParams) -> None:
    if params.seed == FAULT_SEED:
        raise RuntimeError("injected sampling fault (soak test hook)")


def _arm_faults() -> None:
    real_init = Sampler.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.fault_hook = _sampling_fault  # Sampler's own test-only hook

    Sampler.__init__ = init
    # FAULT HOOK TO ADD after the offload-store merge: a corrupt expert read (the store's own test hook,
    # e.g. flip bytes of one read so its checksum fails). The store must detect it, read again, and never
    # produce wrong text; the soak's greedy check (every greedy request equals its reference) then proves
    # "never wrong text", and checks.py's expert-cache row should count the re-reads.


def main() -> int:
    _arm_faults()
    from marserve.cli import main as marserve_main
    return marserve_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
