"""Shared transformer pieces of the MoE architectures: RMSNorm, rotary embeddings, GQA attention, dense MLP.

Legend: T=tokens of the pass (sequences concatenated), H=hidden, Hq/Hkv=query/key-value heads, D=head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from marserve import hugepages
from marserve.attention import AttentionMetadata, attend
from marserve_kernels import cpu_norm_native
from marserve_kernels.cpu_linear import can_pack, linear, native_available, pack
from marserve.config import ModelConfig
from marserve.errors import ConfigError


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by marserve_kernels' CPU-fast linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def pack_for_cpu(self, packed: bool | None = None) -> bool:
        """Inference only: swap the weight for its oneDNN-packed form (same memory, faster products) -
        by default only where the native few-token kernel is unavailable for its dtype: that kernel reads
        plain weights and beats packed oneDNN at decode sizes (cpu_linear's docstring has the numbers).

        Afterwards the weight is opaque: no state_dict, no autograd. Returns whether it was packed."""
        if packed is None:
            packed = not native_available(self.weight.dtype)
        if not packed or self.weight.is_mkldnn or not can_pack(self.weight):
            return False
        self.weight = nn.Parameter(pack(self.weight), requires_grad=False)
        return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream: (norm(x + residual), x + residual), the add fused with the
        norm on CPU (marserve_kernels.cpu_norm_native, which updates residual in place)."""
        weight = self.weight
        if cpu_norm_native.applies(x, weight):
            if residual is None:
                return cpu_norm_native.add_rms_norm(x, None, weight, self.eps)
            if residual.dtype is x.dtype and residual.shape == x.shape and residual.is_contiguous():
                return cpu_norm_native.add_rms_norm(x, residual, weight, self.eps), residual
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        residual = x + residual
        return rms_norm(residual, self.weight, self.eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim in float32 (as the reference implementations do), scale in x's dtype.
    weight broadcasts against x's trailing dims (e.g. [heads, D] for per-head norms of different weights)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op, the same values in float32
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2], attention factor scaling cos/sin) for the supported rope types."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        orig = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        # Long wavelengths are interpolated, short ones kept, the band between blended smoothly.
        smooth = ((orig / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > orig / low, inv / factor, inv)
        mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        return torch.where(mid, blended, out), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_positions
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1 = keep the original (high-frequency) dimension, 0 = interpolate it
        inv = (inv / factor) * (1 - keep) + inv * keep

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            if scaling.get("mscale") and scaling.get("mscale_all_dim"):
                attn = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
            else:
                attn = mscale(factor)
        return inv, float(attn)
    raise ConfigError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; tables are built lazily on the real device (the model is built on `meta`)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int):
        super().__init__()
        self.head_dim = head_dim
        self._args = (head_dim, theta, scaling, max_positions)
        with torch.device("cpu"):
            rope_inv_freq(*self._args)  # validate the rope type now, not at the first forward
        self._cache: dict = {}  # device -> (inverse frequencies, attention factor)
        self._tables: dict = {}  # dtype -> (cos, sin) [positions, D] on the CPU

    TABLE_POSITIONS = 16384  # CPU: cos/sin rows kept for positions below this (<= 16 MB at D=128, fp32)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = positions.device
        if key not in self._cache:
            with torch.device("cpu"):
                inv, attn = rope_inv_freq(*self._args)
            self._cache[key] = (inv.to(positions.device), attn)
        inv, attn = self._cache[key]
        if positions.device.type == "cpu":
            # A decode step needs a row or a few: reading them from a table costs 2 ops instead of ~8.
            table = self._tables.get(dtype)
            if table is None:
                n = min(self._args[3], self.TABLE_POSITIONS)
                table = self._tables[dtype] = self._cos_sin(torch.arange(n, device="cpu"), inv, attn, dtype)
            if positions.numel() and int(positions.max()) < table[0].shape[0]:
                return table[0].index_select(0, positions), table[1].index_select(0, positions)
        return self._cos_sin(positions, inv, attn, dtype)

    @staticmethod
    def _cos_sin(positions: torch.Tensor, inv: torch.Tensor, attn: float, dtype: torch.dtype):
        freqs = positions.float()[:, None] * inv[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * attn).to(dtype), (emb.sin() * attn).to(dtype)


class Attention(nn.Module):
    """GQA self-attention. qk_norm: None, "head" (per-head RMSNorm, qwen3_moe) or "full" (whole projection, olmoe)."""

    def __init__(self, config: ModelConfig, layer_idx: int, qk_norm: str | None = None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, c.rms_norm_eps)
        self.clip_qkv = c.clip_qkv
        self.scale = self.head_dim ** -0.5

    def fuse_qkv_for_cpu(self, packed: bool | None = None) -> bool:
        """Inference only: one [(Hq + 2 Hkv) * D, H] projection instead of three (one weight stream and
        one call per layer instead of three; the three weights are released). oneDNN-packed when `packed`,
        by default only where the native few-token kernel is unavailable (see Linear.pack_for_cpu); plain,
        on huge pages when large enough, otherwise."""
        w = self.q_proj.weight
        if packed is None:
            packed = not native_available(w.dtype)
        if hasattr(self, "qkv_proj") or w.device.type != "cpu" or w.is_mkldnn or w.dim() != 2 or (
                packed and not can_pack(w)):
            return False
        projections = (self.q_proj, self.k_proj, self.v_proj)
        rows = sum(p.weight.shape[0] for p in projections)
        weight = torch.cat([p.weight.detach() for p in projections],
                           out=hugepages.empty((rows, w.shape[1]), w.dtype))
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projections])
        fused = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(pack(weight) if packed else weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        if self.qk_norm == "head":  # one norm over the q and k heads together: each head keeps its own weight
            self.register_buffer("qk_norm_weight", torch.cat([self.q_norm.weight.detach().expand(self.num_heads, -1),
                                                              self.k_norm.weight.detach().expand(self.num_kv_heads, -1)]))
        return True

    def _fused_qkv(self, x: torch.Tensor):
        """q/k/v (unrotated) from the fused projection, with one norm over q and k together."""
        T, Hq, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        clip = self.clip_qkv
        if self.qk_norm == "full":  # olmoe: norm the whole q and k projections, then clip
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-1).view(T, Hq + Hkv, D)
            if clip is not None:
                qk, v = qk.clamp(-clip, clip), v.clamp(-clip, clip)
        else:
            if clip is not None:
                qkv = qkv.clamp(-clip, clip)
            qk = qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
            v = qkv[:, (Hq + Hkv) * D:]
            if self.qk_norm == "head":
                qk = rms_norm(qk, self.qk_norm_weight, self.q_norm.eps)
        return qk[:, :Hq], qk[:, Hq:], v.view(T, Hkv, D)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        if hasattr(self, "qkv_proj"):
            q, k, v = self._fused_qkv(x)
            out = attend(q, k, v, attn, self.layer_idx, self.scale, rotary=(cos, sin))  # [T, Hq, D]
            return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, Hq*D], [T, Hkv*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, attn, self.layer_idx, self.scale, rotary=(cos, sin))  # [T, Hq, D]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); dense layers and qwen2_moe's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
