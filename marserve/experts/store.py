"""The tiered expert store: a bounded pool of expert slots in fast memory (shared by every MoE layer) over the
checkpoint's own safetensors files (the slow tier), read by byte offset on demand or ahead of time.

Honest budget: only the pool holds expert weights. The slow tier (slow_tier.py) reads past the page cache
(O_DIRECT through a 16 MiB staging buffer per reading thread into the slot; where a filesystem refuses O_DIRECT, a
cached read dropped from the cache right after); nothing maps the expert bytes. Checksums are taken at start,
while streaming every expert once to fill the initial resident set, and checked on every later read before the
slot is handed to anyone.

The store also measures what the prefetcher weighs a guess against: a moving average of one expert's read and of
the share of time reads are in flight (sampled at each fetch); their product is what a wrong guess costs.

On a CUDA device the pool lives in device memory and is filled from host memory on the reading threads' side
streams; where host RAM holds every expert, the slow tier is host RAM, filled once at start (device_tier.py).

Concurrency: one lock guards the slot tables; reads run outside it (the read, the checksum and the copy into the
slot release the GIL).
A fetch pins the slots it returns until the same thread's next fetch (the block computes with them in between),
so at most one layer's experts per computing thread are pinned. Prefetches run on a small thread pool; a fetch of
an expert still being read waits for that read instead of reading twice.

Legend: S=slots, I=expert intermediate size, H=hidden size, E=experts per layer.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from marserve import hugepages, progress
from marserve.experts.checkpoint_index import CheckpointIndex
from marserve.experts.device_tier import DeviceTransfer, HostExperts
from marserve.experts.policies import EvictionPolicy, Key
from marserve.experts.provider import ExpertCacheStats
from marserve.experts.slow_tier import SlowTier

logger = logging.getLogger(__name__)


def piece_rows(w13: torch.Tensor, w2: torch.Tensor):
    """One expert's buffers w13 [2I,H], w2 [H,I] -> piece -> the rows of them it fills."""
    return lambda p: (w13 if p.target == "w13" else w2)[p.row0:p.row0 + p.rows]


