"""`marserve inspect --routing`: runs prompts through a checkpoint, records routing per layer and reports how predictable it is.

Shape legend: T=tokens, E=experts, K=active per token, H=hidden.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from marserve import progress
from marserve.analysis import routing_metrics as rm
from marserve.default_model import MODEL_DIR as DEFAULT_MODEL_DIR
from marserve.errors import ConfigError

HELDOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "heldout")


def load_prompts(path: str | None) -> dict[str, list[str]]:
    """{domain: [texts]} from --prompts or from the committed held-out slices."""
    if path is None:
        out = {}
        for name in sorted(os.listdir(HELDOUT_DIR)):
            if name.endswith(".heldout.txt"):
                with open(os.path.join(HELDOUT_DIR, name), encoding="utf-8") as f:
                    out[name.split(".")[0]] = [f.read()]
        return out
    if not os.path.exists(path):
        raise ConfigError(f"--prompts {path}: no such file")
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                domain, text = rec.get("domain", "prompts"), rec["text"]
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                domain, text = "prompts", line
            out.setdefault(domain, []).append(text)
    return out


class RoutingRecorder:
    """routing_observer that keeps, per layer, router inputs x [T,H], MAR logits z [T,E] and top-k ids [T,K]."""

    def __init__(self):
        self.x, self.z, self.ids = {}, {}, {}

    def __call__(self, layer_idx, x, z, topk_ids, topk_weights):
        self.x.setdefault(layer_idx, []).append(x.detach().float())
        self.z.setdefault(layer_idx, []).append(z.detach().float())
        self.ids.setdefault(layer_idx, []).append(topk_ids.detach())


@torch.no_grad()
def record(model, routers, tok, prompts: dict[str, list[str]], seq_len: int, max_tokens: int) -> dict:
    """Runs every domain's text in windows of seq_len; returns per-domain recordings, token ids and NLL."""
    per_domain = {}
    encoded = {}
    for domain, texts in prompts.items():
        ids = []
        for t in texts:
            ids += tok.encode(t).ids
        encoded[domain] = ids[:max_tokens + 1]
    # The forward passes are the slow part (~35 s for the default model): one bar over every window.
    windows = sum(len(range(0, max(1, len(ids) - 1), seq_len)) for ids in encoded.values())
    shown = progress.bar(total=windows, desc="routing: forward passes", unit="window")
    for domain, ids in encoded.items():
        rec = RoutingRecorder()
        for r in routers:
            r.routing_observer = rec
        nll, n, tokens, seq = 0.0, 0, [], []
        for s, start in enumerate(range(0, max(1, len(ids) - 1), seq_len)):
            shown.update()
            window = ids[start:start + seq_len + 1]
            if len(window) < 2:
                break
            inp = torch.tensor([window[:-1]])
            logits = model(input_ids=inp).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
            n += len(window) - 1
            tokens += window[:-1]
            seq += [s] * (len(window) - 1)
        for r in routers:
            r.routing_observer = None
        per_domain[domain] = {
            "x": {l: torch.cat(v) for l, v in rec.x.items()}, "ids": {l: torch.cat(v) for l, v in rec.ids.items()},
            "tokens": torch.tensor(tokens), "seq": torch.tensor(seq), "nll": nll, "n": n}
    shown.close()
    return per_domain


