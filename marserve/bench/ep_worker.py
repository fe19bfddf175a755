"""One rank of `marserve bench ep` (started by marserve/bench/ep.py with torchrun's environment variables):
generates a fixed greedy workload; rank 0 writes its timing and the group's traffic as JSON."""

from __future__ import annotations

import json
import sys
import time


def main(model: str, size: int, transport: str, placement: str, prompts_path: str, max_tokens: int,
         out_path: str, dtype: str) -> int:
    from marserve.llm import LLM
    from marserve.sampling_params import SamplingParams
    with open(prompts_path) as f:
        prompts = json.load(f)
    llm = LLM(model, dtype=dtype, kv_cache_gb=0.25, expert_parallel_size=size, expert_transport=transport,
              expert_placement=placement)  # ranks other than 0 follow rank 0 inside this call, then exit
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up: kernels built, pages touched
    group = llm.engine.runner.ep.experts if size > 1 else None
    before = (group.group_bytes_sent, group.bytes_replicated, group.tokens, group.assignments,
              group.local_assignments) if group else (0, 0, 0, 0, 0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    after = (group.group_bytes_sent, group.bytes_replicated, group.tokens, group.assignments,
             group.local_assignments) if group else (0, 0, 0, 0, 0)
    d = [a - b for a, b in zip(after, before)]
    with open(out_path, "w") as f:
        json.dump({"ranks": size, "transport": transport, "placement": placement, "elapsed": elapsed,
                   "generated": generated, "prompt_tokens": prompt_tokens, "tokens_per_s": generated / elapsed,
                   "bytes_sent_per_token": d[0] / d[2] if d[2] else 0.0,
                   "bytes_replicated_per_token": d[1] / d[2] if d[2] else 0.0,
                   "local_share": d[4] / d[3] if d[3] else 1.0,
                   "outputs": [o.outputs[0].token_ids for o in outs]}, f)
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(a[0], int(a[1]), a[2], a[3], a[4], int(a[5]), a[6], a[7]))
