"""Block sizes, warps and stages for fused_moe, per (E, N, device, dtype), from JSON files keyed by token count.

A file configs/E={E},N={N},device_name={device},dtype={dtype}.json maps token counts ("1", "16",
"256", ...) to {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages"}; the
entry whose count is nearest the call's token count is used. `python -m marserve_kernels.tune`
writes such files on a GPU. Without a file (CPU, the Triton interpreter, an untuned GPU) a default
scaled to the token count is used. N is the expert intermediate size I.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_file_name(E: int, N: int, device: str, dtype: torch.dtype) -> str:
    return f"E={E},N={N},device_name={device},dtype={_DTYPES.get(dtype, str(dtype))}.json"


BLOCK_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")


def check_config(cfg: dict, source: str = "config") -> dict:
    """The config if the kernels can run it; else a ValueError naming the source and the bad entry.

    Block sizes are powers of two >= 16 (tl.dot's smallest tile side); other keys (a GROUP_SIZE_M
    from another project's file, say) are ignored by the launch."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected an object with {', '.join(BLOCK_KEYS)}, got {cfg!r}")
    for key in BLOCK_KEYS:
        v = cfg.get(key)
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{source}: {key}={v!r} must be a power of two >= 16")
    for key, low, high in (("num_warps", 1, 32), ("num_stages", 1, 8)):
        v = cfg.get(key, low)
        if not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"{source}: {key}={v!r} must be an integer in {low}..{high}")
    if cfg.get("num_warps", 1) & (cfg.get("num_warps", 1) - 1):
        raise ValueError(f"{source}: num_warps={cfg['num_warps']} must be a power of two")
    return cfg


@functools.lru_cache(maxsize=64)
def _load(path: str) -> dict[int, dict] | None:
    p = Path(path)
    if not p.is_file():
        return None
    table = {}
    for key, cfg in json.loads(p.read_text()).items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"{p}: key {key!r} must be a token count (a positive integer as a string)")
        table[int(key)] = check_config(cfg, f"{p} [{key}]")
    if not table:
        raise ValueError(f"{p}: no token counts in the file; delete it or rerun python -m marserve_kernels.tune")
    return table


def default_config(M: int, E: int, device_type: str = "cuda") -> dict:
    """Small row blocks when few pairs reach each expert, larger when many do."""
    pairs_per_expert = max(1, M // max(E, 1))
    if device_type != "cuda":  # the interpreter: small tiles keep the emulation quick
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}
    if pairs_per_expert <= 16:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_warps": 4, "num_stages": 4}
    if pairs_per_expert <= 128:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "num_warps": 8, "num_stages": 3}


def get_config(E: int, N: int, dtype: torch.dtype, M: int, device: torch.device | str = "cuda",
               config_dir: Path | None = None) -> dict:
    """The tuned config nearest to M tokens for this shape, device and dtype, or the default."""
    name = device_name(device)
    table = _load(str((config_dir or CONFIG_DIR) / config_file_name(E, N, name, dtype)))
    if table is not None:
        return dict(table[min(table, key=lambda m: abs(m - M))])
    return default_config(M, E, torch.device(device).type)
