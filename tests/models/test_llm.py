"""The offline LLM API: batched generation equals transformers' greedy output; temperature sampling is reproducible."""

import torch

from marserve import LLM, SamplingParams


def test_llm_greedy_batch_matches_transformers(baby_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = baby_checkpoint("qwen3_moe")
    llm = LLM(path, dtype="float32")
    prompts = ["The quick brown fox", "Hello world! How are", "experts"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(outs) == 3
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               eos_token_id=None)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == "length"


def test_llm_sampling_seeded_and_defaults(baby_checkpoint):
    llm = LLM(baby_checkpoint("mixtral"), dtype="float32")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    a = llm.generate(["rivers and mountains"], params)[0].outputs[0].token_ids
    b = llm.generate(["rivers and mountains"], params)[0].outputs[0].token_ids
    assert a == b and len(a) == 8
    d = llm.default_sampling_params()  # from the baby generation_config.json
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (0.7, 0.9, 20, 24)
    assert llm.generation_defaults["eos_token_ids"] == [llm.tokenizer.eos_token_id]
