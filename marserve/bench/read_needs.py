"""When each expert read of a live run was needed, in compute time: what a tight overlap bound needs.

`ReadNeeds(store).install()` wraps one ExpertStore's read and fetch (instance attributes; the class and other
stores stay as they are). Between `begin()` and `end()` (one request) it records, for every read that some fetch
then used, the read's bytes on disk and the request's compute time (wall time since `begin()` less the time
fetches waited for reads) at the start of the first fetch that used it. Reads never used (wrong prefetches) are left
out: no schedule needs them.

Whatever the schedule, with reads one after another at `rate` from the request's start, by compute position c the
disk must have read every byte needed at or before c, so the request has stalled at least
max over c of (those bytes / rate - c) (bench/experts.py, `overlap_bound`).
"""

from __future__ import annotations

import threading
import time


class ReadNeeds:
    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._unused: dict = {}  # key -> bytes of a read not used by any fetch yet
        self._start = 0.0
        self._stalled = 0.0
        self.needs: list[tuple[float, int]] = []  # (compute seconds at first use, bytes), this request

    def install(self) -> "ReadNeeds":
        store, lock = self.store, self._lock
        load, fetch = store._load, store.fetch

        def recorded_load(key, slot, prefetched):
            with lock:
                self._unused[key] = store.index.file_bytes(*key)
            return load(key, slot, prefetched)

        def recorded_fetch(layer, counts):
            start = time.perf_counter()
            with lock:
                compute = start - self._start - self._stalled
            stalled = store.stats[layer].stall_seconds
            out = fetch(layer, counts)
            with lock:  # reads landed for this fetch: earlier prefetches, and the misses it read itself
                for e in counts:
                    read = self._unused.pop((layer, e), None)
                    if read is not None:
                        self.needs.append((compute, read))
                if store.stats[layer].stall_seconds > stalled:
                    self._stalled += time.perf_counter() - start
            return out
        store._load, store.fetch = recorded_load, recorded_fetch
        return self

    def begin(self) -> None:
        """A request starts now (reads from before it that are still unused stay unused: none of its own)."""
        with self._lock:
            self._start, self._stalled, self.needs = time.perf_counter(), 0.0, []
            self._unused.clear()

    def end(self) -> list[list[float]]:
        """The request is over -> its reads as [compute seconds at first use, bytes], in order of use."""
        with self._lock:
            return sorted([c, b] for c, b in self.needs)
