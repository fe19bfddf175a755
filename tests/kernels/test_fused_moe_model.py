"""A whole model run with the Triton MoE path (interpreter) gives the CPU path's greedy tokens and log-probabilities."""

import pytest

import marserve_kernels
from marserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "rivers and mountains", "a b c"]


@pytest.mark.parametrize("model_type,mar", [("mixtral", False), ("qwen2_moe", False), ("qwen3_moe", True),
                                           ("olmoe", False)])
def test_triton_moe_path_gives_the_cpu_paths_tokens(baby_checkpoint, monkeypatch, model_type, mar):
    path = baby_checkpoint(model_type, mar=mar)  # MAR changes the routing, so the kernels see other ids
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    calls = []
    real_fused_moe = marserve_kernels.fused_moe

    def counted_fused_moe(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_fused_moe(*args, **kwargs)

    monkeypatch.setattr(marserve_kernels, "fused_moe", counted_fused_moe)
    runs, logprobs = {}, {}
    for backend in ("cpu", "triton"):
        monkeypatch.setenv("MARSERVE_MOE_BACKEND", backend)
        llm = LLM(path, dtype="float32")
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
        runs[backend] = [o.token_ids for o in outs]
        logprobs[backend] = [[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] for o in outs]
        # The comparison means something only if the Triton run really went through the kernels.
        assert bool(calls) == (backend == "triton")
    assert runs["triton"] == runs["cpu"]
    # Same tokens could hide small errors; the chosen tokens' log-probabilities agree to fp32 rounding too.
    for got, want in zip(logprobs["triton"], logprobs["cpu"]):
        assert got == pytest.approx(want, abs=1e-4)
