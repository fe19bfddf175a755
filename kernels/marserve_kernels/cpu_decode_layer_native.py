"""A decoder layer's attention half at decode, on CPU, in one native call (cpu_decode_layer.c): input norm
with the residual add, q/k/v projection, q/k norms and clipping, RoPE, KV-cache write, paged attention,
output projection, post-attention norm, router logits (with MAR memory affinity) and top-k routing.

Why: at one token per sequence the torch modules between two MoE calls are ~10 calls of 5-60 us each,
whose fixed costs were ~150 us per layer on the bench model (docs/benchmarks.md) against ~50 us of weight
streaming. The experts stay outside: the caller fetches them through its ExpertProvider and runs them.
Built by native_build once per dtype (fp32; bf16 = bf16 weights, cache and activations). Without a compiler,
or with MARSERVE_NATIVE_LAYER=0 (or MARSERVE_NATIVE=0), `available()` is False and callers keep the
module-by-module path. Reference: `decode_layer_reference` (torch).
Legend: B=sequences (one new token each), H=hidden, Hq/Hkv=query/KV heads, D=head dim, E=experts,
K=experts per token, S=MAR memory slots.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from marserve_kernels import native_build
from marserve_kernels.reference import apply_rope

_SOURCE = Path(__file__).with_name("cpu_decode_layer.c")
# model dtype (weights = KV cache = activations) -> build flags
VARIANTS = {torch.float32: [], torch.bfloat16: ["-DWEIGHT_BF16", "-DCACHE_BF16", "-DACT_BF16"]}
SPLIT_BYTES = 2**16  # attention weight bytes per thread below which a layer runs on fewer threads (as dense)
MOE_SPLIT_BYTES = 2**18  # the same for the expert bytes one token touches (as cpu_moe_native)
MAX_GROUP, MAX_EXPERTS = 16, 4096  # the C side's limits: query heads per KV head, experts


def _fields(spec: str) -> list[tuple[str, type]]:
    kinds = {"i": ctypes.c_int64, "f": ctypes.c_float, "p": ctypes.c_void_p}
    return [(name, kinds[kind]) for name, kind in (item.split(":") for item in spec.split())]


class _Layer(ctypes.Structure):
    """cpu_decode_layer.c's struct layer_args."""
    _fields_ = _fields("H:i Hq:i Hkv:i D:i E:i K:i S:i qk_norm:i renormalise:i threads:i eps:f qk_eps:f clip:f "
                       "mar_scale:f attn_scale:f ln1:p ln2:p qkv_bias:p q_norm:p k_norm:p qkv_w:p o_w:p gate_w:p "
                       "mar_memory:p k_cache:p v_cache:p w13:p w2:p I:i")


class _Pass(ctypes.Structure):
    """cpu_decode_layer.c's struct pass_args."""
    _fields_ = _fields("cos:p sin:p block_tables:p seq_lens:p slot_mapping:p bt_stride:i B:i BS:i xn:p qkv:p attn:p "
                       "o:p inv_norm:p moe_index:p pair_weight:p act:p moe_out:p")


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    lib.decode_layer_attention.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Pass), p, p, ctypes.c_int64,
                                           p, p, p, p]
    lib.decode_layer_attention.restype = ctypes.c_int
    lib.decode_layers.argtypes = [p, ctypes.c_int64, ctypes.POINTER(_Pass), p, p, p, p, p, p]
    lib.decode_layers.restype = ctypes.c_int


_KERNEL = native_build.Kernel(_SOURCE, VARIANTS, "MARSERVE_NATIVE_LAYER", _declare)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True if the kernel for a model of `dtype` (fp32 or bf16) is built (building it on first call)."""
    return _KERNEL.lib(dtype) is not None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for `dtype` is not built here, in one line (building it on first call), or None when it is."""
    return _KERNEL.reason(dtype)


