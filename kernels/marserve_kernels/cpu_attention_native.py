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

_SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
VARIANTS = {torch.float32: [], torch.bfloat16: ["-DCACHE_BF16"]}  # cache dtype -> build flags
SPLIT_BYTES = 2**18  # K/V bytes a step reads below which one thread does it all (a wake-up costs more)
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}


def _load(dtype: torch.dtype) -> ctypes.CDLL | None:
    lib = native_build.load(_SOURCE, str(dtype).replace("torch.", ""), VARIANTS[dtype],
                            switch="MARSERVE_NATIVE_ATTENTION")
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.decode_attention.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, p, i64, p, p, p,
                                         i64, i64, i64, i64, i64, ctypes.c_float, i64]
        lib.decode_attention.restype = ctypes.c_int
    return lib


def available(cache_dtype: torch.dtype = torch.float32) -> bool:
    """True if the kernel for a cache of `cache_dtype` (fp32 or bf16) is built (building it on first call)."""
    if cache_dtype not in VARIANTS:
        return False
    if cache_dtype not in _libs:
        _libs[cache_dtype] = _load(cache_dtype)
    return _libs[cache_dtype] is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these tensors (CPU, cache layout, GQA group of at most 16)."""
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv = k_cache.shape[2]
    return (q.device.type == "cpu" and k_cache.is_contiguous() and D % 2 == 0 and Hq % Hkv == 0
            and Hq // Hkv <= 16 and available(k_cache.dtype))


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, heads, D] as fp32 with heads contiguous: (tensor to pass, token stride in elements)."""
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x, x.stride(0)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, slot_mapping: torch.Tensor, scale: float,
                     threads: int | None = None) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, D] (new token per sequence, before RoPE), cos/sin [B, D],
    k_cache/v_cache [N, S, Hkv, D], block_tables [B, >= ceil(L/S)] int64, seq_lens [B] int64 (L),
    slot_mapping [B] int64 -> [B, Hq, D] in q's dtype; writes the rotated k and v into their slots."""
    assert supports(q, k_cache) and v_cache.dtype == k_cache.dtype and v_cache.is_contiguous()
    B, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    qf, q_stride = _rows(q)
    kf, k_stride = _rows(k)
    vf, v_stride = _rows(v)
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 and block_tables.stride(-1) == 1 \
        else block_tables.to(torch.int64).contiguous()
    lens, slots = seq_lens.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous()
    out = torch.empty(B, Hq, D, dtype=torch.float32)
    if threads is None:
        kv_bytes = 2 * int(lens.sum()) * Hkv * D * k_cache.element_size()
        threads = max(1, min(torch.get_num_threads(), B * Hkv, kv_bytes // SPLIT_BYTES))
    rc = _libs[k_cache.dtype].decode_attention(
        qf.data_ptr(), q_stride, kf.data_ptr(), k_stride, vf.data_ptr(), v_stride, cos32.data_ptr(),
        sin32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), slots.data_ptr(), out.data_ptr(), B, Hq, Hkv, D, S, scale, threads)
    if rc == -2:
        raise MemoryError("native decode attention: out of memory for its score buffers")
    if rc != 0:
        raise ValueError(f"native decode attention: unsupported shape (Hq={Hq}, Hkv={Hkv}, D={D})")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]: the rotary embedding every model here uses (rotate-half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, block_tables, seq_lens, slot_mapping,
                               scale) -> torch.Tensor:
    """The definition in torch: rotate q and k, write k/v into their slots, attend over each sequence's L tokens."""
    from marserve_kernels.paged_attention import paged_attention_decode_reference, write_kv_cache_reference
    q, k = rotate_half(q.float(), cos.float(), sin.float()), rotate_half(k.float(), cos.float(), sin.float())
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
