"""`marserve bench reads`: the expert store's slow-tier read path, measured on a real checkpoint's experts.

The same random sequence of a model's experts is read through `SlowTier.read_expert` into destination slots like
the store's, once per read path (O_DIRECT into a staging buffer, or the page cache with DONTNEED after each read:
`slow_tier.USE_DIRECT_IO` set before the tier opens its files) and per number of reader threads, the model's
files dropped from the page cache before every run:
- alone: the reads' GB/s and the mean time of one expert's read (what a fetch's miss waits for);
- beside a decode stand-in (one torch thread running batch-1 expert FFNs over expert-shaped fp32 matrices, enough of
  them to exceed twice the last-level cache, so that like a decode it streams its weights from memory): the reads'
  GB/s and the stand-in's speed as a share of its speed alone, measured just before (the same moment's load).
Beside them: plain preadv of the same byte ranges, O_DIRECT where the filesystem allows it, with no checksum and no
copy (the disk's own rate under the same requests), and the checksums' own rate on one core (zlib.crc32, which the
tier used before, against crc32c.crc32c). Best of --repeats for every figure; prints the table, the load average,
the machine's limits, the command and the host's ISA, and writes the report as JSON with --json.

Legend: H=hidden size, I=expert intermediate size, S=destination slots (one per reader thread).
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numpy as np
import torch

from marserve import hugepages, progress
from marserve.errors import ConfigError
from marserve.experts import slow_tier
from marserve.experts.checkpoint_index import CheckpointIndex
from marserve.experts.read_queue import ReadQueue
from marserve.experts.slow_tier import (SlowTier, aligned_buffer, block_span, contiguous_runs, open_expert_file,
                                        read_in_chunks)

RAW, DIRECT, CACHED = "raw preadv", "direct", "page cache"
# Bytes of one run when --experts is not given (at least 48 experts): a run of a few MB (the shipped model's experts
# are 0.4 MB) lasts a few ms, too short for a rate beside a compute loop; ~0.4 s at the ~1 GB/s seen here.
AUTO_RUN_BYTES = 384e6


def expert_index(model_dir: Path):
    """(CheckpointIndex of the model's experts, its ModelConfig), from the safetensors headers and a model built on
    `meta` (no weight is read)."""
    from marserve.config import ModelConfig
    from marserve.loader import checkpoint_files
    from marserve.models import get_model_class
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = get_model_class(config.model_type)(config)
    return CheckpointIndex.build(model, checkpoint_files(model_dir)), config


def expert_sequence(index: CheckpointIndex, n: int, seed: int) -> list[tuple[int, int]]:
    """n (layer, expert) keys in random order: each expert once before any repeats (shuffled rounds)."""
    keys = [(layer, e) for layer in index.layer_ids for e in range(len(index.pieces[layer]))]
    rng, out = random.Random(seed), []
    while len(out) < n:
        rng.shuffle(keys)
        out += keys[:n - len(out)]
    return out


def direct_io_works(paths) -> bool:
    """Whether every file opens with O_DIRECT (else the slow tier falls back to the page cache for it)."""
    for path in paths:
        fd, direct = open_expert_file(path)
        os.close(fd)
        if not direct:
            return False
    return True


class Slots:
    """Destination slots like the store's pool: w13 [S, 2I, H] and w2 [S, H, I] in the compute dtype. Each reader
    thread writes only its own slot (bind()), as the store never gives one slot to two reads at once."""

    def __init__(self, num_slots: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        H, I = hidden_size, intermediate_size
        self.w13 = hugepages.empty((num_slots, 2 * I, H), dtype)  # [S, 2I, H]
        self.w2 = hugepages.empty((num_slots, H, I), dtype)  # [S, H, I]
        self._local = threading.local()

    def bind(self, slot: int) -> None:
        """The calling thread's reads go to `slot` (threads never bound use slot 0)."""
        self._local.slot = slot

    def rows(self):
        """piece -> the rows it fills in the calling thread's slot."""
        slot = getattr(self._local, "slot", 0)
        return lambda p: (self.w13 if p.target == "w13" else self.w2)[slot, p.row0:p.row0 + p.rows]


class RawReader:
    """The slow tier's own requests for each expert's runs, O_DIRECT where the filesystem allows it, with no checksum
    and no copy into a slot: one block-aligned preadv per run, or, for runs the tier reads through its disk queue,
    the same chunks through a queue of the same depth. read_expert has the tier's signature, so the same runner
    drives it."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._fds: dict = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.queue = ReadQueue(slow_tier.DISK_QUEUE_WORKERS)

    def read_expert(self, layer: int, expert: int, rows_of=None, record: bool = False, urgent: bool = True) -> int:
        moved = 0
        for run in contiguous_runs(self.index.pieces[layer][expert]):
            start, total = run[0].offset, sum(p.nbytes for p in run)
            first, length = block_span(start, start + total)
            fd, direct = self._fd(run[0].path)
            if slow_tier.goes_through_queue(total, direct):
                buf = self._buffer(slow_tier.chunk_bytes() * slow_tier.PIPE_DEPTH)
                read_in_chunks(self.queue, fd, buf, start, start + total, True, lambda data, lo, hi: None)
            else:
                os.preadv(fd, [self._buffer(length)[:length]], first)
            moved += total
        return moved

    def _buffer(self, nbytes: int) -> memoryview:
        """This thread's block-aligned buffer, as large as the largest run so far (one request per run)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = aligned_buffer(nbytes)
        return buf

    def _fd(self, path) -> tuple[int, bool]:
        """The file opened as the tier opens it (O_DIRECT where the filesystem takes it; else a cold cached read:
        the drop ran before) -> (fd, whether O_DIRECT)."""
        with self._lock:
            if path not in self._fds:
                self._fds[path] = open_expert_file(path)
            return self._fds[path]

    def close(self) -> None:
        self.queue.close()
        for fd, _ in self._fds.values():
            os.close(fd)


class DecodeStandIn:
    """One torch thread of batch-1 expert FFNs (x @ w13^T, SiLU(gate) * up, @ w2^T) over fp32 expert-shaped
    matrices cycled through, enough of them (up to 256) to exceed twice the last-level cache. fp32 whatever the
    checkpoint: torch's bf16 matvec has no fast path on most CPUs and would be compute-bound, unlike a decode."""

    def __init__(self, hidden_size: int, intermediate_size: int, llc_bytes: int):
        H, I = hidden_size, intermediate_size
        n = min(256, max(2, math.ceil(2 * llc_bytes / (3 * H * I * 4))))
        g = torch.Generator().manual_seed(0)
        self.w13 = [torch.randn(2 * I, H, generator=g) for _ in range(n)]  # [2I, H] each
        self.w2 = [torch.randn(H, I, generator=g) for _ in range(n)]  # [H, I] each
        self.x = torch.randn(1, H, generator=g)  # [1, H]
        self.I = I

    def ffn(self, i: int) -> None:
        w13, w2 = self.w13[i], self.w2[i]
        h = self.x @ w13.T  # [1, 2I]
        torch.nn.functional.silu(h[:, :self.I]).mul_(h[:, self.I:]) @ w2.T  # [1, H]

    def rate(self, stop) -> float:
        """Expert FFNs per second, cycling through the matrices until stop() (checked before each FFN, so the
        count ends within one FFN of the reads it runs beside)."""
        done, t0 = 0, time.perf_counter()
        while done == 0 or not stop():
            self.ffn(done % len(self.w13))
            done += 1
        return done / (time.perf_counter() - t0)

    def rate_alone(self, seconds: float) -> float:
        t0 = time.perf_counter()
        return self.rate(lambda: time.perf_counter() - t0 >= seconds)


def read_all(pool: ThreadPoolExecutor, reader, keys, slots: Slots) -> tuple[float, float, int]:
    """Read every key on the pool's threads, each into its thread's slot -> (seconds, mean seconds of one read,
    bytes)."""
    def one(key):
        t0 = time.perf_counter()
        moved = reader.read_expert(*key, slots.rows())
        return time.perf_counter() - t0, moved

    t0 = time.perf_counter()
    done = list(pool.map(one, keys))
    return time.perf_counter() - t0, sum(d for d, _ in done) / len(done), sum(m for _, m in done)


def read_beside(pool, reader, keys, slots: Slots, stand_in: DecodeStandIn) -> tuple[tuple[float, float, int], float]:
    """read_all on its own thread while this thread runs the stand-in -> (read_all's answer, stand-in's rate)."""
    out: dict = {}

    def reads():
        try:
            out["reads"] = read_all(pool, reader, keys, slots)
        except BaseException as e:  # re-raised on the caller's thread
            out["error"] = e

    th = threading.Thread(target=reads, name="bench-reads")
    th.start()
    rate = stand_in.rate(lambda: not th.is_alive())
    th.join()
    if "error" in out:
        raise out["error"]
    return out["reads"], rate


def reader_pool(threads: int, reader, key, slots: Slots) -> ThreadPoolExecutor:
    """A pool of `threads` reader threads, each bound to its own slot and having read once (its staging buffer is
    allocated and touched before the timed runs, as in the store's long-lived pools)."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-read")
    barrier = threading.Barrier(threads, timeout=120)  # each warm-up task holds its thread: all threads get one

    def warm(slot):
        slots.bind(slot)
        reader.read_expert(*key, slots.rows())
        barrier.wait()

    list(pool.map(warm, range(threads)))
    return pool


def checksum_rates(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of zlib.crc32 and crc32c.crc32c over one expert-sized buffer on this thread (the buffer is hot in
    the caches where it fits; best of repeats)."""
    buf = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    calls = max(1, (64 << 20) // nbytes)  # ~64 MB per timing
    rates = {}
    for name, fn in (("zlib.crc32", zlib.crc32), ("crc32c.crc32c", crc32c.crc32c)):
        fn(buf)
        best = float("inf")
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(buf)
            best = min(best, time.perf_counter() - t0)
        rates[name] = calls * nbytes / best / 1e9
    return rates


def open_tier(index: CheckpointIndex, direct: bool, keys, slots: Slots) -> SlowTier:
    """A SlowTier whose files are opened with (or without) O_DIRECT, with the checksums of `keys` recorded."""
    before = slow_tier.USE_DIRECT_IO
    slow_tier.USE_DIRECT_IO = direct and before  # read when the tier opens a file: the recording pass opens them
    try:
        tier = SlowTier(index)
        for key in dict.fromkeys(keys):
            tier.read_expert(*key, slots.rows(), record=True)
    finally:
        slow_tier.USE_DIRECT_IO = before
    return tier


def measure_reads(model_dir: Path, index: CheckpointIndex, slots: Slots, keys, thread_counts: list[int],
                  repeats: int, stand_in: DecodeStandIn, alone_s: float) -> list[dict]:
    """Every (path, readers) run, best of repeats -> one row each (RAW rows have no run beside the stand-in)."""
    from marserve.bench.expert_live import drop_page_cache
    drop = lambda: drop_page_cache(model_dir, global_drop=False)  # noqa: E731 (the model's files only)
    readers = {RAW: RawReader(index)}
    for path, direct in ((DIRECT, True), (CACHED, False)):
        drop()
        readers[path] = open_tier(index, direct, keys, slots)
    runs = [(path, t) for t in thread_counts for path in readers]
    pools = {run: reader_pool(run[1], readers[run[0]], keys[0], slots) for run in runs}
    best: dict = {run: {} for run in runs}

    def keep(run, name, value, better=max):
        best[run][name] = better(best[run].get(name, value), value)

    with progress.bar(total=repeats * len(runs), desc="bench reads", unit="run") as shown:
        for _ in range(repeats):  # paths interleaved within each repeat: the shared host's load drifts
            for run in runs:
                path, threads = run
                drop()
                seconds, latency, moved = read_all(pools[run], readers[path], keys, slots)
                keep(run, "alone_gbs", moved / seconds / 1e9)
                keep(run, "ms_per_read", 1e3 * latency, min)
                if path != RAW:
                    alone = stand_in.rate_alone(alone_s)
                    drop()
                    (seconds, _, moved), rate = read_beside(pools[run], readers[path], keys, slots, stand_in)
                    keep(run, "beside_gbs", moved / seconds / 1e9)
                    keep(run, "decode_share", rate / alone)
                    keep(run, "decode_beside_per_s", rate)
                    keep(run, "decode_alone_per_s", alone)
                shown.update()
    for pool in pools.values():
        pool.shutdown()
    for reader in readers.values():
        reader.close()
    # the conservative share: the best speed beside the reads against the best alone of the whole run
    alone_best = max((b["decode_alone_per_s"] for b in best.values() if "decode_alone_per_s" in b), default=0.0)
    for b in best.values():
        if "decode_beside_per_s" in b:
            b["decode_share_vs_best"] = b["decode_beside_per_s"] / alone_best
    return [{"path": path, "readers": threads, **best[(path, threads)]} for path, threads in runs]


def print_table(rows: list[dict]) -> None:
    head = (f"{'path':<11} {'readers':>7} {'alone GB/s':>10} {'ms/read':>8} {'beside decode GB/s':>18} "
            f"{'decode x alone':>14} {'x best alone':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        beside = (f"{r['beside_gbs']:18.2f} {r['decode_share']:14.2f} {r['decode_share_vs_best']:12.2f}"
                  if "beside_gbs" in r else f"{'-':>18} {'-':>14} {'-':>12}")
        print(f"{r['path']:<11} {r['readers']:7d} {r['alone_gbs']:10.2f} {r['ms_per_read']:8.2f} {beside}")


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--threads {text!r}: give reader thread counts of 1 or more, comma-separated (e.g. 1,2,4)")
    return counts


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run(args) -> int:
    from marserve.bench.machine_limits import last_level_cache_bytes, measure
    from marserve.bench.throughput import _model_dir
    from marserve.loader import resolve_dtype
    from marserve_kernels import cpu_features
    command = "marserve bench reads " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    model_dir = _model_dir(args.model)
    thread_counts = _thread_counts(args.threads)
    if (args.experts is not None and args.experts < 1) or args.repeats < 1:
        raise ConfigError(f"--experts ({args.experts}) and --repeats ({args.repeats}) must be at least 1")
    index, config = expert_index(model_dir)
    files = sorted({p.path for per in index.pieces.values() for ps in per for p in ps})
    dtype = resolve_dtype(args.dtype, config)
    one = index.file_bytes(index.layer_ids[0], 0)  # every expert has the same bytes
    keys = expert_sequence(index, args.experts or max(48, math.ceil(AUTO_RUN_BYTES / one)), args.seed)
    expert_mb = one / 1e6
    load_before = _load()
    with progress.stage("bench reads: measuring the machine's limits"):
        limits = measure(repeats=2 if args.quick else 5, buffer_mb=64 if args.quick else 512,
                         matmul_n=512 if args.quick else 2048)
    print(f"machine: {limits.describe()}", flush=True)
    torch.set_num_threads(1)  # the stand-in's one thread; the readers take the other core(s)
    H, I = config.hidden_size, config.moe_intermediate_size
    slots, stand_in = Slots(max(thread_counts), H, I, dtype), DecodeStandIn(H, I, last_level_cache_bytes())
    sums = checksum_rates(index.file_bytes(*keys[0]), args.repeats)
    direct_ok = direct_io_works(files)
    print(f"model: {model_dir} ({len(files)} file(s), experts of {expert_mb:.2f} MB on disk, slots in "
          f"{str(dtype).replace('torch.', '')}); {len(keys)} random experts per run ({len(keys) * expert_mb:.0f} MB), "
          f"the same sequence for every run; the model's files dropped from the page cache (posix_fadvise) before "
          f"each run; O_DIRECT {'works' if direct_ok else 'REFUSED by the filesystem: the direct rows read cached'}")
    print(f"decode stand-in: 1 torch thread, batch-1 fp32 expert FFNs (H {H}, I {I}) over {len(stand_in.w13)} "
          f"experts' matrices ({len(stand_in.w13) * 3 * H * I * 4 / 1e6:.0f} MB)", flush=True)
    rows = measure_reads(model_dir, index, slots, keys, thread_counts, args.repeats, stand_in,
                         0.1 if args.quick else 0.5)
    load_after = _load()
    print_table(rows)
    raw = max((r for r in rows if r["path"] == RAW), key=lambda r: r["alone_gbs"])
    print(f"({RAW} = the same block-aligned requests, {'O_DIRECT' if direct_ok else 'cached'}, no checksum, "
          f"no copy; {DIRECT} = SlowTier with O_DIRECT + CRC-32C + copy into the slot; {CACHED} = SlowTier through "
          f"the page cache + CRC-32C + DONTNEED; ms/read = mean time of one expert's read; decode x alone = the "
          f"stand-in's speed beside the reads / alone just before (noisy on a shared host: can pass 1); x best "
          f"alone = its best speed beside the reads / its best alone in the whole run (conservative); best of "
          f"{args.repeats} each)")
    print(f"raw disk: best {raw['alone_gbs']:.2f} GB/s ({raw['readers']} reader(s))")
    print("checksums on one core, one expert's bytes: " +
          ", ".join(f"{name} {gbs:.1f} GB/s" for name, gbs in sums.items()))
    print(f"load average (1/5/15 min): {load_before} before, {load_after} after")
    print(f"command: {command}")
    print(f"host: {cpu_features.describe()}")
    if args.json:
        report = {"command": command, "isa": cpu_features.describe(), "limits": limits.__dict__,
                  "model": str(model_dir), "expert_bytes": index.file_bytes(*keys[0]), "experts_per_run": len(keys),
                  "direct_io": direct_ok, "rows": rows, "raw_best_gbs": raw["alone_gbs"], "checksums_gbs": sums,
                  "load_average": {"before": load_before, "after": load_after}}
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0