@dataclass
class LayerWeights:
    """One decoder layer's tensors the kernel reads (the model's own; nothing is copied but small fp32 vectors)."""

    ln1: torch.Tensor  # [H] input norm
    ln2: torch.Tensor  # [H] post-attention norm
    eps: float
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H] fused projection, plain and contiguous
    o: torch.Tensor  # [H, Hq * D]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # attention's softmax scale
    qkv_bias: torch.Tensor | None = None
    qk_norm: str | None = None  # None, "head" (q_norm/k_norm [D]) or "full" (q_norm [Hq*D], k_norm [Hkv*D])
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qk_eps: float = 1e-6
    clip: float | None = None  # clip q/k/v to [-clip, clip]
    gate: torch.Tensor | None = None  # [E, H] router; None on a dense-MLP layer
    top_k: int = 0
    renormalise: bool = False
    mar_memory: torch.Tensor | None = None  # [E, S, H]
    mar_scale: float = 0.0
    # Every expert of the layer when all are resident (then the kernel runs them too): [E, 2I, H], [E, H, I]
    w13: torch.Tensor | None = None
    w2: torch.Tensor | None = None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supports(w: LayerWeights, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this layer for a model (weights, cache, activations) of `dtype`."""
    mats = [w.qkv, w.o] + [m for m in (w.gate, w.mar_memory, w.w13, w.w2) if m is not None]
    E = 0 if w.gate is None else w.gate.shape[0]
    return (all(m.dtype == dtype and m.is_contiguous() and m.device.type == "cpu" and not m.is_mkldnn for m in mats)
            and w.num_kv_heads > 0 and w.num_heads % w.num_kv_heads == 0
            and w.num_heads // w.num_kv_heads <= MAX_GROUP and w.head_dim % 2 == 0 and E <= MAX_EXPERTS
            and (E == 0 or 1 <= w.top_k <= E) and (w.w13 is None) == (w.w2 is None)
            and (w.w13 is None or (E > 0 and w.w13.shape[0] == E and w.w2.shape[0] == E))
            and available(dtype))


class DecodePass:
    """What every layer of one decode pass shares: rotary rows, block tables, lengths, slots, scratch."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
                 slot_mapping: torch.Tensor, block_size: int, hidden: int, qkv_rows: int, attn_width: int,
                 experts: int = 0, top_k: int = 0, expert_inter: int = 0):
        f32, i64 = torch.float32, torch.int64
        B = len(seq_lens)
        self.B, self.hidden, self.block_size = B, hidden, block_size
        self.scratch = torch.empty(B * (2 * hidden + qkv_rows + attn_width + 1), dtype=f32)
        xn, qkv, attn, o, inv_norm = self.scratch.split([B * hidden, B * qkv_rows, B * attn_width, B * hidden, B])
        pairs = B * top_k
        self.moe_index = torch.empty(2 * experts + 1 + pairs, dtype=i64)
        self.moe_scratch = torch.empty(pairs + pairs * expert_inter + B * hidden, dtype=f32)
        pair_weight, act, moe_out = self.moe_scratch.split([pairs, pairs * expert_inter, B * hidden])
        self.args = _Pass(B=B, BS=block_size, xn=xn.data_ptr(), qkv=qkv.data_ptr(), attn=attn.data_ptr(),
                          o=o.data_ptr(), inv_norm=inv_norm.data_ptr(), moe_index=self.moe_index.data_ptr(),
                          pair_weight=pair_weight.data_ptr(), act=act.data_ptr(), moe_out=moe_out.data_ptr())
        self.args_ref = ctypes.byref(self.args)
        self.refill(cos, sin, block_tables, seq_lens, slot_mapping)

    def refill(self, cos: torch.Tensor, sin: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
               slot_mapping: torch.Tensor) -> "DecodePass":
        """The same pass shape (B sequences, block size) for the next step: new positions, tables, lengths
        and slots; the scratch and the argument struct are kept (a decode loop makes one pass a step)."""
        f32, i64 = torch.float32, torch.int64
        assert len(seq_lens) == self.B
        self.cos, self.sin = cos.to(f32).contiguous(), sin.to(f32).contiguous()
        self.tables = block_tables.to(i64).contiguous()
        self.lens = torch.tensor(seq_lens, dtype=i64)
        self.slots = slot_mapping.to(i64).contiguous()
        self.threads = torch.get_num_threads()
        a = self.args
        a.cos, a.sin, a.block_tables, a.seq_lens, a.slot_mapping, a.bt_stride = (
            self.cos.data_ptr(), self.sin.data_ptr(), self.tables.data_ptr(), self.lens.data_ptr(),
            self.slots.data_ptr(), self.tables.stride(0))
        return self


