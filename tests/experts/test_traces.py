"""Routing traces: the recorder sees every token of every MoE layer, chains politely onto an observer already
installed (the prefetcher's hook), and a saved trace loads back identical."""

import numpy as np
import pytest

from marserve import LLM
from marserve.errors import ConfigError
from marserve.experts.traces import RoutingTrace, TraceRecorder, record_text_trace


def test_recorder_records_every_token_and_keeps_the_previous_observer(baby_checkpoint, tmp_path):
    path = baby_checkpoint("qwen3_moe", mar=True, num_layers=2, num_experts=4, top_k=2)
    llm = LLM(path, dtype="float32", enable_prefix_caching=False, kv_cache_gb=0.05)
    blocks = llm.model.moe_blocks()
    seen = []
    for b in blocks:  # stands for the prefetcher's observer
        b.routing_observer = lambda layer, x, z, ids, w: seen.append((layer, ids.shape[0]))
    before = [b.routing_observer for b in blocks]
    windows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    trace = record_text_trace(llm, windows, note="test")
    assert [b.routing_observer for b in blocks] == before  # uninstalled: the previous observers are back
    assert trace.topk_ids.shape == (8, 2, 2)  # 5 + 3 tokens, 2 MoE layers, top-2
    assert trace.router_inputs.shape == (8, 2, 32)
    assert trace.step.tolist() == [0] * 5 + [1] * 3  # one prefill pass per window
    assert sorted(seen) == sorted([(b.layer_idx, 5) for b in blocks] + [(b.layer_idx, 3) for b in blocks])
    assert trace.usage.shape == (2, 4)  # a MAR checkpoint: the blocks' mar_usage is the prior
    # the recorded ids are the router's own top-k on the recorded inputs
    import torch
    for i, b in enumerate(blocks):
        z = b.router_logits(torch.from_numpy(trace.router_inputs[:, i].astype(np.float32)))
        top = torch.topk(z.float(), 2, dim=-1).indices.sort(dim=-1).values.numpy()
        assert (np.sort(trace.topk_ids[:, i], axis=-1) == top).mean() > 0.9  # fp16 inputs: near-ties may flip

    trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(back.topk_ids, trace.topk_ids) and np.array_equal(back.step, trace.step)
    assert back.layer_ids == trace.layer_ids and back.num_experts == 4 and back.meta == {"note": "test"}
    assert np.array_equal(back.router_inputs, trace.router_inputs) and np.allclose(back.usage, trace.usage)


def test_bad_traces_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        RoutingTrace(topk_ids=np.array([[[4]]]), num_experts=4, layer_ids=[0])
    (tmp_path / "x.npz").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="cannot read"):
        RoutingTrace.load(tmp_path / "x.npz")


def test_nothing_recorded_is_a_config_error(baby_checkpoint):
    llm = LLM(baby_checkpoint("mixtral", num_layers=2, num_experts=4, top_k=2), dtype="float32", kv_cache_gb=0.05)
    with pytest.raises(ConfigError, match="nothing was recorded"):
        TraceRecorder(llm.model).trace()
