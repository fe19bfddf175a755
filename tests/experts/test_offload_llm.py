"""Offloading through the public API: the budget floor (LLM and CLI: one line, exit 1), the knobs' validation, two
threads generating on one offloading LLM, corrupt reads never changing text, and the stats the server exports."""

import threading

import pytest

from marserve import LLM, SamplingParams
from marserve.cli import main
from marserve.engine_config import EngineConfig
from marserve.errors import ConfigError
from tests.experts.checkpoints import SIZES
from tests.experts.random_prefetch import install_random_prefetcher

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Hello world! How are", "def f(x): return", "mountains, cities and", "I am fine"]


@pytest.fixture(scope="module")
def checkpoint(baby_checkpoint):
    return baby_checkpoint("qwen3_moe", mar=True, **SIZES)


@pytest.fixture(scope="module")
def want(checkpoint):
    return [o.outputs[0].token_ids for o in LLM(checkpoint, dtype="float32").generate(PROMPTS, GREEDY)]


def test_below_the_minimum_llm_names_it(checkpoint):
    with pytest.raises(ConfigError, match=r"expert_cache=0.2 holds 6 of the model's 32 experts; the minimum is 8 "
                                          r"\(expert_cache=0.25, expert_cache_gb=.*\): one decode step's 2 experts x "
                                          r"4 MoE layers, and at least one layer's 8"):
        LLM(checkpoint, dtype="float32", expert_cache=0.2)
    with pytest.raises(ConfigError, match="expert_cache_gb=1e-05 holds 0 of the model's 32 experts; the minimum is 8"):
        LLM(checkpoint, dtype="float32", expert_cache_gb=0.00001)


def test_below_the_minimum_cli_exits_1_in_one_line(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "hi", "--expert-cache", "0.1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("marserve: error: expert_cache=0.1 holds 3") and "the minimum is 8" in err


@pytest.mark.parametrize("kw,message", [
    (dict(expert_cache=0), "expert_cache is a share"), (dict(expert_cache=1.5), "expert_cache is a share"),
    (dict(expert_cache_gb=-1.0), "expert_cache_gb must be positive"),
    (dict(expert_cache=0.5, expert_cache_gb=1.0), "not both"),
    (dict(expert_policy="fifo"), "expert_policy 'fifo' is not one of lru, lfu, mar")])
def test_knobs_are_validated(kw, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(model="x", **kw)


def test_cli_flags_reach_the_engine(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "The quick brown fox", "--temperature", "0",
                 "--max-tokens", "10", "--expert-cache", "0.25", "--expert-policy", "mar", "--no-prefetch",
                 "--quiet"]) == 0
    offloaded = capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--prompt", "The quick brown fox", "--temperature", "0",
                 "--max-tokens", "10", "--quiet"]) == 0
    assert capsys.readouterr().out == offloaded


def test_two_threads_on_one_offloading_llm(checkpoint, want):
    llm = LLM(checkpoint, dtype="float32", expert_cache=0.25, expert_policy="mar")
    install_random_prefetcher(llm)
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(2):
                results.setdefault(i, []).append(
                    [o.outputs[0].token_ids for o in llm.generate(PROMPTS[i::2], GREEDY, use_tqdm=False)])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(2):
        assert results[i] == [want[i::2]] * 2
    assert sum(s.misses for s in llm.engine.expert_store.stats.values()) > 0


def test_corrupt_reads_are_read_again_and_text_is_unchanged(checkpoint, want):
    llm = LLM(checkpoint, dtype="float32", expert_cache=0.25)
    reads, damaged, lock = [], set(), threading.Lock()

    index = llm.engine.expert_store.index
    expert_of = {p: (layer, e) for layer, per in index.pieces.items() for e, pieces in enumerate(per) for p in pieces}

    def every_third_piece_once(piece, view):  # an expert is damaged at most once, so its re-read (which sees all
        with lock:                            # its pieces again) comes back clean; reads run on the prefetch threads
            reads.append(piece)               # too, interleaving theirs: hence per expert, and locked
            if expert_of[piece] not in damaged and len(reads) % 3 == 1:
                damaged.add(expert_of[piece])
                view[len(view) // 2] ^= 0x10

    llm.engine.expert_store.fault_hook = every_third_piece_once
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert len(damaged) > 1


def test_a_read_that_stays_corrupt_fails_the_request_not_the_text(checkpoint):
    llm = LLM(checkpoint, dtype="float32", expert_cache=0.25)

    def always(piece, view):
        view[0] ^= 0x01

    llm.engine.expert_store.fault_hook = always
    out = llm.generate(PROMPTS, GREEDY)
    assert all(o.error and o.outputs[0].finish_reason == "error" for o in out)
    llm.engine.expert_store.fault_hook = None  # the store recovers: slots were given back
    assert llm.generate(PROMPTS[:1], GREEDY)[0].error is None


def test_async_engine_stats_sum_the_layers(checkpoint):
    from marserve.engine.async_engine import AsyncEngine
    engine = AsyncEngine.from_config(EngineConfig(model=checkpoint, dtype="float32", expert_cache=0.5))
    try:
        engine.engine.add_request("r", "The quick brown fox", GREEDY)
        while engine.engine.has_unfinished:
            engine.engine.step()
        stats = engine.stats().expert_cache
        assert [s.layer_idx for s in stats] == [0, 1, 2, 3]
        assert sum(s.misses for s in stats) > 0 and sum(s.bytes_moved for s in stats) > 0
        from marserve_server.metrics import _EngineCollector  # what /metrics renders, one series per layer
        families = {f.name: f for f in _EngineCollector(engine, "m").collect()}
        misses = {s.labels["layer"]: s.value for s in families["marserve:expert_cache_misses"].samples}
        assert set(misses) == {"0", "1", "2", "3"} and sum(misses.values()) == sum(s.misses for s in stats)
        assert 0 < families["marserve:expert_cache_hit_rate"].samples[0].value < 1
    finally:
        engine.engine.expert_store.close()
