"""Builds tiny random checkpoints of every supported architecture (transformers weights + BPE tokenizer) for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Fixed local text the baby tokenizer is trained on (no downloads in tests).
TEXT = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few "
    "experts, and memory aware routing keeps the choice consistent from step to step. Experts that "
    "see the same kind of token become specialists: one learns numbers like 1 2 3 4 5 6 7 8 9 0, "
    "another learns code such as def f(x): return x + 1, a third learns plain prose about rivers, "
    "mountains, cities and the weather. The server batches requests, caches keys and values in "
    "blocks, and streams tokens back to the user. Hello world! How are you today? I am fine, thanks."
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return tok


def _config(model_type: str, vocab_size: int, hidden_size: int, num_layers: int, num_experts: int,
            top_k: int, ids: dict, extra: dict):
    from transformers import AutoConfig
    heads = 4
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                  num_experts_per_tok=top_k, rms_norm_eps=1e-6, tie_word_embeddings=False, **ids)
    inter = hidden_size * 2
    if model_type == "mixtral":
        kw = dict(intermediate_size=inter, num_local_experts=num_experts)
    elif model_type == "qwen2_moe":
        kw = dict(intermediate_size=inter, moe_intermediate_size=inter, num_experts=num_experts,
                  shared_expert_intermediate_size=inter * 2, norm_topk_prob=False)
    elif model_type == "qwen3_moe":
        kw = dict(intermediate_size=inter, moe_intermediate_size=inter, num_experts=num_experts,
                  norm_topk_prob=True, head_dim=hidden_size // heads)
    elif model_type == "olmoe":
        kw = dict(intermediate_size=inter, num_experts=num_experts, norm_topk_prob=False)
    else:
        raise ValueError(f"unknown model_type {model_type!r}; baby models exist for {MODEL_TYPES}")
    kw.update(common)
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def make_baby_checkpoint(path, model_type: str, *, mar: bool = False, affinity_scale: float = 1.0,
                         memory_slots: int = 4, mar_layers: list[int] | None = None, sharded: bool = False,
                         hidden_size: int = 32, num_layers: int = 2, num_experts: int = 4, top_k: int = 2,
                         vocab_size: int = 320, seed: int = 0, dtype: str = "float32",
                         config_overrides: dict | None = None) -> Path:
    """Save a random transformers model of `model_type` with tokenizer, generation config and optional MAR tensors.

    The tokenizer is trained to exactly `vocab_size` entries (raises if the text cannot fill it).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"baby tokenizer reached {tok.get_vocab_size()} tokens, not {vocab_size}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    # transformers 5 writes the template to chat_template.jinja; the spec also wants it in tokenizer_config.json.
    tc_path = path / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2))
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)

    torch.manual_seed(seed)
    config = _config(model_type, vocab_size, hidden_size, num_layers, num_experts, top_k, ids,
                     config_overrides or {})
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init with std 0.02 makes every logit ~equal; larger weights give decisive, testable routing/tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:  # norms too, so that a mixed-up norm weight shows in the logits
                p.normal_(1.0, 0.2)
    model.eval()
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "10GB")
    GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                     pad_token_id=ids["pad_token_id"], do_sample=True, temperature=0.7, top_p=0.9,
                     top_k=20, max_new_tokens=24).save_pretrained(path)
    if mar:
        _add_mar(path, model_type, config, affinity_scale, memory_slots, mar_layers, seed)
    return path


def mar_key(model_type: str, layer: int, what: str) -> str:
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.mar.{what}"


def _add_mar(path: Path, model_type: str, config, affinity_scale: float, memory_slots: int,
             mar_layers: list[int] | None, seed: int) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed + 1)
    E = getattr(config, "num_local_experts", None) or config.num_experts
    H = config.hidden_size
    layers = list(range(config.num_hidden_layers)) if mar_layers is None else mar_layers
    tensors = {}
    for i in layers:
        mem = torch.randn(E, memory_slots, H, generator=g)
        tensors[mar_key(model_type, i, "memory")] = mem / mem.norm(dim=-1, keepdim=True)
        usage = torch.rand(E, generator=g) + 0.1
        tensors[mar_key(model_type, i, "usage")] = usage / usage.sum()
    shard = "model-mar.safetensors"
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        # Single-file checkpoint: create an index covering the original file and the MAR shard.
        from safetensors import safe_open
        with safe_open(path / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["mar"] = {"version": 1, "memory_slots": memory_slots, "affinity_scale": affinity_scale,
                  "layers": mar_layers}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
