"""Writes the default model's README.md (model card) from its training log and the MAR-vs-twin routing reports.

Run: python -m marserve.train.model_card MODEL_DIR --mar-report mar.json --twin-report twin.json
         --twin-log TWIN_DIR/train_log.json --command "marserve train ..."
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROWS = [("held-out loss (nats/token)", "loss", "{:.3f}"), ("held-out perplexity", "perplexity", "{:.2f}"),
        ("load CV (mean over layers, lower = more balanced)", "load_cv", "{:.3f}"),
        ("domain specialisation I(domain; expert), bits", "domain_mi_bits", "{:.3f}"),
        ("same as share of H(domain)", "domain_mi_normalised", "{:.3f}"),
        ("routing consistency (token type -> same experts)", "consistency", "{:.3f}"),
        ("next-token expert reuse", "next_token_reuse", "{:.3f}"),
        ("LRU hit rate, cache = 25% of experts", "lru_hit_rate_25pct", "{:.3f}"),
        ("LRU hit rate, cache = 50% of experts", "lru_hit_rate_50pct", "{:.3f}"),
        ("next-layer prediction precision@K", "next_layer_precision_at_k", "{:.3f}"),
        ("next-layer prediction recall@2K", "next_layer_recall_at_2k", "{:.3f}")]


def comparison_table(mar: dict, twin: dict) -> str:
    lines = ["| measure | MAR | --no-mar twin |", "| --- | --- | --- |"]
    for label, key, fmt in ROWS:
        a, b = mar["summary"].get(key), twin["summary"].get(key)
        lines.append(f"| {label} | {fmt.format(a) if a is not None else '-'} | {fmt.format(b) if b is not None else '-'} |")
    return "\n".join(lines)


def parameter_counts(model_dir: str) -> tuple[int, int]:
    """(total, active per token) parameters, from the safetensors shapes and config."""
    from safetensors import safe_open
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    e = cfg.get("num_experts") or cfg.get("num_local_experts")
    k = cfg["num_experts_per_tok"]
    total = expert = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".mar." in name:
                continue
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
            if ".experts." in name:
                expert += n
    return total, total - expert + expert * k // e


DOMAIN_PROMPTS = {"code": "def read_config(path):\n", "prose": "Return the number of",
                  "manual": "DESCRIPTION\n", "math": "12 + 7 = 19\n", "records": "order_id,item,quantity,unit_price,city\n"}


def domain_samples(model_dir: str, max_new_tokens: int = 48) -> dict[str, str]:
    """Greedy continuations of one prompt per domain (deterministic, so the card is reproducible)."""
    import torch
    from transformers import AutoTokenizer

    from marserve.train.trainer import load_trained
    model, _ = load_trained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for domain, prompt in DOMAIN_PROMPTS.items():
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
        out[domain] = prompt + tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def write_card(model_dir: str, mar_report: dict, twin_report: dict, twin_log: dict, command: str,
               twin_command: str, analysis_command: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model_dir, "train_log.json")) as f:
        log = json.load(f)
    total, active = parameter_counts(model_dir)
    s, ts = log["summary"], twin_log["summary"]
    size_mb = os.path.getsize(os.path.join(model_dir, "model.safetensors")) / 2**20
    text = f"""# marserve default model: a small MAR-trained {cfg['model_type']} MoE

The model `marserve generate` and `marserve serve` run when no model is named. It exists to exercise
the engine end to end (MAR routing, prefetching, placement) on a CPU, not to be a useful assistant: it
continues text in the style of the five domains it was trained on.

## Architecture

| | |
| --- | --- |
| model_type | `{cfg['model_type']}` (transformers tensor names; loads in transformers without the MAR block) |
| layers / hidden / heads (kv) | {cfg['num_hidden_layers']} / {cfg['hidden_size']} / {cfg['num_attention_heads']} ({cfg['num_key_value_heads']}) |
| experts per layer / active (K) | {cfg.get('num_experts') or cfg.get('num_local_experts')} / {cfg['num_experts_per_tok']} |
| expert intermediate size | {cfg.get('moe_intermediate_size') or cfg.get('intermediate_size')} |
| vocabulary | {cfg['vocab_size']} (byte-level BPE trained on the corpus; ChatML chat template) |
| parameters, total / active per token | {total / 1e6:.2f} M / {active / 1e6:.2f} M (embeddings tied) |
| MAR | {json.dumps(cfg.get('mar'))} |
| file | model.safetensors, {cfg.get('dtype')}, {size_mb:.1f} MiB |

## Corpus

Five domains built on the machine by `python -m marserve.data.corpus` (sources and licences in that
file's docstring): `code` (Python stdlib source without docstrings), `prose` (stdlib docstrings and
/usr/share/common-licenses), `manual` (man pages, section 1, groff stripped), `math` (generated
arithmetic), `records` (generated JSON and CSV). 2 M characters per domain for training; the held-out
slices in `marserve/data/heldout/` were never trained on.

## Training

```
{command}
```

{s['steps']} steps of {log['config']['batch_size']} x {log['config']['seq_len']} tokens, AdamW lr {log['config']['lr']} (cosine),
aux load-balancing loss coefficient {log['config']['aux_loss_coef']}, one CPU thread:
{s['seconds_this_run'] / 60:.1f} min at {s['tokens_per_s']:.0f} tokens/s. Final training loss (mean of the last 20 steps):
{s['final_loss']:.3f} (twin: {ts['final_loss']:.3f}, trained by the same command with `--no-mar`:
`{twin_command}`).

## MAR versus its --no-mar twin (held-out text of every domain)

Produced by `{analysis_command}` (and the same on the twin's directory):

{comparison_table(mar_report, twin_report)}

Definitions are in docs/mar.md.

## Samples (greedy, repetition penalty 1.1, 48 new tokens; the prompt is the first line)

""" + "\n".join(f"**{d}**\n\n```\n{t}\n```\n" for d, t in domain_samples(model_dir).items())
    with open(os.path.join(model_dir, "README.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--mar-report", required=True)
    p.add_argument("--twin-report", required=True)
    p.add_argument("--twin-log", required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--twin-command", required=True)
    p.add_argument("--analysis-command", required=True)
    a = p.parse_args(argv)
    load = lambda path: json.load(open(path))  # noqa: E731
    write_card(a.model_dir, load(a.mar_report), load(a.twin_report), load(a.twin_log), a.command, a.twin_command,
               a.analysis_command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
