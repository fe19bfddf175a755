"""The slow tier of the expert store: the checkpoint's own safetensors files, read by byte offset, checksummed,
and never left in the page cache.

An expert's pieces that sit back to back in one file (per-expert w1/w2/w3 tensors usually do) are one run, read
with one request, or, past PIPE_CHUNK, in chunks through the disk queue (read_queue.py), several in flight while
the reading thread checks and copies the one before, a fetch's misses ahead of prefetches. Reads bypass the page
cache (O_DIRECT): the disk writes into the reading thread's staging buffer (STAGING_BYTES, block-aligned), from where each piece's bytes
go into its running CRC-32C and are copied into the slot (or into a buffer in the file's dtype, converted into the
slot once checked: a bf16 file, fp32 slots). A cached read costs a core far more (page allocation, the kernel's
copy, dropping the pages again): on the 2-core host of docs/benchmarks.md, reads with a decode running beside
them went from ~1.0 to ~1.6 GB/s and the decode from 0.4x to 0.6x of its speed alone. O_DIRECT wants offsets,
lengths and memory aligned to the device's blocks, and safetensors offsets are not, so a read runs from the
block below the expert to the block above it (at most 8 KiB more). Where a filesystem refuses O_DIRECT (at open
or at the first read), that file is read through the page cache instead (POSIX_FADV_RANDOM, and
POSIX_FADV_DONTNEED on each read's range after it), through the same staging buffer.

Each piece's CRC-32C (the `crc32c` package: ~24 GB/s with the CPU's CRC instruction, against ~3.8 for zlib's
CRC-32 on one core here) is recorded on the first (streaming) read and checked on every later one, before the
store lets anyone compute with the slot: a mismatch is read again, then is an error naming the file and tensor.
`fault_hook` (tests only, never reachable over HTTP) sees each piece's bytes as they are read (per staging
buffer's worth), to damage them.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Callable

import crc32c
import numpy as np
import torch

from marserve.errors import CheckpointError
from marserve.experts.checkpoint_index import CheckpointIndex, Piece
from marserve.experts.read_queue import ReadQueue

logger = logging.getLogger(__name__)
# The kernel drops only whole page-cache folios inside a DONTNEED range, and keeps files in folios of up to
# 2 MiB (a PMD on x86-64): ranges are widened to 2 MiB boundaries. The neighbours' bytes are other experts, or
# weights the model has already copied.
_DROP_ALIGN = 2 << 20
# O_DIRECT alignment of offsets, lengths and buffers: a 4 KiB block suits 512-byte and 4 KiB sector devices alike.
BLOCK = 4096
USE_DIRECT_IO = hasattr(os, "O_DIRECT")  # tests turn it off to cover the page-cache path
# Each reading thread's staging buffer: reads larger than this (a 352 MB Mixtral-8x7B expert) go through it in
# chunks, so the memory outside the budget stays a few MiB per thread whatever the expert size; one 9.4 MB
# expert of the bench-shaped model is one read.
STAGING_BYTES = 16 << 20
# O_DIRECT runs longer than a chunk are read in chunks, up to PIPE_DEPTH of them in the disk queue's hands per
# reading thread, checked and copied in order as they land (read_queue.py). Measured on the 2-core host with
# `marserve bench reads` (docs/benchmarks.md, "Chunked reads"): one 9.4 MB expert 5.2-5.6 ms as one request, 4.4-4.6
# ms as 2 MiB chunks three deep.
PIPE_CHUNK = 2 << 20
PIPE_DEPTH = 3
DISK_QUEUE_WORKERS = 4  # reads in the disk's hands at once, all reading threads together


def contiguous_runs(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces grouped into runs that are contiguous in one file, in file order."""
    runs: list[list[Piece]] = []
    for p in sorted(pieces, key=lambda p: (str(p.path), p.offset)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.path == p.path and last.offset + last.nbytes == p.offset:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def block_span(start: int, end: int) -> tuple[int, int]:
    """The O_DIRECT request covering file bytes [start, end) -> (offset of the block below start, length to the
    block boundary at or above end)."""
    first = start // BLOCK * BLOCK
    return first, -(-(end - first) // BLOCK) * BLOCK


def aligned_buffer(nbytes: int) -> memoryview:
    """nbytes of memory starting on a block boundary, as O_DIRECT wants. A numpy array: numpy asks for huge pages
    on large arrays, and O_DIRECT reads into it ran 1.2-2.3x faster here than into an anonymous mmap
    (docs/benchmarks.md, "O_DIRECT reads")."""
    raw = np.empty(nbytes + BLOCK, dtype=np.uint8)
    skip = (-raw.ctypes.data) % BLOCK
    return memoryview(raw[skip:skip + nbytes])


def open_expert_file(path, direct: bool = True) -> tuple[int, bool]:
    """Open a checkpoint file for expert reads -> (fd, whether it reads with O_DIRECT): O_DIRECT when asked and
    the filesystem takes it, else a cached fd without readahead (it would only bring in bytes dropped unread)."""
    if direct and USE_DIRECT_IO:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            logger.info("%s: the filesystem refuses O_DIRECT; expert reads go through the page cache, "
                        "which is dropped after each read", path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd, False


def chunk_bytes() -> int:
    """The disk queue's chunk: PIPE_CHUNK, small enough that PIPE_DEPTH of them fit one staging buffer, in whole
    blocks."""
    return min(PIPE_CHUNK, STAGING_BYTES // PIPE_DEPTH) // BLOCK * BLOCK


def goes_through_queue(nbytes: int, direct: bool) -> bool:
    """Whether a run of nbytes goes through the disk queue: O_DIRECT, longer than a chunk, room for the chunks."""
    return direct and PIPE_DEPTH > 1 and nbytes > PIPE_CHUNK and chunk_bytes() >= 2 * BLOCK


def read_in_chunks(queue: ReadQueue, fd: int, staging: memoryview, pos: int, end: int, urgent: bool,
                   consume: Callable[[memoryview, int, int], None]) -> None:
    """File bytes [pos, end) of an O_DIRECT fd in block-aligned chunks (chunk_bytes()) through the disk queue,
    PIPE_DEPTH in flight, each in its own part of `staging` (room for PIPE_DEPTH chunks), handed to
    consume(bytes, start, stop) in file order while the next ones are read. EOFError(where the file ends) when it
    ends before `end`. Returns or raises only once no read still writes into `staging`."""
    chunk = chunk_bytes()
    starts = range(pos // BLOCK * BLOCK, end, chunk)  # chunk k: file bytes [starts[k], starts[k] + chunk)
    jobs = []

    def submit(k: int) -> None:
        at, length = block_span(starts[k], min(end, starts[k] + chunk))
        part = (k % PIPE_DEPTH) * chunk
        jobs.append(queue.submit(fd, staging[part:part + length], at, urgent))

    for k in range(min(PIPE_DEPTH, len(starts))):
        submit(k)
    try:
        for k, at in enumerate(starts):
            got = jobs[k].result()
            lo, hi = max(pos, at), min(end, at + chunk)
            if at + got < hi:
                raise EOFError(at + got)
            part = (k % PIPE_DEPTH) * chunk
            consume(staging[part + lo - at:part + hi - at], lo, hi)
            if k + PIPE_DEPTH < len(starts):
                submit(k + PIPE_DEPTH)
    finally:
        for job in jobs:  # no read may still write into the staging buffer once we return
            try:
                job.result()
            except BaseException:  # noqa: BLE001 - the first error is already on its way up
                pass


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a flat uint8 array (same memory)."""
    return t.view(torch.uint8).numpy().reshape(-1)


class SlowTier:
    def __init__(self, index: CheckpointIndex):
        self.index = index
        self.fault_hook: Callable[[Piece, memoryview], None] | None = None
        self.rereads = 0  # runs read again after a checksum mismatch (the server exports it)
        self._crc: dict[Piece, int] = {}
        self._files: dict = {}  # path -> (fd, direct)
        self._retired: list[int] = []  # O_DIRECT fds given up for a fallback, closed with the rest
        self._lock = threading.Lock()
        self._local = threading.local()  # each reader thread's staging buffer
        self.queue = ReadQueue(DISK_QUEUE_WORKERS)  # chunked O_DIRECT reads (misses before prefetches)

    def read_expert(self, layer: int, expert: int, rows_of: Callable[[Piece], torch.Tensor | None],
                    record: bool = False, urgent: bool = True) -> int:
        """Read one expert: each piece into rows_of(piece) (converted to its dtype after the read), or only
        checksummed when that is None -> bytes read. record: take the checksums (the first read) instead of
        checking them. urgent: someone waits for it (a miss); a prefetch's chunks give way to urgent ones."""
        moved = 0
        for run in contiguous_runs(self.index.pieces[layer][expert]):
            moved += self._read_run(run, [rows_of(p) for p in run], record, urgent)
        return moved

    def _read_run(self, run: list[Piece], dests: list[torch.Tensor | None], record: bool, urgent: bool) -> int:
        for attempt in (1, 2):
            crcs, staged = self._stream(run, dests, None if record else self.fault_hook, urgent)
            if record:
                self._crc.update(zip(run, crcs))
                break
            bad = [p for p, c in zip(run, crcs) if c != self._crc[p]]
            if not bad:
                break
            logger.warning("%s: expert tensor %s read back with a wrong checksum (attempt %d)", bad[0].path,
                           bad[0].tensor, attempt)
            if attempt == 1:
                with self._lock:
                    self.rereads += 1
        else:
            p = bad[0]
            raise CheckpointError(f"{p.path}: expert tensor {p.tensor} (bytes {p.offset}..{p.offset + p.nbytes}) "
                                  "read back twice with a checksum different from the one taken at load: the file "
                                  "changed or the disk returns bad data")
        for dest, buf in zip(dests, staged):
            if buf is not None:  # dtype conversion after the check (e.g. bf16 file, fp32 compute)
                dest.copy_(buf.view(dest.shape))
        return sum(p.nbytes for p in run)

    def _stream(self, run: list[Piece], dests: list[torch.Tensor | None], hook, urgent: bool = True
                ) -> tuple[list[int], list]:
        """Read a run chunk by chunk through this thread's staging buffer; each piece's bytes go into its running
        CRC-32C and to its destination (a buffer in the file's dtype where the dtype differs) -> (each piece's
        CRC-32C, those buffers or None). O_DIRECT runs longer than PIPE_CHUNK go through the disk queue, several
        chunks in flight (read_in_chunks)."""
        targets, staged = [], []
        for p, dest in zip(run, dests):
            buf = None
            if dest is not None and not (dest.dtype == p.dtype and dest.is_contiguous()):
                buf = torch.empty(p.nbytes // p.dtype.itemsize, dtype=p.dtype)
            staged.append(buf)
            targets.append(None if dest is None else _bytes_of(dest if buf is None else buf))
        crcs = [0] * len(run)

        def consume(data: memoryview, pos: int, upto: int) -> None:
            """The file's bytes [pos, upto) -> each piece's share into its CRC and its destination."""
            for i, p in enumerate(run):
                lo, hi = max(pos, p.offset), min(upto, p.offset + p.nbytes)
                if lo >= hi:
                    continue
                part = data[lo - pos:hi - pos]
                if hook is not None:
                    hook(p, part)
                crcs[i] = crc32c.crc32c(part, crcs[i])
                if targets[i] is not None:  # numpy copies without the GIL
                    np.copyto(targets[i][lo - p.offset:hi - p.offset], np.frombuffer(part, dtype=np.uint8))

        pos, end = run[0].offset, run[-1].offset + run[-1].nbytes
        fd, direct = self._file(run[0].path)
        if goes_through_queue(end - pos, direct):
            try:
                read_in_chunks(self.queue, fd, self._staging(), pos, end, urgent, consume)
                return crcs, staged
            except EOFError as e:
                self._truncated(run, e.args[0], end)
            except OSError as e:  # the filesystem took O_DIRECT at open but not these reads
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(run[0].path, e)
                crcs[:] = [0] * len(run)  # start over through the page cache
        while pos < end:
            data, upto = self._read_chunk(run, pos, end)  # the bytes [pos, upto) of the file
            consume(data, pos, upto)
            pos = upto
        return crcs, staged

    def _read_chunk(self, run: list[Piece], pos: int, end: int) -> tuple[memoryview, int]:
        """Read from `pos` towards `end`, at most one staging buffer's worth -> (the bytes, where they stop)."""
        path = run[0].path
        fd, direct = self._file(path)
        staging = self._staging()
        if direct:
            first, length = block_span(pos, end)  # O_DIRECT: from the block below pos to the one above the end
            length = min(len(staging), length)
            try:
                got = os.preadv(fd, [staging[:length]], first)
            except OSError as e:  # the filesystem took O_DIRECT at open but not these alignments
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(path, e)
                return self._read_chunk(run, pos, end)
            upto = min(end, first + length)
            if first + got < upto:
                self._truncated(run, first + got, end)
            return staging[pos - first:upto - first], upto
        length = min(len(staging), end - pos)
        got = os.preadv(fd, [staging[:length]], pos)
        drop = pos // _DROP_ALIGN * _DROP_ALIGN  # give the range back: the slow tier stays on disk
        os.posix_fadvise(fd, drop, -(-(pos + length - drop) // _DROP_ALIGN) * _DROP_ALIGN, os.POSIX_FADV_DONTNEED)
        if got < length:
            self._truncated(run, pos + max(got, 0), end)
        return staging[:length], pos + length

    @staticmethod
    def _truncated(run: list[Piece], reached: int, end: int):
        p = next((p for p in run if p.offset + p.nbytes > reached), run[-1])
        raise CheckpointError(f"{p.path}: truncated safetensors file (expert tensor {p.tensor} is cut short: the "
                              f"file ends at byte {reached}, the tensor at {p.offset + p.nbytes})")

    def _staging(self) -> memoryview:
        """This thread's block-aligned staging buffer (STAGING_BYTES, kept for its next reads)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = aligned_buffer(STAGING_BYTES)
        return buf

    def _file(self, path) -> tuple[int, bool]:
        """(fd, whether it reads with O_DIRECT) of one checkpoint file, opened once."""
        found = self._files.get(path)
        if found is None:
            with self._lock:
                found = self._files.get(path)
                if found is None:
                    found = self._files[path] = open_expert_file(path)
        return found

    def _fall_back(self, path, error: OSError) -> None:
        """Read `path` through the page cache from now on. The O_DIRECT fd stays open until close(): another reader
        may be in a read on it (and will fall back in turn)."""
        with self._lock:
            fd, direct = self._files[path]
            if not direct:
                return  # another reader fell back first
            logger.info("%s: O_DIRECT reads fail (%s); expert reads go through the page cache, dropped after each "
                        "read", path, error)
            self._retired.append(fd)
            self._files[path] = open_expert_file(path, direct=False)

    def close(self) -> None:
        self.queue.close()
        with self._lock:
            for fd in [fd for fd, _ in self._files.values()] + self._retired:
                os.close(fd)
            self._files.clear()
            self._retired.clear()

