"""One rank of an expert-parallel test run (started by tests/engine/test_expert_parallel.py with torchrun's
environment variables): greedy generation on a model; rank 0 writes the outputs as JSON."""

from __future__ import annotations

import json
import os
import sys


def main(model_dir: str, size: int, out_path: str, transport: str, placement: str, max_tokens: int,
         dtype: str = "float32") -> int:
    from marserve.llm import LLM
    from marserve.sampling_params import SamplingParams
    llm = LLM(model_dir, dtype=dtype, kv_cache_gb=0.01, expert_parallel_size=size,
              expert_transport=transport, expert_placement=placement, expert_parallel_timeout=10.0)
    prompts = ["The quick brown fox", "Experts that see", "Hello world! How"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    # A pass with many tokens at once too (prefill of all prompts together took the batched path above).
    with open(out_path, "w") as f:
        json.dump([o.outputs[0].token_ids for o in outs], f)
    if os.environ.get("EP_TEST_HANG_AFTER"):  # rank 0 then waits for a follower to be killed
        import time
        from marserve.engine.distributed import RankFailure
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                llm.engine.check_health()
            except RankFailure as e:
                print(f"DETECTED {e}", flush=True)
                return 0
            time.sleep(0.1)
        return 2
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(a[0], int(a[1]), a[2], a[3], a[4], int(a[5]), *a[6:]))
