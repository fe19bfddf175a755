"""Host memory for weights and the KV cache on transparent huge pages (2 MiB) where Linux offers them.

Decoding reads every weight once per token from memory far larger than the caches; with 4 KiB pages
each MiB read costs 256 TLB misses, which on this machine roughly halves the speed of the small
attention projections (measured in docs/benchmarks.md). Linux in `madvise` mode (the common default)
backs a region with huge pages only when asked before it is first touched, so allocation asks.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20


def empty(shape, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """torch.empty, on huge pages when the tensor is on the CPU and at least one huge page large.

    The memory is a fresh private anonymous mapping (heap memory may already be touched, and touched
    pages stay small), with the tensor starting at a 2 MiB boundary (at most 2 MiB extra).
    """
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if (torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not sys.platform.startswith("linux")
            or not hasattr(mmap, "MADV_HUGEPAGE")):
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as the tensor
    start = (-raw.data_ptr()) % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except OSError as e:  # THP disabled or unsupported: normal pages, same tensor
        logger.debug("madvise(MADV_HUGEPAGE) refused (%s); using normal pages", e)
    return raw[start:start + nbytes].view(dtype).view(shape)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory mapping holding `t` that are backed by huge pages (Linux; 0 elsewhere)."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
