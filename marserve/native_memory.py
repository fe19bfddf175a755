"""Hands the C heap's free pages back to the OS, which glibc alone does not do for a serving engine.

Every step allocates activations and logits sized by its token count ([T, D], [T, V]; with prompt
logprobs a [T, V] per chunk), so with prompts of varied lengths the heap fills with free holes of
every size. glibc returns memory only from the top of the heap (and raises its mmap threshold to the
largest block freed, so that tensors up to 32 MB land on the heap too): measured with the default
model on echo + logprobs, RSS rose 928 -> 1807 MB over 320 requests, of which ~400 MB was free heap
(mallinfo2 fordblks) and Python's object counts and arenas stayed flat. malloc_trim(0) also releases
the free pages inside the heap (madvise): RSS then levels off once the memory really in use has
(1190 MB after ~110 requests on one thread; 1520 MB after ~300 on two, against 2332 MB and rising
without). A trim costs ~1 ms (~30 ms the first time, releasing 320 MB).

What trimming cannot give back is memory still in use, and oneDNN kept some growing: every distinct
shape of a oneDNN product (above cpu_linear.NATIVE_MAX_TOKENS rows: prefill chunks, and with prompt
logprobs the [T, V] head) creates a primitive, ~0.55 MB of JIT'd kernel and descriptors, and two caches
keep up to 1024 of them each by default (ideep's, read from LRU_CACHE_CAPACITY, and oneDNN's,
ONEDNN_PRIMITIVE_CACHE_CAPACITY). With varied prompt lengths they filled over hundreds of requests: the
"in use" heap of the default model on echo + logprobs, two threads, grew 248 -> 862 MB over 272
requests (heaptrack: the top holders were oneDNN's matmul primitive descriptors), and 600 linears of
distinct row counts grew RSS 412 -> 1245 MB, flat at 368 MB with both caches at 128. bound_onednn_caches
sets them (unless the user did) before the engine creates its first primitive.
"""

from __future__ import annotations

import ctypes
import os
import time

# Entries in each of ideep's and oneDNN's primitive caches: ~70 MB at most. Varied prompt lengths miss
# the cache anyway; a steady workload's shapes still fit.
ONEDNN_CACHE_CAPACITY = 128


def _find_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to call, and nothing is done)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive caches (environment values already set win). Effective only before the
    process's first oneDNN primitive: both caches read their capacity once, when first used."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS now; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class HeapTrimmer:
    """Trims after requests finish (when their tensors have just been freed), at most once per
    `min_interval_seconds`: a trim walks the heap, and a busy engine finishes requests every step."""

    def __init__(self, min_interval_seconds: float = 0.5):
        self.min_interval_seconds = min_interval_seconds
        self._last = float("-inf")
        self.num_trims = 0

    def requests_finished(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.min_interval_seconds and release_free_heap():
            self._last = now
            self.num_trims += 1
