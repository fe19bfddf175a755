"""The budget is honest in memory: a process serving a model with ~120 MB of experts at expert_cache=0.25 peaks
(VmHWM) lower than at 1.0 by at least 60% of the expert bytes it offloads. Each run in a fresh subprocess."""

import json
import os
import subprocess
import sys

import pytest

RUN = """
import json, sys
from marserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", expert_cache=float(sys.argv[2]))
llm.generate(["The quick brown fox", "Hello world"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
store = llm.engine.expert_store
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"hwm_kb": int(status["VmHWM"].split()[0]),
                  "misses": sum(s.misses for s in store.stats.values()) if store else 0}))
"""
# hidden 256, 4 MoE layers of 20 experts of intermediate 512, fp32: 80 x 1.5 MiB = 120 MiB of experts.
BIG = dict(hidden_size=256, num_layers=4, num_experts=20, top_k=2)


def _peak(path, cache):
    out = subprocess.run([sys.executable, "-c", RUN, str(path), str(cache)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_drops_by_the_offloaded_bytes(baby_checkpoint):
    path = baby_checkpoint("mixtral", **BIG)
    expert_bytes = 4 * 20 * 3 * 256 * 512 * 4
    full, quarter = _peak(path, 1.0), _peak(path, 0.25)
    offloaded = expert_bytes * 0.75
    saved = (full["hwm_kb"] - quarter["hwm_kb"]) * 1024
    print(f"peak RSS: 100% {full['hwm_kb'] / 1024:.1f} MiB, 25% {quarter['hwm_kb'] / 1024:.1f} MiB; saved "
          f"{saved / 2**20:.1f} MiB of {offloaded / 2**20:.1f} MiB offloaded ({saved / offloaded:.0%})")
    assert quarter["misses"] > 0
    assert saved >= 0.6 * offloaded
