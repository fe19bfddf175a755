"""marserve/bench/trace_models.py: the shapes it trains (the configs only; nothing is trained here)."""

from marserve.bench.throughput import BENCH_MODEL
from marserve.bench.trace_models import bench_shape, served_shape


def test_bench_shape_is_the_bench_models_shape_with_the_tokenizers_vocabulary():
    config = bench_shape().hf_config(eos_id=1, pad_id=0)
    assert config.model_type == "mixtral"
    for key, value in BENCH_MODEL.items():
        if key not in ("vocab_size", "max_position_embeddings"):
            assert getattr(config, key) == value, key
    assert config.vocab_size == 4096            # the shipped tokenizer's, not the random bench model's 32000
    assert config._experts_implementation == "grouped_mm"


def test_served_shape_keeps_the_served_models_routing_at_a_tiny_hidden_size():
    config = served_shape("mixtral-8x7b", hidden=64).hf_config(eos_id=1, pad_id=0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == \
        (64, 32, 8, 2)
