"""The slow tier of the expert store: the checkpoint's own safetensors files, read by byte offset, checksummed,
and never left in the page cache.

An expert's pieces that sit back to back in one file (per-expert w1/w2/w3 tensors usually do) are read with one
os.preadv into their destinations, so a miss costs one disk request per run rather than per tensor. The files are
opened with POSIX_FADV_RANDOM (readahead would only bring in bytes that are dropped again) and every run's range
is given back with POSIX_FADV_DONTNEED after the read. Each piece's CRC-32 is recorded on the first (streaming)
read and checked on every later one: a mismatch is read again, then is an error naming the file and tensor.
`fault_hook` (tests only, never reachable over HTTP) sees each piece's bytes after a checked read, to damage them.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from typing import Callable

import torch

from marserve.errors import CheckpointError
from marserve.experts.checkpoint_index import CheckpointIndex, Piece

logger = logging.getLogger(__name__)
# The kernel drops only whole page-cache folios inside a DONTNEED range, and keeps files in folios of up to
# 2 MiB (a PMD on x86-64): ranges are widened to 2 MiB boundaries. The neighbours' bytes are other experts, or
# weights the model has already copied.
_DROP_ALIGN = 2 << 20


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


class SlowTier:
    def __init__(self, index: CheckpointIndex):
        self.index = index
        self.fault_hook: Callable[[Piece, memoryview], None] | None = None
        self.rereads = 0  # runs read again after a checksum mismatch (the server exports it)
        self._crc: dict[Piece, int] = {}
        self._fds: dict = {}
        self._lock = threading.Lock()

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
        bufs, views = [], []
        for p, dest in zip(run, dests):
            direct = dest is not None and dest.dtype == p.dtype and dest.is_contiguous()
            buf = dest if direct else torch.empty(p.nbytes // p.dtype.itemsize, dtype=p.dtype)
            bufs.append(buf)
            views.append(memoryview(buf.view(torch.uint8).numpy()).cast("B"))  # the bytes of buf, written in place
        fd, start = self._fd(run[0].path), run[0].offset
        total = sum(p.nbytes for p in run)
        for attempt in (1, 2):
            got = os.preadv(fd, views, start)
            first = start // _DROP_ALIGN * _DROP_ALIGN  # give the range back: the slow tier stays on disk
            os.posix_fadvise(fd, first, -(-(start + total - first) // _DROP_ALIGN) * _DROP_ALIGN,
                             os.POSIX_FADV_DONTNEED)
            if got != total:
                raise CheckpointError(f"{run[0].path}: truncated safetensors file (expert tensor {run[0].tensor} "
                                      f"is cut short: {got} of {total} bytes)")
            if record:
                for p, v in zip(run, views):
                    self._crc[p] = zlib.crc32(v)
                break
            if self.fault_hook is not None:
                for p, v in zip(run, views):
                    self.fault_hook(p, v)
            bad = [p for p, v in zip(run, views) if zlib.crc32(v) != self._crc[p]]
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
        for dest, buf in zip(dests, bufs):
            if dest is not None and buf is not dest:
                dest.copy_(buf.view(dest.shape))  # dtype conversion after the read (e.g. bf16 file, fp32 compute)
        return total

    def _fd(self, path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: it would be dropped unread
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