class DecodeLayer:
    """One layer's kernel arguments, converted once; `run` does the attention half for one pass (and
    DecodeStack whole passes, when every layer's experts are resident)."""

    def __init__(self, w: LayerWeights, dtype: torch.dtype):
        assert supports(w, dtype), "call supports(weights, dtype) first"
        self.w, self.dtype = w, dtype
        self.lib = _KERNEL.lib(dtype)
        # fp32 copies of the small vectors (the kernel reads norms and biases as fp32); kept alive here
        self.ln1, self.ln2, self.bias, self.q_norm, self.k_norm = (
            _f32(t) for t in (w.ln1, w.ln2, w.qkv_bias, w.q_norm, w.k_norm))
        self.E = 0 if w.gate is None else w.gate.shape[0]
        self.K = w.top_k if self.E else 0
        self.hidden, self.qkv_rows = w.o.shape[0], w.qkv.shape[0]
        self.attn_width = w.num_heads * w.head_dim
        self.I = 0 if w.w13 is None else w.w13.shape[1] // 2
        weight_bytes = (w.qkv.numel() + w.o.numel()) * w.qkv.element_size()
        expert_bytes = self.K * 3 * self.hidden * self.I * w.qkv.element_size()  # touched by one token
        self.max_threads = max(1, weight_bytes // SPLIT_BYTES, expert_bytes // MOE_SPLIT_BYTES)
        self.args = _Layer(
            H=self.hidden, Hq=w.num_heads, Hkv=w.num_kv_heads, D=w.head_dim, E=self.E, K=self.K,
            S=0 if w.mar_memory is None else w.mar_memory.shape[1],
            qk_norm={None: 0, "head": 1, "full": 2}[w.qk_norm], renormalise=int(w.renormalise), threads=1,
            eps=w.eps, qk_eps=w.qk_eps, clip=w.clip if w.clip is not None else 0.0, mar_scale=w.mar_scale,
            attn_scale=w.scale, ln1=_ptr(self.ln1), ln2=_ptr(self.ln2), qkv_bias=_ptr(self.bias),
            q_norm=_ptr(self.q_norm), k_norm=_ptr(self.k_norm), qkv_w=w.qkv.data_ptr(), o_w=w.o.data_ptr(),
            gate_w=_ptr(w.gate), mar_memory=_ptr(w.mar_memory), w13=_ptr(w.w13), w2=_ptr(w.w2), I=self.I)
        self.args_ref = ctypes.byref(self.args)

    def new_pass(self, cos, sin, block_tables, seq_lens: list[int], slot_mapping, block_size: int) -> DecodePass:
        return DecodePass(cos, sin, block_tables, seq_lens, slot_mapping, block_size, self.hidden, self.qkv_rows,
                          self.attn_width, self.E, self.K, self.I)

    def run(self, p: DecodePass, x: torch.Tensor, residual: torch.Tensor | None, k_cache: torch.Tensor,
            v_cache: torch.Tensor):
        """x [B, H] (the previous block's output; the embeddings at the first layer, residual None) ->
        (h [B, H] the MoE block's input, residual [B, H] updated in place or new, routing) where routing is
        (router logits [B, E] fp32, topk weights [B, K] fp32, topk ids [B, K] int64), or None on a dense layer."""
        B, H = p.B, self.hidden
        if x.dtype is not self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        first = residual is None
        if first:
            residual = torch.empty((B, H), dtype=self.dtype)
        h = torch.empty((B, H), dtype=self.dtype)
        a = self.args
        a.k_cache, a.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        a.threads = min(self.max_threads, p.threads)
        routing = None
        if self.E:
            routing = (torch.empty((B, self.E), dtype=torch.float32), torch.empty((B, self.K), dtype=torch.float32),
                       torch.empty((B, self.K), dtype=torch.int64))
        z, topk_w, ids = routing or (None, None, None)
        _check(self.lib.decode_layer_attention(self.args_ref, p.args_ref, x.data_ptr(), residual.data_ptr(), first,
                                               h.data_ptr(), _ptr(z), _ptr(ids), _ptr(topk_w)))
        return h, residual, routing


def _check(rc: int) -> None:
    if rc == -2:
        raise MemoryError("native decode layer: out of memory for its score buffers")
    if rc != 0:
        raise ValueError("native decode layer: unsupported shape")


class DecodeStack:
    """Every layer of a model in one call per pass: each layer's attention half, routing and resident experts
    (cpu_decode_layer.c's decode_layers). All layers must be MoE layers with the same E and K whose DecodeLayer
    holds its experts (LayerWeights.w13/w2)."""

    def __init__(self, layers: list[DecodeLayer]):
        first = layers[0]
        if not all(layer.I and layer.E == first.E and layer.K == first.K and layer.dtype == first.dtype
                   for layer in layers):
            raise ValueError("DecodeStack needs MoE layers of one shape, each with its experts")
        self.layers, self.dtype, self.lib = layers, first.dtype, first.lib
        self.table = (ctypes.POINTER(_Layer) * len(layers))(*[ctypes.pointer(layer.args) for layer in layers])
        self._caches = None
        self._largest = max(layers, key=lambda layer: layer.I)  # sizes the pass scratch
        self._pass: DecodePass | None = None

    def new_pass(self, cos, sin, block_tables, seq_lens: list[int], slot_mapping, block_size: int) -> DecodePass:
        """The pass of this step: the previous one refilled when the batch keeps its size (its scratch reused)."""
        p = self._pass
        if p is not None and p.B == len(seq_lens) and p.block_size == block_size:
            return p.refill(cos, sin, block_tables, seq_lens, slot_mapping)
        self._pass = self._largest.new_pass(cos, sin, block_tables, seq_lens, slot_mapping, block_size)
        return self._pass

    def run(self, p: DecodePass, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """x [B, H] the embeddings -> (the last layer's MoE output [B, H], the residual stream before it [B, H],
        (router logits [n, B, E] fp32, topk weights [n, B, K] fp32, topk ids [n, B, K] int64) of every layer)."""
        n, B, H, E, K = len(self.layers), p.B, self.layers[0].hidden, self.layers[0].E, self.layers[0].K
        if kv_caches is not self._caches:  # the runner's cache list: the same object every pass
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                layer.args.k_cache, layer.args.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            self._caches = kv_caches
        for layer in self.layers:
            layer.args.threads = min(layer.max_threads, p.threads)
        if x.dtype is not self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        residual = torch.empty((B, H), dtype=self.dtype)
        out = torch.empty((B, H), dtype=self.dtype)
        z = torch.empty((n, B, E), dtype=torch.float32)
        weights = torch.empty((n, B, K), dtype=torch.float32)
        ids = torch.empty((n, B, K), dtype=torch.int64)
        _check(self.lib.decode_layers(self.table, n, p.args_ref, x.data_ptr(), residual.data_ptr(), out.data_ptr(),
                                      z.data_ptr(), ids.data_ptr(), weights.data_ptr()))
        return out, residual, (z, weights, ids)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the models compute it: fp32 statistics, the normalised value rounded to x's dtype, then scaled."""
    xf = x.float()
    return weight.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def decode_layer_reference(w: LayerWeights, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, k_cache,
                           v_cache, block_tables, seq_lens, slot_mapping):
    """The definition in torch (same contract as DecodeLayer.run; residual is not modified, a new one returned)."""
    from marserve_kernels.paged_attention import paged_attention_decode_reference, write_kv_cache_reference
    B, Hq, Hkv, D = x.shape[0], w.num_heads, w.num_kv_heads, w.head_dim
    residual = x if residual is None else x + residual
    h = _rms(residual, w.ln1, w.eps)
    qkv = F.linear(h.float(), w.qkv.float(), None if w.qkv_bias is None else w.qkv_bias.float()).to(x.dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    if w.qk_norm == "full":
        q, k = _rms(q, w.q_norm, w.qk_eps), _rms(k, w.k_norm, w.qk_eps)
        if w.clip is not None:
            q, k, v = (t.clamp(-w.clip, w.clip) for t in (q, k, v))
    else:
        if w.clip is not None:
            q, k, v = (t.clamp(-w.clip, w.clip) for t in (q, k, v))
        if w.qk_norm == "head":
            q = _rms(q.view(B, Hq, D), w.q_norm, w.qk_eps).view(B, Hq * D)
            k = _rms(k.view(B, Hkv, D), w.k_norm, w.qk_eps).view(B, Hkv * D)
    q, k, v = q.view(B, Hq, D).float(), k.view(B, Hkv, D).float(), v.view(B, Hkv, D).float()
    q, k = apply_rope(q, cos.float(), sin.float()), apply_rope(k, cos.float(), sin.float())
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    lens = torch.as_tensor(seq_lens)
    attn = paged_attention_decode_reference(q, k_cache, v_cache, block_tables, lens, w.scale).to(x.dtype)
    o = F.linear(attn.reshape(B, Hq * D).float(), w.o.float()).to(x.dtype)
    residual = o + residual
    h = _rms(residual, w.ln2, w.eps)
    if w.gate is None:
        return h, residual, None
    z = F.linear(h.float(), w.gate.float()).to(x.dtype).float()
    if w.mar_memory is not None:
        z = z + w.mar_scale * torch.einsum("th,esh->tes", F.normalize(h.float(), dim=-1),
                                           w.mar_memory.float()).amax(-1)
    top_z, ids = torch.topk(z, w.top_k, dim=-1)
    weights = torch.softmax(top_z, -1) if w.renormalise else torch.exp(top_z - torch.logsumexp(z, -1, keepdim=True))
    return h, residual, (z, weights, ids)
