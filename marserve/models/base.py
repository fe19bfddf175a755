"""The decoder-only MoE causal LM every architecture shares; model files only say which pieces each layer uses.

Legend: T=tokens of the pass (sequences concatenated), H=hidden, V=vocabulary, N=positions whose logits are wanted.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from marserve.attention import AttentionMetadata
from marserve.config import ModelConfig
from marserve.models.layers import Attention, DenseMLP, Linear, RMSNorm, RotaryEmbedding
from marserve.models import native_decode
from marserve.models.moe import SparseMoeBlock

# Per-expert checkpoint names -> (stacked provider parameter, half of w13 or None).
# mixtral writes w1 (gate), w3 (up), w2 (down); the others gate_proj/up_proj/down_proj.
_EXPERT_PARTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None),
                 "gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
_PER_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = {"experts.gate_up_proj": "experts.w13", "experts.down_proj": "experts.w2"}


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qk_norm: str | None, moe_name: str):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, qk_norm)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe_name = moe_name
        if config.is_moe_layer(layer_idx):
            block = SparseMoeBlock(config, layer_idx)
        else:
            block = DenseMLP(config.hidden_size, config.intermediate_size)
        setattr(self, moe_name, block)

    def forward(self, x, residual, cos, sin, attn: AttentionMetadata):
        """x: the previous block's output; residual: the stream before it (None at the first layer, where x
        is the embeddings). Returns (this layer's MoE output, the stream before it): the adds happen in
        the norms, fused with them. CPU decode passes take native_decode's one-call attention half."""
        if attn.is_paged and native_decode.pass_applies(x, attn):
            kernel = native_decode.layer_kernel(self, x.dtype)
            if kernel is not None:
                return native_decode.run_layer(self, kernel, x, residual, cos, sin, attn)
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, attn), residual)
        return getattr(self, self.moe_name)(h), residual


class MoeBackbone(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: str | None, moe_name: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, qk_norm, moe_name)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)


class MoeForCausalLM(nn.Module):
    """Base of <Arch>ForCausalLM: forward(input_ids [T], positions [T], attn) -> hidden [T,H]; compute_logits."""

    qk_norm: str | None = None  # "head" (qwen3_moe), "full" (olmoe) or None
    moe_name: str = "mlp"  # the MoE block's name in checkpoint tensor names

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MoeBackbone(config, self.qk_norm, self.moe_name)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T,H]
        cos, sin = self.model.rotary(positions, x.dtype)
        if attn.is_paged and native_decode.pass_applies(x, attn):  # CPU decode: the layers in one native call
            stack = native_decode.stack_for(self, x.dtype, x.shape[0])
            if stack is not None:
                return self.model.norm(*native_decode.run_stack(self, stack, x, cos, sin, attn))[0]
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N,H] -> logits [N,V]."""
        return self.lm_head(hidden)

    def pack_for_cpu(self, packed: bool | None = None) -> int:
        """Inference on CPU: fuse each layer's q/k/v into one projection, and oneDNN-pack every Linear's
        weight if `packed` - by default only where the native few-token kernel is unavailable for the
        weight's dtype (MARSERVE_NATIVE_DENSE=0, no compiler): it reads plain weights, and a weight is kept
        in one layout only (see layers.Linear.pack_for_cpu and cpu_linear's docstring for the numbers).

        A weight shared with another module (a tied lm_head) stays plain: packing would copy it.
        Returns how many were packed."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_qkv_for_cpu(packed)
        users: dict[int, int] = {}
        for m in self.modules():
            for p in m.parameters(recurse=False):
                users[id(p)] = users.get(id(p), 0) + 1
        return sum(m.pack_for_cpu(packed) for m in self.modules()
                   if isinstance(m, Linear) and users[id(m.weight)] == 1)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The sparse MoE blocks in layer order (dense-MLP layers skipped)."""
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def checkpoint_target(self, name: str) -> tuple[str, int | None, int | None]:
        """Map a checkpoint tensor name to (our parameter/buffer name, expert index, w13 half).

        Expert index / half are None when the tensor fills the whole target.
        """
        other = "mlp" if self.moe_name == "block_sparse_moe" else "block_sparse_moe"
        name = name.replace(f".{other}.", f".{self.moe_name}.")  # accept either block name on disk
        m = _PER_EXPERT.match(name)
        if m:
            target, half = _EXPERT_PARTS[m.group(3)]
            return f"{m.group(1)}.experts.{target}", int(m.group(2)), half
        for fused, ours in _FUSED.items():
            if name.endswith("." + fused):
                return name[: -len(fused)] + ours, None, None
        if name.endswith(".mar.memory") or name.endswith(".mar.usage"):
            return name[: -len(".mar.memory" if name.endswith("memory") else ".mar.usage")] + \
                (".mar_memory" if name.endswith("memory") else ".mar_usage"), None, None
        return name, None, None
