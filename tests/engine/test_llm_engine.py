"""Continuous batching gives each request exactly what it gets alone (greedy, fp32)."""

import pytest
import torch

from marserve import LLM, SamplingParams
from marserve.errors import RequestError

PROMPTS = ["The quick brown fox jumps", "Hello", "experts of a mixture route tokens to the few they know best",
           "rivers and mountains and", "a b c d e f g h i j k l m n o p", "def f(x):"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(baby_checkpoint):
    return baby_checkpoint("mixtral")


@pytest.fixture(scope="module")
def alone(path):
    llm = LLM(path, dtype="float32", max_num_seqs=1, enable_prefix_caching=False)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("kw", [
    dict(),  # plain continuous batching
    dict(max_num_batched_tokens=7),  # chunked prefill mixed with decodes
    dict(kv_cache_gb=6 * 2048 / 2**30, block_size=4),  # a tiny pool: preemption by recompute
    dict(enable_prefix_caching=True, block_size=2),
])
def test_batched_equals_alone(path, alone, kw):
    llm = LLM(path, dtype="float32", **kw)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # no leak
    if "kv_cache_gb" in kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_and_same_tokens(path, alone):
    llm = LLM(path, dtype="float32", block_size=2)
    first = llm.generate([PROMPTS[2]], GREEDY)[0]
    again = llm.generate([PROMPTS[2]], GREEDY)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids == alone[2]


def test_seeded_sampling_reproducible_alone_and_batched(path):
    llm = LLM(path, dtype="float32")
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    solo = llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    batch = llm.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(max_tokens=5, temperature=1.0), p])
    assert batch[1].outputs[0].token_ids == solo


def test_n_logprobs_stop_and_lengths(path):
    llm = LLM(path, dtype="float32")
    out = llm.generate(["rivers"], SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1, logprobs=2,
                                                   ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.token_ids) == 4 and len(o.logprobs) == 4 and o.finish_reason == "length"
        for tok, entry in zip(o.token_ids, o.logprobs):
            assert tok in entry and entry[tok].logprob <= 0
    full = llm.generate(["Hello"], GREEDY)[0].outputs[0]
    stop_tok = full.token_ids[3]
    cut = llm.generate(["Hello"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[stop_tok]))[0].outputs[0]
    assert cut.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1] and cut.stop_reason == stop_tok


def test_context_and_empty_prompt_errors(path):
    llm = LLM(path, dtype="float32", max_model_len=16)
    with pytest.raises(RequestError) as e:
        llm.generate([list(range(20))], GREEDY)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as e:
        llm.generate([{"prompt_token_ids": []}], GREEDY)
    assert e.value.param == "prompt"
    assert not llm.engine.has_unfinished


def test_a_failing_model_step_fails_its_requests_without_their_text_and_the_engine_goes_on(path, alone,
                                                                                              monkeypatch):
    llm = LLM(path, dtype="float32")
    real = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky(chunks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: secret of another request")
        return real(chunks)

    monkeypatch.setattr(llm.engine.runner, "execute", flaky)
    failed = llm.generate([PROMPTS[0]], GREEDY)[0]
    # A batched forward names no culprit: every sequence fails, none sees the exception's text.
    assert failed.outputs[0].finish_reason == "error" and failed.error and "secret" not in failed.error
    assert llm.generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids == alone[1]
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("victim", [0, 3])
def test_a_request_whose_sampling_fails_fails_alone(path, alone, victim):
    """The batch-mates of a request that breaks sampling (here on its 3rd token) finish as if alone."""
    llm = LLM(path, dtype="float32")
    bad = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=2)
    counted = {"n": 0}

    def hook(p):
        if p is bad:
            counted["n"] += 1
            if counted["n"] > 4:  # both sequences sampled twice: fail on the third token
                raise IndexError("index 999999 is out of bounds: the victim's own data")

    llm.engine.sampler.fault_hook = hook
    params = [bad if i == victim else GREEDY for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params)
    for i, o in enumerate(outs):
        if i == victim:
            assert o.error and "999999" in o.error and all(c.finish_reason == "error" for c in o.outputs)
        else:
            assert o.error is None and o.outputs[0].token_ids == alone[i], i
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished


@pytest.mark.parametrize("tokens, kw, param", [
    ([5, 999999], {}, "prompt"), ([5, -1], {}, "prompt"),
    ([5, 6], {"stop_token_ids": [999999], "min_tokens": 4}, "stop_token_ids"),
    ([5, 6], {"stop_token_ids": [3, -1]}, "stop_token_ids"),
])
def test_token_ids_outside_the_vocabulary_are_refused_before_queueing(path, tokens, kw, param):
    llm = LLM(path, dtype="float32")
    with pytest.raises(RequestError) as e:
        llm.generate([PROMPTS[0], {"prompt_token_ids": tokens}], SamplingParams(max_tokens=5, **kw))
    assert e.value.param == param and "vocabulary" in str(e.value)
    assert not llm.engine.has_unfinished and not llm.engine.requests


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=5, block_size=2)])
def test_prompt_logprobs_match_a_dense_forward(path, kw):
    import torch

    from marserve.attention import AttentionMetadata
    llm = LLM(path, dtype="float32", **kw)
    prompt = PROMPTS[2]
    llm.generate([prompt], GREEDY)  # the prompt's blocks are now in the prefix cache: they must not be skipped
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    ids = out.prompt_token_ids
    with torch.inference_mode():
        h = llm.model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.dense([len(ids)]))
        want = llm.model.compute_logits(h).float().log_softmax(-1)  # row i predicts token i + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - want[pos - 1, ids[pos]].item()) < 1e-4
        assert entry[ids[pos]].rank == int((want[pos - 1] > want[pos - 1, ids[pos]]).sum()) + 1
        top = sorted((e for e in entry.values() if e.rank <= 3), key=lambda e: e.rank)
        assert [e.rank for e in top] == [1, 2, 3]
        assert abs(top[0].logprob - want[pos - 1].max().item()) < 1e-4
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_chat_applies_the_template_once(path):
    llm = LLM(path, dtype="float32")
    conv = [{"role": "user", "content": "hello there"}]
    text = llm.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = llm.generate([{"prompt_token_ids": ids}], GREEDY)[0]
    got = llm.chat(conv, GREEDY)
    assert len(got) == 1 and got[0].prompt_token_ids == ids and got[0].outputs[0].token_ids == want.outputs[0].token_ids
    assert len(llm.chat([conv, conv + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]],
                        GREEDY)) == 2


def test_an_unusable_seed_is_refused_whole_and_the_engine_goes_on(path, alone):
    llm = LLM(path, dtype="float32")
    with pytest.raises(RequestError) as e:
        llm.engine.add_request("bad", PROMPTS[0], SamplingParams(n=2, seed=2**64 - 1, max_tokens=3))
    assert e.value.param == "seed"
    assert "bad" not in llm.engine.requests and not llm.engine.scheduler.has_unfinished  # nothing half-added
    assert llm.generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids == alone[1]


def test_the_engine_builds_the_native_kernels_before_the_first_request(path, monkeypatch):
    from marserve_kernels import native_build
    asked = []
    monkeypatch.setattr(native_build, "build_all", lambda dtype: asked.append(dtype) or {})
    LLM(path, dtype="float32", max_num_seqs=1)
    assert asked == [torch.float32]  # at start, for the weights' dtype: no request waits for cc
