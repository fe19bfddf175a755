import asyncio

import pytest

from marserve import LLM, SamplingParams
from marserve.async_engine import AsyncEngine
from marserve.detokenizer import stable_text
from marserve.engine_config import EngineConfig
from marserve.errors import RequestError

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Hello", "rivers and mountains", "a b c d"]


def test_stable_text_holds_back_half_characters():
    assert stable_text("caf\ufffd", finished=False) == "caf"
    assert stable_text("caf\ufffd", finished=True) == "caf\ufffd"


@pytest.fixture(scope="module")
def path(baby_checkpoint):
    return baby_checkpoint("qwen3_moe")


def test_concurrent_streams_match_offline_and_abort_frees_blocks(path):
    want = [o.outputs[0].token_ids for o in LLM(path, dtype="float32").generate(PROMPTS, GREEDY)]

    async def main():
        engine = AsyncEngine.from_config(EngineConfig(model=path, dtype="float32", max_model_len=64))
        await engine.start()

        async def one(i):
            seen = []
            async for out in engine.generate(PROMPTS[i], GREEDY, f"r{i}"):
                seen.append(list(out.outputs[0].token_ids))
            assert out.finished and seen[-1] == want[i]
            assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # cumulative, growing
            assert out.metrics.ttft is not None and out.metrics.ttft >= 0

        await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        # a consumer that goes away after the first output: the request is aborted, blocks come back
        stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "gone")
        await stream.__anext__()
        await stream.aclose()
        bm = engine.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and engine.stats().num_running == 0
        with pytest.raises(RequestError) as e:
            async for _ in engine.generate(list(range(100)), GREEDY, "long"):
                pass
        assert e.value.code == "context_length_exceeded"
        async for out in engine.generate(PROMPTS[1], GREEDY, "after"):
            pass
        assert out.outputs[0].token_ids == want[1] and engine.is_running
        stats = engine.stats()
        layers = engine.model_config.num_hidden_layers
        assert [c.layer_idx for c in stats.expert_cache] == list(range(layers))
        # every expert is resident: each (token, expert) routing decision is a hit, nothing moves
        assert all(c.lookups > 0 and c.hits == c.lookups and c.misses == 0 and c.bytes_moved == 0
                   for c in stats.expert_cache)
        await engine.shutdown(grace_seconds=1)
        assert not engine.is_running

    asyncio.run(main())
