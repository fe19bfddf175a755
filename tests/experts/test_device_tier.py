"""The device path of the expert store (device_tier.py), run on this CPU: slots filled through per-thread staging
buffers and copies (what a CUDA device does, less its stream and event calls), and the host RAM tier (every expert
read from the checkpoint once, at start; misses copied from host memory). Greedy outputs stay the resident model's,
with random prefetches and forecasts; with a host tier no read reaches the checkpoint after start. The CUDA test
runs where a GPU is present (skipped on these hosts)."""

import pytest
import torch

from marserve import LLM
from marserve.experts import offloaded
from marserve.experts.device_tier import DeviceTransfer, HostExperts
from tests.experts.random_prefetch import install_random_prefetcher
from tests.experts.test_offload_outputs import GREEDY, LONG, PROMPTS, reference  # noqa: F401 - a fixture


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def _generate(path, **kw):
    llm = LLM(path, dtype="float32", **kw)
    prefetcher = install_random_prefetcher(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert prefetcher.calls > 0
    return llm, got


@pytest.mark.parametrize("name", ["mixtral-mar-sharded", "qwen2_moe"])
@pytest.mark.parametrize("policy", ["lru", "mar"])
def test_staged_slots_give_the_resident_outputs(reference, monkeypatch, name, policy):
    monkeypatch.setattr(offloaded, "STAGED", True)
    path, want = reference(name)
    llm, got = _generate(path, expert_cache=0.25, expert_policy=policy)
    store = llm.engine.expert_store
    assert store.transfer is not None and store.host is None
    assert got == want
    stats = store.stats.values()
    assert sum(s.misses for s in stats) > 0 and sum(s.bytes_moved for s in stats) > 0


@pytest.mark.parametrize("name", ["mixtral-mar-sharded", "qwen2_moe"])
def test_the_host_tier_serves_every_miss_without_the_checkpoint(reference, monkeypatch, name):
    monkeypatch.setattr(offloaded, "HOST_TIER", "always")
    path, want = reference(name)
    llm = LLM(path, dtype="float32", expert_cache=0.25, expert_policy="mar", prefetch=True)
    store = llm.engine.expert_store
    assert store.host is not None and store.host.nbytes == len(store.index.keys) * store.w13[0].nbytes * 3 // 2

    def no_disk(*args, **kw):
        raise AssertionError("a read reached the checkpoint after start")
    store.slow.read_expert = no_disk
    prefetcher = install_random_prefetcher(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert llm.generate([PROMPTS[0]], LONG)[0].outputs[0].token_ids == \
        LLM(path, dtype="float32").generate([PROMPTS[0]], LONG)[0].outputs[0].token_ids
    stats = store.stats.values()
    assert prefetcher.calls > 0 and sum(s.misses for s in stats) > 0
    assert sum(s.bytes_moved for s in stats) % (store.w13[0].nbytes * 3 // 2) == 0 < sum(s.bytes_moved for s in stats)


def test_the_host_tier_holds_what_the_checkpoint_holds(reference, monkeypatch):
    monkeypatch.setattr(offloaded, "HOST_TIER", "always")
    path, _ = reference("mixtral")
    llm = LLM(path, dtype="float32", expert_cache=0.25)
    resident = LLM(path, dtype="float32")
    host = llm.engine.expert_store.host
    for block in resident.model.moe_blocks():
        w13, w2 = block.experts.resident()
        for e in range(w13.shape[0]):
            h13, h2 = host.rows((block.layer_idx, e))
            assert torch.equal(h13, w13[e]) and torch.equal(h2, w2[e])


def test_on_the_cpu_the_slow_tier_is_the_checkpoint_unless_asked():
    assert not offloaded.use_host_tier(torch.device("cpu"), 1)
    assert not offloaded.use_host_tier(torch.device("cuda"), 1 << 60)  # more than any host's RAM
    assert offloaded.use_host_tier(torch.device("cuda"), 1) == (offloaded._available_ram() > 0)


def test_a_transfer_copies_into_the_slot_and_its_staging_is_per_thread():
    import threading
    w13, w2 = torch.zeros(3, 4, 2), torch.zeros(3, 2, 2)
    t = DeviceTransfer(w13, w2)
    a13, a2 = t.staging()
    assert t.staging()[0] is a13 and a13.shape == (4, 2) and a2.shape == (2, 2)
    a13.fill_(1.0)
    a2.fill_(2.0)
    t.release([1])  # the CPU has no queued kernels: nothing to wait for
    t.upload(1, a13, a2)
    assert torch.equal(w13[1], a13) and torch.equal(w2[1], a2) and w13[0].abs().sum() == 0 == w13[2].abs().sum()
    other = []
    thread = threading.Thread(target=lambda: other.append(t.staging()[0]))
    thread.start()
    thread.join()
    assert other[0] is not a13
    h = HostExperts([(0, 0), (0, 1)], (4, 2), (2, 2), torch.float32, pinned=False)
    assert h.rows((0, 1))[0].shape == (4, 2) and h.nbytes == 2 * (8 + 4) * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")
@pytest.mark.parametrize("host_tier", ["always", "never"])
def test_slots_on_a_cuda_device_give_the_resident_outputs(reference, monkeypatch, host_tier):
    monkeypatch.setattr(offloaded, "HOST_TIER", host_tier)
    path, _ = reference("mixtral-mar-sharded")
    want = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", device="cuda").generate(PROMPTS, GREEDY)]
    llm = LLM(path, dtype="float32", device="cuda", expert_cache=0.25, expert_policy="mar", prefetch=True)
    assert llm.engine.expert_store.w13.device.type == "cuda"
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
