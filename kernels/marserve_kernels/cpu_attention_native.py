"""Decode attention on CPU in one native call per layer: RoPE, KV-cache write and paged attention fused
(cpu_decode_attention.c, built at first use by native_build, once per cache dtype).

Why: at one token per sequence the torch path's work is tiny and its ~10 ops per layer (rotary embedding,
two index_copy_ into the cache, a gather of the sequence's blocks for K and for V, SDPA) cost ~70-90 us of
fixed overhead per layer on this project's CPUs, about as much as streaming the layer's attention weights.
The kernel reads K/V in place through the block table. Reference: `decode_attention_reference` (torch).
Without a compiler, or with MARSERVE_NATIVE_ATTENTION=0 (or MARSERVE_NATIVE=0), `available()` is False
and the caller keeps the torch path.
Legend: B=sequences (one new token each), Hq/Hkv=query/KV heads, D=head dim, L=tokens after this step.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from marserve_kernels import native_build
from marserve_kernels.reference import apply_rope

_SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
VARIANTS = {torch.float32: [], torch.bfloat16: ["-DCACHE_BF16"]}  # cache dtype -> build flags
SPLIT_BYTES = 2**18  # K/V bytes a step reads below which one thread does it all (a wake-up costs more)


class _Args(ctypes.Structure):
    """cpu_decode_attention.c's struct decode_args."""
    _fields_ = [(name, ctypes.c_void_p if kind == "p" else ctypes.c_float if kind == "f" else ctypes.c_int64)
                for name, kind in (("q", "p"), ("q_stride", "i"), ("k", "p"), ("k_stride", "i"), ("v", "p"),
                                   ("v_stride", "i"), ("cos", "p"), ("sin", "p"), ("k_cache", "p"),
                                   ("v_cache", "p"), ("block_tables", "p"), ("bt_stride", "i"), ("seq_lens", "p"),
                                   ("slot_mapping", "p"), ("out", "p"), ("B", "i"), ("Hq", "i"), ("Hkv", "i"),
                                   ("D", "i"), ("BS", "i"), ("scale", "f"), ("threads", "i"))]


def _declare(lib: ctypes.CDLL) -> None:
    lib.decode_attention_struct.argtypes = [ctypes.POINTER(_Args)]
    lib.decode_attention_struct.restype = ctypes.c_int


_KERNEL = native_build.Kernel(_SOURCE, VARIANTS, "MARSERVE_NATIVE_ATTENTION", _declare)


def available(cache_dtype: torch.dtype = torch.float32) -> bool:
    """True if the kernel for a cache of `cache_dtype` (fp32 or bf16) is built (building it on first call)."""
    return _KERNEL.lib(cache_dtype) is not None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for `dtype` is not built here, in one line (building it on first call), or None when it is."""
    return _KERNEL.reason(dtype)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these tensors (CPU, cache layout, GQA group of at most 16)."""
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv = k_cache.shape[2]
    return (q.device.type == "cpu" and k_cache.is_contiguous() and D % 2 == 0 and Hq % Hkv == 0
            and Hq // Hkv <= 16 and available(k_cache.dtype))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, heads, D] as fp32 with heads contiguous (a view when it already is)."""
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x


class DecodePlan:
    """What every layer of one decode pass shares (block tables, lengths, slots, rotary tables, thread
    count), converted once; `run` then calls the kernel for one layer's q/k/v and cache."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor | list[int], slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, scale: float, cache_dtype: torch.dtype, threads: int | None = None):
        self.rotary = cos  # the caller's tensor: a pass hands every layer the same one
        f32 = torch.float32
        self.cos = cos if cos.dtype is f32 and cos.is_contiguous() else cos.float().contiguous()
        self.sin = sin if sin.dtype is f32 and sin.is_contiguous() else sin.float().contiguous()
        self.tables = block_tables if block_tables.dtype == torch.int64 and block_tables.stride(-1) == 1 \
            else block_tables.to(torch.int64).contiguous()
        total = sum(seq_lens) if isinstance(seq_lens, list) else None  # a host list spares a tensor read
        self.lens = torch.tensor(seq_lens, dtype=torch.int64) if total is not None \
            else seq_lens.to(torch.int64).contiguous()
        self.slots = slot_mapping if slot_mapping.dtype is torch.int64 and slot_mapping.is_contiguous() \
            else slot_mapping.to(torch.int64).contiguous()
        B = self.lens.shape[0]
        if threads is None:
            total = int(self.lens.sum()) if total is None else total
            kv_bytes = 2 * total * num_kv_heads * head_dim * (2 if cache_dtype == torch.bfloat16 else 4)
            threads = max(1, min(torch.get_num_threads(), B * num_kv_heads, kv_bytes // SPLIT_BYTES))
        self.shape = (B, num_heads, head_dim)
        self.lib = _KERNEL.lib(cache_dtype)
        self.args = _Args(cos=self.cos.data_ptr(), sin=self.sin.data_ptr(), block_tables=self.tables.data_ptr(),
                          bt_stride=self.tables.stride(0), seq_lens=self.lens.data_ptr(),
                          slot_mapping=self.slots.data_ptr(), B=B, Hq=num_heads, Hkv=num_kv_heads, D=head_dim,
                          BS=block_size, scale=scale, threads=threads)
        self.args_ref = ctypes.byref(self.args)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] of one layer (unrotated) -> [B, Hq, D] in q's dtype."""
        qf, kf, vf = _rows(q), _rows(k), _rows(v)
        out = torch.empty(self.shape, dtype=torch.float32)
        a = self.args
        a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride = (qf.data_ptr(), qf.stride(0), kf.data_ptr(), kf.stride(0),
                                                             vf.data_ptr(), vf.stride(0))
        a.k_cache, a.v_cache, a.out = k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
        rc = self.lib.decode_attention_struct(self.args_ref)
        if rc == -2:
            raise MemoryError("native decode attention: out of memory for its score buffers")
        if rc != 0:
            raise ValueError(f"native decode attention: unsupported shape {tuple(q.shape)} over {tuple(k_cache.shape)}")
        return out if q.dtype == torch.float32 else out.to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, slot_mapping: torch.Tensor, scale: float,
                     threads: int | None = None) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, D] (new token per sequence, before RoPE), cos/sin [B, D],
    k_cache/v_cache [N, S, Hkv, D], block_tables [B, >= ceil(L/S)] int64, seq_lens [B] int64 (L),
    slot_mapping [B] int64 -> [B, Hq, D] in q's dtype; writes the rotated k and v into their slots.
    (One layer; a forward pass builds one DecodePlan and runs it for every layer.)"""
    assert supports(q, k_cache) and v_cache.dtype == k_cache.dtype and v_cache.is_contiguous()
    plan = DecodePlan(cos, sin, block_tables, seq_lens, slot_mapping, q.shape[1], k_cache.shape[2], q.shape[2],
                      k_cache.shape[1], scale, k_cache.dtype, threads)
    return plan.run(q, k, v, k_cache, v_cache)


def decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, block_tables, seq_lens, slot_mapping,
                               scale) -> torch.Tensor:
    """The definition in torch: rotate q and k, write k/v into their slots, attend over each sequence's L tokens."""
    from marserve_kernels.paged_attention import paged_attention_decode_reference, write_kv_cache_reference
    q, k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
