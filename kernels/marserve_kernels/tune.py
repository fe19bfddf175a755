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


def sweep(time_config, token_counts: list[int], configs: list[dict]) -> dict[str, dict]:
    """{"M": fastest config} for each token count M; time_config(M, cfg) -> ms. Configs that fail to
    launch (too much shared memory, too many registers) are skipped; a count where all fail is an error."""
    best = {}
    for M in token_counts:
        timings, last_error = [], None
        for cfg in configs:
            try:
                timings.append((time_config(M, cfg), cfg))
            except Exception as e:  # noqa: BLE001 - resource limits surface as various compiler/runtime errors
                last_error = e
        if not timings:
            raise RuntimeError(f"no candidate config ran for M={M}; the last failure: {last_error!r}")
        ms, cfg = min(timings, key=lambda t: t[0])
        best[str(M)] = cfg
        print(f"M={M}: {ms:.3f} ms with {cfg}")
    return best


def write_configs(best: dict[str, dict], out_dir: Path, E: int, N: int, device: str, dtype: torch.dtype) -> Path:
    """The JSON file fused_moe_config reads for (E, N, device, dtype)."""
    path = out_dir / config_file_name(E, N, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(best, indent=2) + "\n")
    return path


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
    from marserve_kernels.reference import moe_reference
    dtype = DTYPES[args.dtype]
    E, H, I, K = args.experts, args.hidden, args.intermediate, args.top_k
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=dtype) / I**0.5
    inputs = {}

    def time_config(M: int, cfg: dict) -> float:
        if M not in inputs:
            ids = torch.rand(M, E, device="cuda").topk(K, dim=-1).indices  # K distinct experts per token
            w = torch.softmax(torch.randn(M, K, device="cuda"), -1)
            inputs[M] = (torch.randn(M, H, device="cuda", dtype=dtype), w, ids)
        x, w, ids = inputs[M]
        return _time(lambda: fused_moe(x, w13, w2, w, ids, config=cfg), args.repeats)

    best = sweep(time_config, [int(t) for t in args.tokens.split(",")], list(candidates()))
    # A fast config is kept only if it is also right: check each winner once against the reference.
    for M, cfg in best.items():
        x, w, ids = inputs[int(M)]
        want = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
        err = (fused_moe(x, w13, w2, w, ids, config=cfg).float() - want).abs().max().item()
        if err > 5e-2 * max(1.0, want.abs().max().item()):
            print(f"M={M}: {cfg} is off by {err:.3g} against the reference; not writing", file=sys.stderr)
            return 1
    path = write_configs(best, args.out_dir, E, I, device_name("cuda"), dtype)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
