"""RSS stays flat once warmed up on the echo + logprobs path (prompt logprobs, n=2, varied prompt lengths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from marserve.native_memory import ONEDNN_CACHE_CAPACITY, HeapTrimmer, release_free_heap

# In a fresh process: the test process's heap holds every other test's leftovers. Prints RSS (MB) after each
# batch of 16 requests like the server's {"echo": true, "logprobs": 3, "n": 2}, prompts of 5-300 words.
PROBE = r"""
import json, os, random
from marserve import DEFAULT_MODEL_DIR, LLM, SamplingParams

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

llm = LLM(DEFAULT_MODEL_DIR, dtype="float32")
rng = random.Random(0)
words = "the quick brown fox jumps over the lazy dog and then some more words appear here".split()
params = SamplingParams(n=2, max_tokens=8, logprobs=3, prompt_logprobs=3, temperature=1.0)
rss = []
for _ in range(NUM_BATCHES):
    llm.generate([" ".join(rng.choice(words) for _ in range(rng.randint(5, 300))) for _ in range(16)], params)
    rss.append(rss_mb())
print(json.dumps(rss))
"""
NUM_BATCHES, WARM_BATCHES = 11, 7


@pytest.mark.slow
@pytest.mark.skipif(not release_free_heap(), reason="needs glibc's malloc_trim (the growth it fixes is glibc's)")
def test_rss_stays_flat_on_the_prompt_logprobs_path():
    """Measured on the AVX2 host: without trimming RSS rose 1474 -> 1600 MB over these last 64 requests
    (and 928 -> 1807 MB over 320, still rising); with it 1177 -> 1187 MB on one thread. On two threads (the
    server's) the memory in use kept growing for ~300 requests more, 980 -> 1521 MB: oneDNN's primitive caches
    filling (native_memory.bound_onednn_caches); with them capped, 800 -> 846 MB by request 64 and 846 at 176."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", PROBE.replace("NUM_BATCHES", str(NUM_BATCHES))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.splitlines()[-1])
    growth = rss[-1] - rss[WARM_BATCHES - 1]
    assert growth < 50, f"RSS grew {growth:.0f} MB after warm-up: {[round(r) for r in rss]}"


# In a fresh process (oneDNN reads its cache capacities once, at its first primitive): linears of distinct row
# counts above the native kernel's, as prefill chunks of varied prompt lengths make. Prints RSS (MB) after the
# first WARM_SHAPES row counts and after all. BOUND=0 leaves oneDNN's caches at their defaults.
SHAPES_PROBE = r"""
import json, os, sys
from marserve import native_memory
if BOUND:
    native_memory.bound_onednn_caches()
import torch
from marserve_kernels.cpu_linear import NATIVE_MAX_TOKENS, linear

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

weights = [torch.randn(768, 256), torch.randn(4096, 256)]  # like the default model's qkv and head
rss = []
for i in range(NUM_SHAPES):
    x = torch.randn(NATIVE_MAX_TOKENS + 1 + i, 256)
    for w in weights:
        linear(x, w)
    if i + 1 in (WARM_SHAPES, NUM_SHAPES):
        native_memory.release_free_heap()
        rss.append(rss_mb())
print(json.dumps(rss))
"""


def _shapes_probe_growth(bound: bool) -> float:
    warm, total = ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_CAPACITY + 100  # 2 weights: past the cap before the 1st
    code = (SHAPES_PROBE.replace("BOUND", str(int(bound))).replace("NUM_SHAPES", str(total))
            .replace("WARM_SHAPES", str(warm)))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.splitlines()[-1])
    return rss[1] - rss[0]


@pytest.mark.slow
def test_onednn_primitives_of_new_shapes_stop_accumulating():
    """Each new row count creates oneDNN primitives (~0.55 MB each) that its caches kept, up to 1024 each:
    measured on the AVX2 host, 600 row counts x 3 weights grew RSS 412 -> 1245 MB by default and stayed at
    368 MB with the caps. Here 200 more primitives after the caches are full: ~110 MB more without the caps."""
    assert _shapes_probe_growth(bound=True) < 25


def test_the_caps_do_not_override_the_users(monkeypatch):
    from marserve import native_memory
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    native_memory.bound_onednn_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)


def test_the_trimmer_trims_at_most_once_per_interval():
    trimmer = HeapTrimmer(min_interval_seconds=3600)
    for _ in range(5):
        trimmer.requests_finished()
    assert trimmer.num_trims == 1
    trimmer = HeapTrimmer(min_interval_seconds=0)
    for _ in range(5):
        trimmer.requests_finished()
    assert trimmer.num_trims == 5
