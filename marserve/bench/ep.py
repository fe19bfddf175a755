"""`marserve bench ep`: expert parallelism measured here (tokens/s and bytes between ranks at 1, 2 and 4 gloo
ranks) and modelled for 8 GPUs by replaying a routing trace (local share and all-to-all time per token,
round_robin vs mar, at the sizes of Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V2-Lite).

Legend: T=tokens, K=experts per token, N=ranks, H=hidden.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from marserve import progress
from marserve.engine.local_launch import spawn_ranks
from marserve.experts import placement as pl
from marserve.experts import placement_eval as pe


@dataclass
class ModelShape:
    """A published model's MoE shape (from its config.json): what the replay scales the trace to."""

    name: str
    hidden: int
    moe_layers: int
    experts: int
    top_k: int
    expert_intermediate: int


SHAPES = [ModelShape("Mixtral-8x7B", 4096, 32, 8, 2, 14336),
          ModelShape("Qwen3-30B-A3B", 2048, 48, 128, 8, 768),
          ModelShape("DeepSeek-V2-Lite", 2048, 26, 64, 6, 1408)]  # 27 layers, the first dense
NVLINK_BPS = 450e9  # per GPU, within a node
IB_BPS = 50e9  # per GPU (one 400 Gb/s NIC each), across nodes
TOPOLOGIES = {"1 node x 8 GPUs (NVLink)": 8, "2 nodes x 4 GPUs (NVLink + IB)": 4}  # name -> GPUs per node


