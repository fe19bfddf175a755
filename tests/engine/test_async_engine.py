import asyncio

import pytest

from marserve import LLM, SamplingParams
from marserve.engine.async_engine import AsyncEngine
from marserve.engine.detokenizer import stable_text
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
        for _ in range(100):  # the engine thread takes the abort before its next step: milliseconds when idle
            if bm.num_free_blocks == bm.num_blocks:
                break
            await asyncio.sleep(0.01)
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


def test_the_event_loop_never_waits_for_a_model_step(path, monkeypatch):
    """A slow step (a long prefill) must not block the event loop: new requests and other coroutines go on."""
    import time as _time

    async def main():
        engine = AsyncEngine.from_config(EngineConfig(model=path, dtype="float32", max_model_len=64))
        real_step = engine.engine.step

        def slow_step():
            _time.sleep(0.3)
            return real_step()

        monkeypatch.setattr(engine.engine, "step", slow_step)
        await engine.start()

        async def consume(rid):
            async for out in engine.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0,
                                                                         ignore_eos=True), rid):
                pass
            return out

        first = asyncio.create_task(consume("a"))
        await asyncio.sleep(0.05)  # the engine thread is now inside a 0.3 s step
        t0 = _time.perf_counter()
        second = asyncio.create_task(consume("b"))  # submitting must not wait for that step
        await asyncio.sleep(0)
        ticks = 0
        while _time.perf_counter() - t0 < 0.2:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 10  # the loop kept turning during the step
        outs = await asyncio.gather(first, second)
        assert all(o.finished for o in outs)
        await engine.shutdown(grace_seconds=1)

    asyncio.run(main())