def analyse(model, routers, tok, prompts, seq_len: int = 256, max_tokens: int = 8192) -> dict:
    data = record(model, routers, tok, prompts, seq_len, max_tokens)
    domains = list(data)
    num_experts, k = routers[0].num_experts, routers[0].top_k
    report = {"domains": domains, "num_experts": num_experts, "top_k": k, "layers": [],
              "perplexity": {d: rm.perplexity(data[d]["nll"], data[d]["n"]) for d in domains}}
    total_nll, total_n = sum(d["nll"] for d in data.values()), sum(d["n"] for d in data.values())
    report["perplexity"]["all"] = rm.perplexity(total_nll, total_n)
    report["loss"] = total_nll / total_n
    for li, r in enumerate(progress.bar(routers, desc="routing: metrics", unit="layer")):
        layer = r.layer_idx
        ids_all = torch.cat([data[d]["ids"][layer] for d in domains])
        # sequence ids made globally unique so locality never crosses domains
        seq_all = torch.cat([data[d]["seq"] + 100_000 * j for j, d in enumerate(domains)])
        tokens_all = torch.cat([data[d]["tokens"] for d in domains])
        load = rm.expert_load(ids_all, num_experts)
        mi, mi_norm = rm.domain_expert_mutual_information({d: data[d]["ids"][layer] for d in domains}, num_experts)
        entry = {
            "layer": layer,
            "load": [round(float(v), 4) for v in load],
            "load_cv": rm.coefficient_of_variation(load),
            "consistency": rm.routing_consistency(tokens_all, ids_all),
            "next_token_reuse": rm.next_token_reuse(ids_all, seq_all),
            "lru_hit_rate": {f"{c}": rm.lru_hit_rate(ids_all, seq_all, c)
                             for c in sorted({max(1, num_experts // 4), num_experts // 2, 2 * k})},
            "domain_mi_bits": mi, "domain_mi_normalised": mi_norm,
            "domain_expert_share": {d: [round(float(v), 4) for v in rm.expert_load(data[d]["ids"][layer], num_experts)]
                                    for d in domains},
        }
        if r._state is not None:
            usage = r._state.usage.double()
            entry["usage"] = [round(float(v), 4) for v in usage]
            entry["usage_vs_load_l1"] = float((usage - load).abs().sum())
            entry["usage_load_correlation"] = float(torch.corrcoef(torch.stack([usage, load]))[0, 1])
        if li + 1 < len(routers):
            nxt = routers[li + 1]
            x_l = torch.cat([data[d]["x"][layer] for d in domains])
            actual = torch.cat([data[d]["ids"][nxt.layer_idx] for d in domains])
            pred = nxt.logits(x_l)                                       # layer l+1's MAR logits on layer l's input
            entry["next_layer_precision_at_k"] = rm.prediction_precision(pred, actual, k)
            entry["next_layer_recall_at_2k"] = rm.prediction_recall(pred, actual, min(num_experts, 2 * k))
        report["layers"].append(entry)
    report["summary"] = summarise(report)
    return report


def summarise(report: dict) -> dict:
    layers = report["layers"]

    def mean(key, sub=None):
        vals = [(l[key][sub] if sub else l[key]) for l in layers if key in l]
        return sum(vals) / len(vals) if vals else None
    e = report["num_experts"]
    return {"loss": report["loss"], "perplexity": report["perplexity"]["all"], "load_cv": mean("load_cv"),
            "domain_mi_bits": mean("domain_mi_bits"), "domain_mi_normalised": mean("domain_mi_normalised"),
            "consistency": mean("consistency"), "next_token_reuse": mean("next_token_reuse"),
            "lru_hit_rate_25pct": mean("lru_hit_rate", str(max(1, e // 4))),
            "lru_hit_rate_50pct": mean("lru_hit_rate", str(e // 2)),
            "next_layer_precision_at_k": mean("next_layer_precision_at_k"),
            "next_layer_recall_at_2k": mean("next_layer_recall_at_2k")}


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from marserve.analysis.png import write_heatmaps
    from marserve.train.trainer import load_trained
    model_dir = getattr(args, "model_dir", None) or getattr(args, "model", None) or DEFAULT_MODEL_DIR
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"{model_dir}: no config.json; pass a model directory")
    torch.set_num_threads(getattr(args, "routing_threads", 1))   # more threads than free cores thrash
    with progress.stage(f"loading {os.path.basename(os.path.normpath(model_dir))} with transformers"):
        model, routers = load_trained(model_dir)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    prompts = load_prompts(getattr(args, "prompts", None))
    report = analyse(model, routers, tok, prompts, getattr(args, "routing_seq_len", 256),
                     getattr(args, "routing_max_tokens", 8192))
    report["model_dir"] = model_dir
    out_json = getattr(args, "routing_json", None)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1)
    png = getattr(args, "routing_png", None)
    if png:
        panels = [(f"layer {l['layer']}", report["domains"], [l["domain_expert_share"][d] for d in report["domains"]])
                  for l in report["layers"]]
        write_heatmaps(png, panels)
    _print(report)
    return 0


def _print(report: dict) -> None:
    print(f"routing of {report.get('model_dir', '?')} on {', '.join(report['domains'])}")
    print(f"{'layer':>5} {'load_cv':>8} {'consist':>8} {'reuse':>7} {'lru25%':>7} {'lru50%':>7} {'MI(bit)':>8} "
          f"{'next@k':>7} {'usage~load':>10}")
    e = report["num_experts"]
    for l in report["layers"]:
        print(f"{l['layer']:>5} {l['load_cv']:>8.3f} {l['consistency']:>8.3f} {l['next_token_reuse']:>7.3f} "
              f"{l['lru_hit_rate'][str(max(1, e // 4))]:>7.3f} {l['lru_hit_rate'][str(e // 2)]:>7.3f} "
              f"{l['domain_mi_bits']:>8.3f} {l.get('next_layer_precision_at_k', float('nan')):>7.3f} "
              f"{l.get('usage_load_correlation', float('nan')):>10.3f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report["summary"].items()}))


def main(argv: list[str] | None = None) -> int:
    """`python -m marserve.analysis.routing MODEL_DIR [flags]`: the same analysis without the inspect command."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL_DIR)
    from marserve.commands.inspect import add_routing_arguments  # the flags live with the CLI (no torch there)
    add_routing_arguments(p)
    progress.add_quiet_flag(p)
    args = p.parse_args(argv)
    progress.set_quiet(args.quiet)
    return run(args)


if __name__ == "__main__":
    import sys
    sys.exit(main())
