"""Tune fused_moe's block sizes on this GPU and write the JSON that fused_moe_config reads.

    python -m marserve_kernels.tune --experts 32 --hidden 1024 --intermediate 2816 --top-k 2 --dtype bf16

For each token count it times every candidate config (CUDA events, best of --repeats) and keeps the
fastest. It needs a CUDA GPU: elsewhere it says so and exits with status 2 (the Triton interpreter
on CPU would time Python, not the kernel).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from marserve_kernels.fused_moe_config import CONFIG_DIR, config_file_name, device_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKEN_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def candidates():
    for bm, bn, bk, warps, stages in itertools.product([16, 32, 64, 128], [32, 64, 128, 256], [32, 64, 128],
                                                       [4, 8], [2, 3, 4, 5]):
        yield {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "num_warps": warps, "num_stages": stages}


def _time(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m marserve_kernels.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tokens", default=",".join(map(str, TOKEN_COUNTS)))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("marserve_kernels.tune: no CUDA GPU here; tuning times the kernels on the GPU they will run on "
              "(the CPU interpreter would time Python). Run it on the serving GPU.", file=sys.stderr)
        return 2
    from marserve_kernels.fused_moe_triton import fused_moe
    dtype = DTYPES[args.dtype]
    E, H, I, K = args.experts, args.hidden, args.intermediate, args.top_k
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=dtype) / I**0.5
    best = {}
    for M in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(M, H, device="cuda", dtype=dtype)
        ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(M)])
        w = torch.softmax(torch.randn(M, K, device="cuda"), -1)
        timings = []
        for cfg in candidates():
            try:
                timings.append((_time(lambda: fused_moe(x, w13, w2, w, ids, config=cfg), args.repeats), cfg))
            except Exception:  # noqa: BLE001 - configs that exceed shared memory or registers are skipped
                continue
        ms, cfg = min(timings, key=lambda t: t[0])
        best[str(M)] = cfg
        print(f"M={M}: {ms:.3f} ms with {cfg}")
    path = args.out_dir / config_file_name(E, I, device_name("cuda"), dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(best, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