class ExpertStore:
    def __init__(self, index: CheckpointIndex, num_slots: int, min_slots: int, policy: EvictionPolicy,
                 hidden_size: int, intermediate_size: int, dtype: torch.dtype, read_threads: int = 2,
                 device: str | torch.device = "cpu", host_tier: bool = False, staged: bool | None = None):
        """device: where the slots live; host_tier: keep every expert in host RAM (read from the checkpoint once,
        at start) and fill slots from there; staged: read into host buffers and copy into the slots (None: where
        the slots are not in host RAM, or with a host tier; True on the CPU: tests of the device path)."""
        H, I = hidden_size, intermediate_size
        self.index, self.policy, self.dtype = index, policy, dtype
        self.num_slots, self.min_slots = num_slots, min_slots
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.w13 = hugepages.empty((num_slots, 2 * I, H), dtype) if on_cpu else \
            torch.empty((num_slots, 2 * I, H), dtype=dtype, device=self.device)  # [S, 2I, H]
        self.w2 = hugepages.empty((num_slots, H, I), dtype) if on_cpu else \
            torch.empty((num_slots, H, I), dtype=dtype, device=self.device)  # [S, H, I]
        if staged is None:
            staged = not on_cpu or host_tier
        self.transfer = DeviceTransfer(self.w13, self.w2) if staged or host_tier else None
        self.host = HostExperts(index.keys, (2 * I, H), (H, I), dtype, pinned=self.device.type == "cuda") \
            if host_tier else None
        self.stats = {layer: ExpertCacheStats(layer) for layer in index.layer_ids}
        self.slow = SlowTier(index)
        self._cond = threading.Condition()
        self._slot_key: list[Key | None] = [None] * num_slots
        self._slot_of: dict[Key, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._loading: set[int] = set()  # slots whose bytes are being read
        self._pins = [0] * num_slots
        self._hot: set[int] = set()  # pinned for good (mar's hottest experts)
        self._active: dict[int, list[int]] = {}  # thread id -> slots pinned by its last fetch
        self._prefetched: set[Key] = set()  # read ahead and not yet used
        self._fetches_waiting = 0  # prefetches stand back while a fetch waits for a slot
        self.read_seconds = 0.0  # moving average of one expert's read
        self.busy_share = 0.0  # moving average of the share of time some read is in flight (sampled per fetch)
        self._busy_total, self._busy_since = 0.0, 0.0  # seconds with reads in flight; when the current spell began
        self._sampled = (0.0, 0.0)  # (busy seconds, time) at the last fetch
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="expert-read")
        self._miss_pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="expert-miss")

    # ---- start: checksums and the initial resident set ------------------------------------------------

    def start(self) -> None:
        """Stream every expert's bytes once: record each piece's CRC-32, and keep the experts the policy prefers
        (usage prior) in the pool until it is full; the hottest are pinned for good when the policy says so."""
        keys = self.index.keys
        keep = self.policy.by_preference(keys)
        initial = keep[:self.num_slots]
        hot = set(keep[:self.policy.num_pinned(self.num_slots, self.min_slots)])
        initial_set = set(initial)
        with progress.bar(total=len(keys), desc="indexing experts", unit="expert") as shown:
            for key in keys:
                slot = None
                if key in initial_set:
                    slot = self._free.pop()
                    self._slot_key[slot], self._slot_of[key] = key, slot
                    self.policy.on_insert(key)
                    if key in hot:
                        self._hot.add(slot)
                if self.host is not None:  # the host tier keeps every expert; the initial set goes up from it
                    self.slow.read_expert(*key, piece_rows(*self.host.rows(key)), record=True)
                    if slot is not None:
                        self.transfer.upload(slot, *self.host.rows(key))
                elif self.transfer is not None and slot is not None:
                    self.slow.read_expert(*key, piece_rows(*self.transfer.staging()), record=True)
                    self.transfer.upload(slot, *self.transfer.staging())
                else:
                    self.slow.read_expert(*key, self._rows(slot), record=True)
                shown.update()

    # ---- the two calls the providers make ----------------------------------------------------------

    def fetch(self, layer: int, counts: dict[int, int]) -> dict[int, int]:
        """Make every expert in `counts` (expert -> routing decisions) resident, pin them until this thread's next
        fetch -> expert -> slot. Misses are read here, synchronously; the time waited is stall time."""
        start = time.perf_counter()
        stats = self.stats[layer]
        reads: list[tuple[Key, int]] = []
        waits: list[tuple[Key, int]] = []
        out: dict[int, int] = {}
        me = threading.get_ident()
        with self._cond:
            self._sample_busy(start)
            self._unpin(self._active.pop(me, ()))
            self.policy.advance(layer)
            pinned = self._active[me] = []
            for e, n in counts.items():
                key = (layer, e)
                stats.lookups += n
                slot = self._slot_of.get(key)
                if slot is None:
                    slot = self._claim(wait=True)
                    self._occupy(slot, key)
                    reads.append((key, slot))
                    stats.misses += n
                else:
                    stats.hits += n
                    if slot in self._loading:
                        waits.append((key, slot))
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        stats.prefetch_hits += 1
                self._pins[slot] += 1
                pinned.append(slot)
                out[e] = slot
                self.policy.on_access(key, n)
        self._read_misses(reads)
        for key, slot in waits:
            out[key[1]] = self._wait_for(key, slot, pinned)
        if reads or waits:
            stats.stall_seconds += time.perf_counter() - start
        return out

    def _read_misses(self, reads: list[tuple[Key, int]]) -> None:
        """A fetch's misses, read side by side: the first on this thread, the others on the miss readers (a disk
        serves several reads at once faster than one after another, and they must not queue behind prefetches).
        Every read has landed or given its slot back when this returns; the first error is raised."""
        if not reads:
            return
        others = [self._miss_pool.submit(self._load, key, slot, False) for key, slot in reads[1:]]
        error = None
        try:
            self._load(*reads[0], prefetched=False)
        except BaseException as e:
            error = e
        for done in others:
            try:
                done.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Start reading these experts on the background threads; resident or in-flight ones are skipped, and so
        is the rest when no slot can be freed without waiting -> how many were skipped that way."""
        with self._cond:
            for n, e in enumerate(experts):
                key = (layer, e)
                self.policy.on_predict(key)
                if key in self._slot_of:
                    continue
                if self._fetches_waiting:
                    return len(experts) - n
                slot = self._claim(wait=False, incoming=key)
                if slot is None:
                    return len(experts) - n
                self._occupy(slot, key)
                self._prefetched.add(key)
                self.stats[layer].prefetches += 1
                self._pool.submit(self._load, key, slot, True)
        return 0

    @property
    def reads_in_flight(self) -> int:
        return len(self._loading)

    def expect(self, layer: int, uses: dict[int, list[int]]) -> None:
        """The routing lookup's forecast for one layer (expert -> fetches from now it is used at; {}: none), which
        eviction follows while it lasts (EvictionPolicy.victim_for)."""
        with self._cond:
            self.policy.expect(layer, uses)

    # ---- slots -----------------------------------------------------------------------------------------

    def _claim(self, wait: bool, incoming: Key | None = None) -> int | None:
        """A free slot, or the policy's victim among unpinned resident ones (lock held). With wait (a fetch), waits
        for reads in flight to finish when every slot is pinned or loading; without (a prefetch of `incoming`),
        None instead, and None where the victim is itself a prefetched expert not used yet, or one the forecast
        wants before `incoming`."""
        if wait:
            self._fetches_waiting += 1
        try:
            while True:
                if self._free:
                    return self._free.pop()
                candidates = [k for s, k in enumerate(self._slot_key)
                              if k is not None and not self._pins[s] and s not in self._loading and s not in self._hot]
                if candidates:
                    key = self.policy.victim_for(candidates, None if wait else incoming)
                    if key is None or (not wait and key in self._prefetched):
                        return None  # a guess does not displace an earlier guess still unused (nearer its layer)
                    slot = self._slot_of.pop(key)
                    self._slot_key[slot] = None
                    self._prefetched.discard(key)
                    self.policy.on_evict(key)
                    return slot
                if not wait:
                    return None
                if not self._loading:
                    raise RuntimeError(f"expert store: all {self.num_slots} slots are pinned (more experts in use "
                                       "at once than the budget holds)")
                self._cond.wait()
        finally:
            if wait:
                self._fetches_waiting -= 1

    def _occupy(self, slot: int, key: Key) -> None:
        self._slot_key[slot], self._slot_of[key] = key, slot
        if not self._loading:
            self._busy_since = time.perf_counter()
        self._loading.add(slot)
        self.policy.on_insert(key)

    def _wait_for(self, key: Key, slot: int, pinned: list[int]) -> int:
        """Wait until key's read (started by another thread into `slot`, pinned by us) lands -> its slot; reads it
        here if that read failed (and gave the slot back)."""
        with self._cond:
            while True:
                if self._slot_of.get(key) == slot and slot not in self._loading:
                    return slot
                if self._slot_of.get(key) != slot:  # the other read failed: unpin its slot, read it ourselves
                    self._pins[slot] -= 1
                    pinned.remove(slot)
                    slot = self._claim(wait=True)
                    self._occupy(slot, key)
                    self._pins[slot] += 1
                    pinned.append(slot)
                    break
                self._cond.wait()
        self._load(key, slot, prefetched=False)
        return slot

    def _load(self, key: Key, slot: int, prefetched: bool) -> None:
        """Read one expert into its (claimed, loading) slot; on failure give the slot back and raise (a prefetch
        only logs: the fetch that needs the expert reads it again)."""
        start = time.perf_counter()
        try:
            moved = self._move(key, slot, prefetched)
        except BaseException as e:
            self._give_back(key, slot)
            if prefetched:
                logger.warning("prefetching expert %d of layer %d failed: %s", key[1], key[0], e)
                return
            raise
        took = time.perf_counter() - start
        with self._cond:
            self._settle(slot)
            self.stats[key[0]].bytes_moved += moved
            self.read_seconds += (took - self.read_seconds) / 16 if self.read_seconds else took
            self._cond.notify_all()

    def _move(self, key: Key, slot: int, prefetched: bool) -> int:
        """key's bytes into `slot`: from the host tier, or read from the checkpoint (into the slot itself, or through
        this thread's staging buffers) -> bytes moved."""
        if self.host is not None:
            rows = self.host.rows(key)
            self.transfer.upload(slot, *rows)
            return sum(t.numel() * t.element_size() for t in rows)
        if self.transfer is not None:
            moved = self.slow.read_expert(*key, piece_rows(*self.transfer.staging()), urgent=not prefetched)
            self.transfer.upload(slot, *self.transfer.staging())
            return moved
        return self.slow.read_expert(*key, self._rows(slot), urgent=not prefetched)

    def _settle(self, slot: int) -> None:
        """slot's read is over, landed or not (lock held)."""
        self._loading.discard(slot)
        if not self._loading:
            self._busy_total += time.perf_counter() - self._busy_since

    def _sample_busy(self, now: float) -> None:
        """Fold the share of time reads were in flight since the last fetch into busy_share (lock held)."""
        busy = self._busy_total + (now - self._busy_since if self._loading else 0.0)
        last_busy, last = self._sampled
        self._sampled = (busy, now)
        if last and now > last:
            share = min(1.0, (busy - last_busy) / (now - last))
            self.busy_share += (share - self.busy_share) / 64

    def wrong_guess_seconds(self) -> float:
        """What a wrong prefetch costs the reads that follow: one read, as often as reads are in flight to queue
        behind it (a disk idle most of the time serves a wasted read for free)."""
        return self.read_seconds * self.busy_share

    def _give_back(self, key: Key, slot: int) -> None:
        """A read that will not land: the slot is free again (pins stay counted with their holders)."""
        with self._cond:
            self._settle(slot)
            if self._slot_of.get(key) == slot:
                del self._slot_of[key]
                self._slot_key[slot] = None
                self._free.append(slot)
                self.policy.on_evict(key)
            self._prefetched.discard(key)
            self._cond.notify_all()

    def _rows(self, slot: int | None):
        """piece -> the rows of `slot` it fills (None: no slot, checksum only)."""
        if slot is None:
            return lambda piece: None
        return piece_rows(self.w13[slot], self.w2[slot])

    def _unpin(self, slots) -> None:
        """A forward pass lets go of these slots (lock held); on a device, an upload into one of them waits for the
        kernels already queued on it."""
        for s in slots:
            self._pins[s] -= 1
        if self.transfer is not None:
            self.transfer.release(list(slots))

    def end_pass(self) -> None:
        """The calling thread's forward pass is over: unpin the experts of its last fetch (the engine calls this
        after each step, so that a thread that stops generating holds no slots another thread needs)."""
        with self._cond:
            self._unpin(self._active.pop(threading.get_ident(), ()))
            self._cond.notify_all()

    def in_use(self) -> tuple[int, int]:
        """(reads in flight, slots pinned by a forward pass) -> both 0 once nothing runs and no prefetch is
        pending; the hottest experts kept for good are not counted (they are never released)."""
        with self._cond:
            return len(self._loading), sum(1 for n in self._pins if n)

    def resident_keys(self) -> set[Key]:
        with self._cond:
            return {k for s, k in enumerate(self._slot_key) if k is not None and s not in self._loading}

    @property
    def fault_hook(self):
        """Tests only: called as hook(piece, bytes: memoryview) after each checked read (see slow_tier.py)."""
        return self.slow.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook) -> None:
        self.slow.fault_hook = hook

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._miss_pool.shutdown(wait=True)
        self.slow.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
