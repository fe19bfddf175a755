import torch

from marserve.attention import AttentionMetadata
from marserve.loader import load_model
from marserve.engine.model_runner import ModelRunner, ScheduledChunk


def test_execute_matches_dense_forward_over_prefill_chunks_and_decode(baby_checkpoint):
    model, cfg = load_model(baby_checkpoint("qwen3_moe"), dtype="float32")
    runner = ModelRunner(model, cfg, block_size=4, num_blocks=32)
    g = torch.Generator().manual_seed(0)
    seq_a = torch.randint(0, cfg.vocab_size, (11,), generator=g).tolist()
    seq_b = torch.randint(0, cfg.vocab_size, (7,), generator=g).tolist()
    table_a, table_b = [5, 2, 9], [30, 1]  # scattered blocks

    def dense_last_logits(seq):
        with torch.inference_mode():
            h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.dense([len(seq)]))
            return model.compute_logits(h[-1:]).float()

    # step 1: a's first prefill chunk (no logits) + b's whole prompt but its last token
    out = runner.execute([ScheduledChunk(seq_a[:6], 0, table_a, False), ScheduledChunk(seq_b[:6], 0, table_b, True)])
    torch.testing.assert_close(out, dense_last_logits(seq_b[:6]), atol=1e-4, rtol=1e-4)
    # step 2: rest of a's prompt (chunked prefill) + b's decode of its 7th token
    out = runner.execute([ScheduledChunk(seq_a[6:10], 6, table_a, True), ScheduledChunk(seq_b[6:7], 6, table_b, True)])
    torch.testing.assert_close(out[0:1], dense_last_logits(seq_a[:10]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:2], dense_last_logits(seq_b), atol=1e-4, rtol=1e-4)
    # step 3: a decodes alone
    out = runner.execute([ScheduledChunk(seq_a[10:11], 10, table_a, True)])
    torch.testing.assert_close(out, dense_last_logits(seq_a), atol=1e-4, rtol=1e-4)


def test_kv_cache_sizing(baby_checkpoint):
    model, cfg = load_model(baby_checkpoint("qwen3_moe"), dtype="float32")
    per_block = ModelRunner.bytes_per_block(cfg, 16, torch.float32)
    assert per_block == 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert ModelRunner.num_blocks_for_budget(cfg, 16, per_block * 10 + 1, torch.float32) == 10
