"""A dead expert-parallel rank (RankFailure from the runner) ends the engine loop: in-flight requests end with
an error naming it, /health's is_running turns false, whether the failure shows in a step or while idle.
(The real collectives are exercised in test_expert_parallel.py; here the runner raises as LeaderRunner does.)"""

import asyncio

import pytest

from marserve import SamplingParams
from marserve.engine.async_engine import AsyncEngine, EngineDeadError
from marserve.engine.distributed import RankFailure
from marserve.engine_config import EngineConfig

MESSAGE = "expert parallelism: a rank stopped answering (Connection closed by peer); the engine cannot continue"


@pytest.fixture(scope="module")
def path(baby_checkpoint):
    return baby_checkpoint("qwen3_moe")


def _raise(*_):
    raise RankFailure(MESSAGE)


def test_failure_in_a_step_ends_in_flight_requests(path):
    async def main():
        engine = AsyncEngine.from_config(EngineConfig(model=path, dtype="float32", max_model_len=64))
        engine.engine.runner.execute = _raise
        await engine.start()
        with pytest.raises(EngineDeadError, match="a rank stopped answering"):
            async for _ in engine.generate("Hello", SamplingParams(max_tokens=4, temperature=0), "r0"):
                pass
        assert not engine.is_running and isinstance(engine.dead_error, RankFailure)
        await engine.shutdown(0)
    asyncio.run(main())


def test_failure_while_idle_stops_the_engine(path):
    async def main():
        engine = AsyncEngine.from_config(EngineConfig(model=path, dtype="float32", max_model_len=64))
        await engine.start()
        assert engine.is_running
        engine.engine.runner.check_health = _raise  # what LeaderRunner does once the heartbeat saw a rank go
        for _ in range(100):
            if not engine.is_running:
                break
            await asyncio.sleep(0.05)
        assert not engine.is_running and str(engine.dead_error) == MESSAGE
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("Hello", SamplingParams(max_tokens=4, temperature=0), "r1"):
                pass
        await engine.shutdown(0)
    asyncio.run(main())
