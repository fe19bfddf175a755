"""How well the lookahead predictors guess later layers' experts, on held-out text: precision and recall per distance.

For each predictor (router lookahead, learned), each distance d (in MoE layers) and each budget n (experts
predicted per token: the top-n scores), over every source layer that has a layer d ahead:
precision = predicted experts that the layer then picked / predicted, recall = picked experts that were predicted /
picked. Distance d from the embeddings ("embed") is the learned predictor of the d-th MoE layer from the token
alone, as the prefetcher uses it before a step starts.

Run: `marserve calibrate MODEL_DIR --eval` (calibrates on the training corpus first unless the model directory
already has mar_preferences.safetensors), or `python -m marserve.bench.prediction MODEL_DIR`.
Legend: N=held-out tokens, E=experts, K=experts per token, n=predicted per token.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from marserve.experts.predictors import LearnedLookahead, RouterLookahead
from marserve.experts.preferences import EMBED
from marserve.experts.prefetcher import top_predictions


def hits_at(scores: torch.Tensor, actual: torch.Tensor, n: int, min_prob: float = 0.0,
            learned: bool = True) -> tuple[int, int]:
    """scores [N,E], actual [N,K] -> (predicted, hits): each token's top-n scored experts (only those with
    probability >= min_prob, by the prefetcher's own rule), and how many of them are among its actual K."""
    pred, keep = top_predictions(scores, n, min_prob, learned)  # [N,n] each
    hit = (pred[:, :, None] == actual[:, None, :]).any(-1)
    if keep is not None:
        return int(keep.sum()), int((hit & keep).sum())
    return pred.numel(), int(hit.sum())


@torch.no_grad()
def evaluate(model, preferences, trace, lookahead: int = 3, budgets: list[tuple[int, float]] | None = None) -> list[dict]:
    """Rows {predictor, distance, budget, min_prob, precision, recall, tokens} measured on `trace`
    (calibrate.RoutingTrace); a budget is (experts per token, min_prob)."""
    blocks = model.moe_blocks()
    K, E = blocks[0].top_k, blocks[0].experts.num_experts
    budgets = budgets or [(n, 0.0) for n in sorted({1, K, min(E, K + 1), min(E, K + 2)})] + \
        [(K, 0.5), (K, 0.7)]
    predictors = [RouterLookahead(blocks, lookahead)]
    if preferences is not None and preferences.has_predictors:
        predictors.append(LearnedLookahead(blocks, preferences, lookahead))
    rows = []
    for p in predictors:
        totals: dict[tuple, list[int]] = {}  # (distance label, n, min_prob) -> [predicted, hits, tokens]
        for i in [EMBED] + list(range(len(blocks))):
            targets = p.targets(i)
            if not targets:
                continue
            scores = p.scores(i, trace.embed if i == EMBED else trace.x[i].to(_dtype(blocks)))  # [D',N,E]
            for s, j in zip(scores, targets):
                label = f"embed->{j}" if i == EMBED else str(j - i)
                for n, min_prob in budgets:
                    t = totals.setdefault((label, n, min_prob), [0, 0, 0])
                    predicted, hits = hits_at(s, trace.ids[j], n, min_prob, p.name == "learned")
                    t[0] += predicted
                    t[1] += hits
                    t[2] += s.shape[0]
        for (label, n, min_prob), (predicted, hits, tokens) in sorted(totals.items()):
            rows.append({"predictor": p.name, "distance": label, "budget": n, "min_prob": min_prob, "tokens": tokens,
                         "predicted_per_token": predicted / tokens,
                         "precision": hits / predicted if predicted else float("nan"), "recall": hits / (K * tokens)})
    return rows


