"""The slow tier of the expert store: the checkpoint's own safetensors files, read by byte offset, checksummed,
and never left in the page cache.

An expert's pieces that sit back to back in one file (per-expert w1/w2/w3 tensors usually do) are one run, read
with one request. Reads bypass the page cache (O_DIRECT): the bytes go from the disk into a reader's staging
buffer, are checked there, and only then copied (or converted, e.g. bf16 file -> fp32 slots) into the slot. A
cached read costs a core far more (page allocation, the kernel's copy, dropping the pages again): on the 2-core
host of docs/benchmarks.md, reads with a decode running beside them went from ~1.0 to ~1.6 GB/s and the decode from
0.4x to 0.6x of its speed alone. O_DIRECT wants offsets, lengths and memory aligned to the device's blocks, and
safetensors offsets are not, so a run is read from the aligned block below it to the one above (at most 8 KiB
more). Where a filesystem refuses O_DIRECT, that file is read through the page cache instead (POSIX_FADV_RANDOM,
then POSIX_FADV_DONTNEED on each run's range after the read), straight into the slot.

Each piece's CRC-32C (the `crc32c` package: ~24 GB/s with the CPU's CRC instruction, against ~3.8 for zlib's
CRC-32 on one core here) is recorded on the first (streaming) read and checked on every later one: a mismatch is
read again, then is an error naming the file and tensor. `fault_hook` (tests only, never reachable over HTTP) sees
each piece's bytes after a checked read, to damage them.
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

logger = logging.getLogger(__name__)
# The kernel drops only whole page-cache folios inside a DONTNEED range, and keeps files in folios of up to
# 2 MiB (a PMD on x86-64): ranges are widened to 2 MiB boundaries. The neighbours' bytes are other experts, or
# weights the model has already copied.
_DROP_ALIGN = 2 << 20
# O_DIRECT alignment of offsets, lengths and buffers: a 4 KiB block suits 512-byte and 4 KiB sector devices alike.
_BLOCK = 4096
USE_DIRECT_IO = hasattr(os, "O_DIRECT")  # tests turn it off to cover the page-cache path


def _runs(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces grouped into runs that are contiguous in one file, in file order."""
    runs: list[list[Piece]] = []
    for p in sorted(pieces, key=lambda p: (str(p.path), p.offset)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.path == p.path and last.offset + last.nbytes == p.offset:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


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
        self._lock = threading.Lock()
        self._local = threading.local()  # each reader thread's staging buffer

    def read_expert(self, layer: int, expert: int, rows_of: Callable[[Piece], torch.Tensor | None],
                    record: bool = False) -> int:
        """Read one expert: each piece into rows_of(piece) (converted to its dtype after the read), or only
        checksummed when that is None -> bytes read. record: take the checksums (the first read) instead of
        checking them."""
        moved = 0
        for run in _runs(self.index.pieces[layer][expert]):
            moved += self._read_run(run, [rows_of(p) for p in run], record)
        return moved

    def _read_run(self, run: list[Piece], dests: list[torch.Tensor | None], record: bool) -> int:
        start, total = run[0].offset, sum(p.nbytes for p in run)
        for attempt in (1, 2):
            views, in_place = self._read(run, dests, start, total)
            if record:
                for p, v in zip(run, views):
                    self._crc[p] = crc32c.crc32c(v)
                break
            if self.fault_hook is not None:
                for p, v in zip(run, views):
                    self.fault_hook(p, v)
            bad = [p for p, v in zip(run, views) if crc32c.crc32c(v) != self._crc[p]]
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
        for p, dest, v, landed in zip(run, dests, views, in_place):
            if dest is None or landed:
                continue  # checksum only, or the page-cache path read straight into the slot
            if dest.dtype == p.dtype and dest.is_contiguous():
                np.copyto(_bytes_of(dest), np.frombuffer(v, dtype=np.uint8))  # numpy copies without the GIL
            else:  # dtype conversion after the read (e.g. bf16 file, fp32 compute)
                dest.copy_(torch.frombuffer(v, dtype=p.dtype).view(dest.shape))
        return total

    def _read(self, run: list[Piece], dests: list[torch.Tensor | None], start: int, total: int
              ) -> tuple[list[memoryview], list[bool]]:
        """Read one run -> (each piece's bytes, whether they already are in the piece's destination)."""
        fd, direct = self._file(run[0].path)
        if direct:
            try:
                return self._read_direct(fd, run, start, total), [False] * len(run)
            except OSError as e:  # the filesystem took O_DIRECT at open but not these alignments
                if e.errno != errno.EINVAL:
                    raise
                fd = self._fall_back(run[0].path, e)
        return self._read_cached(fd, run, dests, start, total)

    def _read_direct(self, fd: int, run: list[Piece], start: int, total: int) -> list[memoryview]:
        """One O_DIRECT read of the blocks covering [start, start + total) -> each piece's bytes (in staging)."""
        first = start // _BLOCK * _BLOCK
        length = -(-(start + total - first) // _BLOCK) * _BLOCK
        staging = self._staging(length)
        got = os.preadv(fd, [staging[:length]], first)
        if got < start + total - first:
            self._truncated(run, got - (start - first), total)
        views, at = [], start - first
        for p in run:
            views.append(staging[at:at + p.nbytes])
            at += p.nbytes
        return views

    def _read_cached(self, fd: int, run: list[Piece], dests: list[torch.Tensor | None], start: int,
                     total: int) -> tuple[list[memoryview], list[bool]]:
        """One buffered read into the slots themselves (into staging where a dtype differs), then the range is
        dropped from the page cache -> (each piece's bytes, whether they are in its destination)."""
        views, in_place, at = [], [], 0
        staging = None
        for p, dest in zip(run, dests):
            in_place.append(dest is not None and dest.dtype == p.dtype and dest.is_contiguous())
            if in_place[-1]:
                views.append(memoryview(_bytes_of(dest)))
            else:
                staging = staging if staging is not None else self._staging(total)
                views.append(staging[at:at + p.nbytes])
            at += p.nbytes
        got = os.preadv(fd, views, start)
        first = start // _DROP_ALIGN * _DROP_ALIGN  # give the range back: the slow tier stays on disk
        os.posix_fadvise(fd, first, -(-(start + total - first) // _DROP_ALIGN) * _DROP_ALIGN, os.POSIX_FADV_DONTNEED)
        if got != total:
            self._truncated(run, got, total)
        return views, in_place

    @staticmethod
    def _truncated(run: list[Piece], got: int, total: int):
        raise CheckpointError(f"{run[0].path}: truncated safetensors file (expert tensor {run[0].tensor} "
                              f"is cut short: {max(got, 0)} of {total} bytes)")

    def _staging(self, nbytes: int) -> memoryview:
        """This thread's block-aligned staging buffer, at least nbytes long (kept for its next reads)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            raw = np.empty(nbytes + _BLOCK, dtype=np.uint8)
            skip = (-raw.ctypes.data) % _BLOCK
            buf = self._local.buf = memoryview(raw[skip:skip + nbytes])
        return buf

    def _file(self, path) -> tuple[int, bool]:
        """(fd, whether it reads with O_DIRECT) of one checkpoint file, opened once."""
        found = self._files.get(path)
        if found is None:
            with self._lock:
                found = self._files.get(path)
                if found is None:
                    found = self._files[path] = self._open(path)
        return found

    def _fall_back(self, path, error: OSError) -> int:
        """Read `path` through the page cache from now on -> its new fd."""
        logger.info("%s: O_DIRECT reads fail (%s); expert reads go through the page cache, dropped after each read",
                    path, error)
        with self._lock:
            os.close(self._files[path][0])
            self._files[path] = self._open(path, direct=False)
            return self._files[path][0]

    @staticmethod
    def _open(path, direct: bool = True) -> tuple[int, bool]:
        if direct and USE_DIRECT_IO:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                logger.info("%s: the filesystem refuses O_DIRECT; expert reads go through the page cache, "
                            "which is dropped after each read", path)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: it would be dropped unread
        return fd, False

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()