def _prompts(n: int, chars: int = 200) -> list[str]:
    """n prompts cut from the held-out text of every domain in turn."""
    from marserve.analysis.routing import load_prompts
    texts = ["".join(t) for t in load_prompts(None).values()]
    return [texts[i % len(texts)][(i // len(texts)) * chars:(i // len(texts) + 1) * chars] for i in range(n)]


def _measure(model: str, size: int, transport: str, placement: str, prompts_file: Path, max_tokens: int,
             dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        procs = spawn_ranks(["-m", "marserve.bench.ep_worker", model, str(size), transport, placement,
                             str(prompts_file), str(max_tokens), str(out), dtype], size)
        codes = [p.wait() for p in procs]
        if any(codes) or not out.exists():
            raise RuntimeError(f"bench ep: a run at {size} ranks failed (exit codes {codes})")
        return json.loads(out.read_text())


def measured_runs(model: str, ranks: list[int], num_prompts: int, max_tokens: int, dtype: str) -> list[dict]:
    configs = [(1, "all_to_all", "mar")]
    for n in ranks:
        if n > 1:
            configs += [(n, "all_to_all", "mar"), (n, "all_to_all", "round_robin"), (n, "gather", "mar")]
    with tempfile.TemporaryDirectory() as d:
        prompts_file = Path(d) / "prompts.json"
        prompts_file.write_text(json.dumps(_prompts(num_prompts)))
        return [_measure(model, n, t, p, prompts_file, max_tokens, dtype)
                for n, t, p in progress.bar(configs, desc="bench ep: runs", unit="run")]


def modelled_time(placement: pl.Placement, ids: list[torch.Tensor], lengths: list[int], hidden: int,
                  gpus_per_node: int, element_size: int = 2) -> float:
    """All-to-all seconds per token per MoE layer: each pass (window) of the trace is one batch; a rank's time
    is its slowest link (NVLink and IB in parallel); the layer waits for the slowest rank."""
    N = placement.num_ranks
    node = torch.arange(N) // gpus_per_node
    total, start = 0.0, 0
    for n in lengths:
        window = [t[start:start + n] for t in ids]
        ranks = pe.token_ranks(placement, window, torch.arange(n) * N // n)
        for l, (t, home) in enumerate(zip(window, ranks)):
            dest = torch.zeros(n, N, dtype=torch.bool).scatter_(1, placement.ranks[l][t.long()], True)
            dest.scatter_(1, home[:, None], False)
            pairs = torch.zeros(N, N)  # [src, dst] rows sent at dispatch (the combine sends as many back)
            pairs.index_put_((home[:, None].expand(-1, N)[dest], dest.nonzero()[:, 1]), torch.ones(int(dest.sum())),
                             accumulate=True)
            rows = pairs + pairs.T  # out of each rank: its dispatch rows, then the partials it returns
            same = node[:, None] == node[None, :]
            nv = (rows * same).sum(1) * hidden * element_size
            ib = (rows * ~same).sum(1) * hidden * element_size
            total += float(torch.maximum(nv / NVLINK_BPS, ib / IB_BPS).max())
        start += n
    return total / (sum(lengths) * len(ids))


def replay(model: str, num_ranks: int = 8, seq_len: int = 256, max_tokens: int = 8192) -> list[dict]:
    """Trace of `model` on held-out text (first half calibrates `mar`, second half is replayed)."""
    from marserve.loader import load_model, load_tokenizer
    with progress.stage("recording the routing trace"):
        m, config = load_model(model, dtype="float32")
        calib_w, measure_w = pe.heldout_windows(load_tokenizer(model), seq_len, max_tokens)
        calib, trace = pe.record_trace(m, calib_w), pe.record_trace(m, measure_w)
    E, lengths = config.num_experts, [len(w) for w in measure_w]
    if num_ranks > E:
        raise ValueError(f"the trace has {E} experts per layer: at most {E} ranks")
    placements = [pl.round_robin(len(trace), E, num_ranks), pl.mar(pl.RoutingStats.from_trace(calib, E), num_ranks)]
    first = pe.first_layer_ranks(lengths, num_ranks)
    rows = []
    for shape in SHAPES:
        for topo, per_node in TOPOLOGIES.items():
            for p in placements:
                metrics = pe.evaluate(p, trace, first, shape.hidden, 2)
                per_layer = modelled_time(p, trace, lengths, shape.hidden, per_node)
                rows.append({"model": shape.name, "topology": topo, "placement": p.name,
                             "local_share": metrics.local_share,
                             "bytes_per_token": metrics.bytes_per_token / len(trace) * shape.moe_layers,
                             "a2a_us_per_token": per_layer * shape.moe_layers * 1e6,
                             "expert_gb_per_rank": shape.moe_layers * shape.experts / num_ranks * 3 * shape.hidden
                             * shape.expert_intermediate * 2 / 1e9})
    return rows


def run(args) -> int:
    from marserve_kernels import cpu_features
    from marserve.commands.generate import resolve_model_dir
    model = str(resolve_model_dir(None if args.model == "default" else args.model))
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"command: marserve bench ep {' '.join(sys.argv[3:])}".rstrip())
    print(f"host: {cpu_features.describe()}; {torch.get_num_threads()} torch threads in this process; every rank "
          "runs on these cores (LOCAL_WORLD_SIZE ranks split them: 2 cores = 1 thread per rank at 2 ranks, "
          "4 ranks oversubscribe)")
    if not args.skip_measure:
        runs = measured_runs(model, ranks, args.prompts, args.max_tokens, args.dtype)
        base = runs[0]
        print(f"\nmeasured on this host: {model}, dtype {args.dtype}, {args.prompts} prompts x {args.max_tokens} "
              "greedy tokens, gloo; a2a = dispatch + combine bytes between ranks (all ranks), all_reduce = the "
              "replication all_reduce input per rank (gather: both all_reduces)")
        print(f"{'ranks':>5} {'transport':<10} {'placement':<12} {'tok/s':>7} {'local':>6} {'a2a B/token':>12} "
              f"{'all_reduce B/token':>19} {'same outputs':>12}")
        for r in runs:
            print(f"{r['ranks']:>5} {r['transport']:<10} {r['placement']:<12} {r['tokens_per_s']:>7.1f} "
                  f"{r['local_share']:>6.3f} {r['bytes_sent_per_token']:>12.0f} {r['bytes_replicated_per_token']:>19.0f}"
                  f" {'yes' if r['outputs'] == base['outputs'] else 'no':>12}")
    rows = replay(model, args.replay_ranks)
    print(f"\ntrace replay over {args.replay_ranks} GPUs (routing of {Path(model).name} on held-out text, "
          f"NVLink {NVLINK_BPS / 1e9:.0f} GB/s, IB {IB_BPS / 1e9:.0f} GB/s per GPU, bf16 activations)")
    print(f"{'model':<17} {'topology':<31} {'placement':<12} {'local':>6} {'KB/token':>9} {'a2a us/token':>13} "
          f"{'expert GB/GPU':>14}")
    for r in rows:
        print(f"{r['model']:<17} {r['topology']:<31} {r['placement']:<12} {r['local_share']:>6.3f} "
              f"{r['bytes_per_token'] / 1e3:>9.1f} {r['a2a_us_per_token']:>13.2f} {r['expert_gb_per_rank']:>14.1f}")
    return 0