@torch.no_grad()
def evaluate_prefetcher(model, preferences, trace, lookahead: int, per_layer: int, min_prob: float,
                        predictor: str = "auto") -> dict:
    """What a Prefetcher with these settings would ask for at batch-1 decode, token by token: for every MoE
    layer, the union of the predictions made for it (from each of the `lookahead` layers before it, and from the
    embedding for the first layers) against the experts it then picked -> {precision, recall, predicted_per_token}.
    """
    from marserve.experts.prefetcher import Prefetcher
    blocks = model.moe_blocks()
    pf = Prefetcher(model, preferences, lookahead=lookahead, per_layer=per_layer, min_prob=min_prob,
                    predictor=predictor)
    N, E = trace.ids[0].shape[0], blocks[0].experts.num_experts
    wanted = [torch.zeros(N, E, dtype=torch.bool) for _ in blocks]  # [N,E] per target layer
    for i in [EMBED] + list(range(len(blocks))):
        targets = pf.predictor.targets(i)
        if not targets:
            continue
        scores = pf.predictor.scores(i, trace.embed if i == EMBED else trace.x[i].to(_dtype(blocks)))
        idx, keep = pf.choose(scores)  # [D',N,n] each
        if keep is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
        for d, j in enumerate(targets):
            wanted[j].scatter_(1, idx[d], keep[d] | wanted[j].gather(1, idx[d]))  # OR into what was asked
    predicted = hits = 0
    for j, w in enumerate(wanted):
        actual = torch.zeros(N, E, dtype=torch.bool).scatter_(1, trace.ids[j].long(), True)
        predicted += int(w.sum())
        hits += int((w & actual).sum())
    K = blocks[0].top_k
    return {"lookahead": lookahead, "per_layer": pf.per_layer, "min_prob": min_prob, "predictor": pf.predictor.name,
            "precision": hits / predicted if predicted else float("nan"),
            "recall": hits / (K * N * len(blocks)), "predicted_per_token": predicted / (N * len(blocks))}


def _dtype(blocks) -> torch.dtype:
    return blocks[0].gate.weight.dtype


def format_table(rows: list[dict], top_k: int) -> str:
    lines = ["| predictor | distance | budget | predicted/token | precision | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        n = r["budget"]
        budget = f"top-{n}" + (" (=k)" if n == top_k else "") + (f", p>={r['min_prob']}" if r["min_prob"] else "")
        lines.append(f"| {r['predictor']} | {r['distance']} | {budget} | {r['predicted_per_token']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)


def run_eval(model, model_dir: str, preferences, lookahead: int, tokens: int, seq_len: int = 256) -> list[dict]:
    """Trace the held-out slices (marserve/data/heldout) and print the table (and one JSON line per row)."""
    from tokenizers import Tokenizer

    from marserve.analysis.routing import load_prompts
    from marserve.experts.calibrate import record_trace, token_windows
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    trace = record_trace(model, token_windows(tok, load_prompts(None), tokens, seq_len), desc="held-out trace")
    rows = evaluate(model, preferences, trace, lookahead)
    K = model.moe_blocks()[0].top_k
    print(f"prediction on held-out text: {model_dir}, {len(trace.tokens)} tokens, "
          f"preferences from {getattr(preferences, 'source', 'none')}")
    print(format_table(rows, K))
    kinds = ["router"] + (["learned"] if preferences is not None and preferences.has_predictors else [])
    settings = [evaluate_prefetcher(model, preferences, trace, la, n, mp, kind) for kind in kinds
                for la in range(1, min(lookahead, 2) + 1) for n, mp in ((1, 0.0), (K, 0.0), (K, 0.5), (K, 0.7))]
    print("\nas a Prefetcher would ask at batch-1 decode (every MoE layer, predictions from all sources unioned):")
    print(format_settings(settings))
    return rows + settings


def format_settings(rows: list[dict]) -> str:
    lines = ["| predictor | lookahead | per_layer | min_prob | prefetched/token/layer | precision | recall |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['predictor']} | {r['lookahead']} | {r['per_layer']} | {r['min_prob']} | "
              f"{r['predicted_per_token']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--tokens", type=int, default=20480, help="held-out tokens (shared across the five domains)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    from marserve.experts.preferences import load_preferences
    from marserve.loader import load_model
    model, _ = load_model(a.model_dir)
    rows = run_eval(model, a.model_dir, load_preferences(a.model_dir, model), a.lookahead, a.tokens)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
