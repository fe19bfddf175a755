"""Offloading never changes outputs: greedy text at budgets 99 / 50 / 25 % and exactly the minimum (25 % of these
models, also given in GB), under every policy, with random prefetches injected before and during each step, equals
the all-resident model's, on baby models of all four architectures, MAR and plain, sharded and stacked."""

import pytest

from marserve import LLM, SamplingParams
from marserve.experts.offloaded import OffloadedExperts, budget_for
from marserve.experts.policies import POLICIES
from tests.experts.checkpoints import SIZES, stacked_copy
from tests.experts.random_prefetch import install_random_prefetcher

PROMPTS = ["The quick brown fox", "Experts that see the same kind of token become specialists: one learns numbers "
           "like 1 2 3 4 5 6 7 8 9 0, another learns code such as def f(x): return x + 1", "Hello"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

MODELS = {  # name -> (model_type, baby_checkpoint keywords)
    "mixtral-mar-sharded": ("mixtral", dict(mar=True, sharded=True)),
    "mixtral": ("mixtral", {}),
    "qwen2_moe-mar": ("qwen2_moe", dict(mar=True)),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe-mar": ("qwen3_moe", dict(mar=True)),
    "qwen3_moe-stacked": ("qwen3_moe", dict(stacked=True)),
    "olmoe-mar": ("olmoe", dict(mar=True)),
    "olmoe-sharded": ("olmoe", dict(sharded=True)),
}
FULL_MATRIX = ("mixtral-mar-sharded", "qwen2_moe")  # every budget x policy; the others every policy at the minimum


@pytest.fixture(scope="module")
def reference(baby_checkpoint, tmp_path_factory):
    """name -> (checkpoint path, the all-resident model's greedy token ids)."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, kw = MODELS[name]
            kw = dict(kw)
            stacked = kw.pop("stacked", False)
            path = baby_checkpoint(model_type, **kw, **SIZES)
            if stacked:
                path = stacked_copy(path, tmp_path_factory.mktemp("stacked") / "model")
            outs = LLM(path, dtype="float32").generate(PROMPTS, GREEDY)
            cache[name] = path, [o.outputs[0].token_ids for o in outs]
        return cache[name]

    return get


def _offloaded(path, **kw):
    llm = LLM(path, dtype="float32", **kw)
    assert all(isinstance(b.experts, OffloadedExperts) for b in llm.model.moe_blocks())
    prefetcher = install_random_prefetcher(llm)
    return llm, prefetcher


def _check(reference, name, **kw):
    path, want = reference(name)
    llm, prefetcher = _offloaded(path, **kw)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == want
    stats = list(llm.engine.expert_store.stats.values())
    assert prefetcher.calls > 0 and sum(s.prefetches for s in stats) > 0
    assert sum(s.lookups for s in stats) == sum(s.hits + s.misses for s in stats) > 0
    return llm, stats


CASES = [(name, cache, policy) for name in FULL_MATRIX for cache in (0.99, 0.5, 0.25) for policy in POLICIES] + \
        [(name, 0.25, policy) for name in MODELS if name not in FULL_MATRIX for policy in POLICIES]


@pytest.mark.parametrize("name,cache,policy", CASES)
def test_greedy_outputs_unchanged(reference, name, cache, policy):
    llm, stats = _check(reference, name, expert_cache=cache, expert_policy=policy)
    assert llm.engine.expert_store.num_slots == int(cache * 32)
    if cache <= 0.5:  # the budget really bites: experts were read from the files during generation
        assert sum(s.misses for s in stats) > 0 and sum(s.bytes_moved for s in stats) > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_exactly_the_minimum_given_in_gb(reference, policy):
    path, _ = reference("qwen2_moe-mar")
    from marserve.config import ModelConfig
    import torch
    b = budget_for(ModelConfig.from_dir(path), torch.float32, 0.25)
    assert b.num_slots == b.min_slots == 8  # 2 experts x 4 layers, and one layer's 8
    llm, _ = _check(reference, "qwen2_moe-mar", expert_cache_gb=b.min_slots * b.expert_bytes / 2**30,
                    expert_policy=policy)
    assert llm.engine.expert_store.num_slots == 8


def test_the_full_budget_keeps_the_resident_path(reference):
    path, want = reference("qwen2_moe")
    llm = LLM(path, dtype="float32", expert_cache=1.0)
    assert llm.engine.expert_store is None and llm.engine.prefetcher is None
    assert all(b.experts.resident() is not None for b in llm.model.moe_blocks())


@pytest.mark.parametrize("name", ["mixtral-mar-sharded", "qwen2_moe"])
def test_the_engine_prefetcher_changes_nothing(reference, name):
    """prefetch=True installs marserve.experts.prefetcher.Prefetcher, and outputs stay the same."""
    path, want = reference(name)
    llm = LLM(path, dtype="float32", expert_cache=0.25, expert_policy="mar", prefetch=True)
    assert llm.engine.prefetcher is not None
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    lookup = llm.engine.prefetcher.lookup  # the engine hands it every step's sequences
    assert lookup.steps > 0
    alone = LLM(path, dtype="float32").generate([PROMPTS[0]], LONG)[0].outputs[0].token_ids
    assert llm.generate([PROMPTS[0]], LONG)[0].outputs[0].token_ids == alone
    assert lookup.forecasts > 0  # a baby model's greedy text soon repeats itself: forecast, and still the same text
    off = LLM(path, dtype="float32", expert_cache=0.25, expert_policy="mar", prefetch=False)
    assert off.engine.prefetcher is None
    assert [o.outputs[0].token_ids for o in off.generate(PROMPTS, GREEDY)] == want
    assert sum(s.prefetches for s in off.engine.expert_store.stats.values()) == 0
