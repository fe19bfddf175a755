"""The expert store's idle state and re-reads as the server exports them: reads in flight and pinned slots are
counted while a pass holds them and are 0 once it ends; the soak's corrupt-read fault (tests/soak/faulty_serve.py)
makes re-reads that /metrics counts, and the text stays the same."""

import pytest

from marserve import LLM, SamplingParams
from marserve.engine.async_engine import AsyncEngine
from marserve.engine_config import EngineConfig
from tests.experts.checkpoints import SIZES
from tests.soak.faulty_serve import CorruptReads

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Hello world! How are", "def f(x): return"]


@pytest.fixture(scope="module")
def checkpoint(baby_checkpoint):
    return baby_checkpoint("qwen3_moe", mar=True, **SIZES)


def _metrics(engine) -> dict[str, float]:
    from marserve_server.metrics import _EngineCollector
    return {s.name: s.value for f in _EngineCollector(engine, "m").collect() for s in f.samples if "layer" not in s.labels}


def test_pins_show_during_a_pass_and_are_0_when_idle(checkpoint):
    engine = AsyncEngine.from_config(EngineConfig(model=checkpoint, dtype="float32", expert_cache=0.25,
                                                  prefetch=False))
    store = engine.engine.expert_store
    try:
        store.fetch(0, {0: 1, 1: 1})  # what a layer of a forward pass does
        m = _metrics(engine)
        assert m["marserve:expert_cache_pinned_slots"] == 2 and m["marserve:expert_cache_reads_in_flight"] == 0
        store.end_pass()
        assert _metrics(engine)["marserve:expert_cache_pinned_slots"] == 0
    finally:
        store.close()


def test_corrupt_reads_are_counted_as_rereads_and_the_store_ends_idle(checkpoint):
    want = [o.outputs[0].token_ids for o in LLM(checkpoint, dtype="float32").generate(PROMPTS, GREEDY)]
    engine = AsyncEngine.from_config(EngineConfig(model=checkpoint, dtype="float32", expert_cache=0.25))
    store = engine.engine.expert_store
    hook = store.fault_hook = CorruptReads(store.index, every=3)
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.engine.add_request(str(i), prompt, GREEDY)
        got = {}
        while engine.engine.has_unfinished:
            for out in engine.engine.step():
                assert out.error is None
                got[out.request_id] = out.outputs[0].token_ids
        assert [got[str(i)] for i in range(len(PROMPTS))] == want  # never wrong text
        store._pool.shutdown(wait=True)  # prefetches still reading land before the idle state is read
        m = _metrics(engine)
        assert hook.damaged > 1 and m["marserve:expert_cache_rereads_total"] == hook.damaged
        assert m["marserve:expert_cache_reads_in_flight"] == 0 and m["marserve:expert_cache_pinned_slots"] == 0
    finally:
        store.close()
