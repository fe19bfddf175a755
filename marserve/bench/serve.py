"""`marserve bench serve`: load an OpenAI-compatible server over HTTP and report its latency and throughput.

For each point of the sweep (every --max-concurrency with every --request-rate) it sends --num-prompts
streamed requests, prints that point's table, then a markdown table of all points, and writes the figures
as JSON and, when the sweep has several rates or concurrencies, PNG plots beside it. The server is checked
first (reachable, a model, one request that succeeds), so a wrong address is one line, not a traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import sys
from pathlib import Path

from marserve import progress
from marserve.bench import serve_load
from marserve.bench.serve_metrics import format_report, parse_slo, summarize
from marserve.bench.serve_plots import write_chart
from marserve.errors import ConfigError


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers or 'inf' (got {text!r})") from None


def _concurrencies(text: str | None) -> tuple[int | None, ...]:
    if text is None:
        return (None,)
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--max-concurrency takes comma-separated integers (got {text!r})") from None


def config_from_args(args) -> serve_load.LoadConfig:
    return serve_load.LoadConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, num_prompts=args.num_prompts,
        request_rates=_floats(args.request_rate, "--request-rate"), burstiness=args.burstiness,
        max_concurrencies=_concurrencies(args.max_concurrency), input_len=args.input_len,
        output_len=args.output_len, dataset=args.dataset, tokenizer=args.tokenizer, api_key=args.api_key,
        ignore_eos=args.ignore_eos, seed=args.seed, timeout_s=args.timeout)


def _requests(cfg: serve_load.LoadConfig, tokenizer, point: int) -> list[serve_load.BenchRequest]:
    if cfg.dataset is not None:
        return serve_load.read_dataset(cfg.dataset, cfg.num_prompts, cfg.output_len, tokenizer)
    # A new seed per point (and for the test request): no point finds another's prompts in a prefix cache.
    return serve_load.synthetic_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, tokenizer,
                                         seed=cfg.seed + 1 + point)


def _label(rate: float, concurrency: int | None) -> str:
    return f"max concurrency {concurrency or 'unlimited'}, request rate {rate:g}/s"


def sweep_table(points: list[dict]) -> str:
    """Every point on one markdown row (what docs/benchmarks.md shows)."""
    head = ("| clients | rate (req/s) | ok / failed | req/s | output tok/s | total tok/s | goodput (req/s) "
            "| TTFT median / p99 (ms) | TPOT median / p99 (ms) | ITL median / p99 (ms) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        goodput = "-" if p["goodput"] is None else f"{p['goodput']:.2f}"
        pair = lambda name: f"{p[name]['median']:.1f} / {p[name]['p99']:.1f}"  # noqa: E731
        rows.append(f"| {p['max_concurrency'] or 'unlimited'} | {p['request_rate']} | {p['completed']} / "
                    f"{p['failed']} | {p['request_throughput']:.2f} | {p['output_throughput']:.1f} | "
                    f"{p['total_token_throughput']:.1f} | {goodput} | {pair('ttft_ms')} | {pair('tpot_ms')} "
                    f"| {pair('itl_ms')} |")
    return "\n".join(rows)


def _finite(obj):
    """JSON has no inf or NaN: an infinite rate is written 'inf', a figure without samples null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj == math.inf else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_plots(out: Path, points: list[dict], cfg: serve_load.LoadConfig) -> list[str]:
    """latency vs request rate (one line per concurrency) when several finite rates were run; throughput vs
    concurrency (one line per rate) when several concurrencies were."""
    written = []
    rates = [r for r in cfg.request_rates if math.isfinite(r)]
    if len(rates) > 1:
        series = []
        for c in cfg.max_concurrencies:
            mine = [p for p in points if p["max_concurrency"] == c and math.isfinite(p["rate"])]
            tag = f" ({c} clients)" if len(cfg.max_concurrencies) > 1 else ""
            series += [(f"{name} {stat}{tag}", [(p["rate"], p[f"{name.lower()}_ms"][stat]) for p in mine])
                       for name, stat in (("TTFT", "median"), ("TTFT", "p99"), ("ITL", "median"), ("ITL", "p99"))]
        path = out.with_name(out.stem + "_latency_vs_rate.png")
        write_chart(str(path), "latency vs request rate", "request rate (req/s)", "ms", series)
        written.append(str(path))
    if sum(c is not None for c in cfg.max_concurrencies) > 1:
        series = []
        for r in cfg.request_rates:
            mine = [p for p in points if p["rate"] == r and p["max_concurrency"] is not None]
            tag = f" (rate {r:g}/s)" if len(cfg.request_rates) > 1 else ""
            series.append((f"output tok/s{tag}", [(p["max_concurrency"], p["output_throughput"]) for p in mine]))
            series.append((f"total tok/s{tag}", [(p["max_concurrency"], p["total_token_throughput"]) for p in mine]))
        path = out.with_name(out.stem + "_throughput_vs_concurrency.png")
        write_chart(str(path), "throughput vs concurrent clients", "max concurrency (clients)", "tokens/s", series)
        written.append(str(path))
    return written


def run(args) -> int:
    cfg = config_from_args(args)
    slo = parse_slo(" ".join(args.goodput or []))
    out = Path(args.output)
    try:  # before the run, not after it: a path that cannot be written would lose every figure
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {out}: cannot make its directory ({e.strerror})") from None
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise ConfigError(f"--output {out}: cannot write a file there")
    tokenizer = serve_load.load_tokenizer(cfg.tokenizer)
    first = _requests(cfg, tokenizer, -1)[0]
    with progress.stage(f"bench serve: checking {cfg.base_url}"):
        model = asyncio.run(serve_load.check_server(cfg, first))
    points = []
    grid = [(r, c) for c in cfg.max_concurrencies for r in cfg.request_rates]
    shown = progress.bar(total=len(grid) * cfg.num_prompts, desc="bench serve", unit="req")
    for i, (rate, concurrency) in enumerate(grid):
        shown.set_postfix_str(f"{concurrency or 'unlimited'} clients, {rate:g} req/s")
        results, duration = asyncio.run(serve_load.run_point(cfg, model, _requests(cfg, tokenizer, i), rate,
                                                             concurrency, on_done=lambda _: shown.update()))
        summary = summarize(results, duration, slo)
        points.append(dict(rate=rate, request_rate=f"{rate:g}", max_concurrency=concurrency, **summary))
        shown.clear()
        print(format_report(summary, f"{model} at {cfg.base_url}: {_label(rate, concurrency)}"), flush=True)
    shown.close()
    from marserve_kernels import cpu_features  # imports torch: only now, after the timed runs
    isa = cpu_features.describe()
    # The command as typed (from the process's argv when it is the CLI's; tests call main() with their own list).
    typed = sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else None
    flags = " ".join(map(shlex.quote, typed)) if typed is not None else "(flags not known)"
    command = f"marserve bench serve {flags}"
    print("\n" + sweep_table(points))
    print(f"\nprompts: {'from ' + cfg.dataset if cfg.dataset else f'synthetic, {cfg.input_len} tokens'}"
          f"{'' if tokenizer or cfg.dataset else ' (estimated: no --tokenizer)'}; output {cfg.output_len} tokens"
          f"{' (EOS ignored)' if cfg.ignore_eos else ''}; {cfg.num_prompts} requests per point")
    print(f"host (this client's; the server's when it runs here): {isa}")
    report = {"command": command, "base_url": cfg.base_url, "endpoint": cfg.endpoint, "model": model,
              "host_isa": isa, "num_prompts": cfg.num_prompts, "input_len": cfg.input_len,
              "output_len": cfg.output_len, "dataset": cfg.dataset, "burstiness": cfg.burstiness,
              "ignore_eos": cfg.ignore_eos, "points": points}
    out.write_text(json.dumps(_finite(report), indent=1) + "\n")
    print(f"wrote {out}" + "".join(f", {p}" for p in write_plots(out, points, cfg)))
    print(f"command: {command}")
    return 0 if all(p["failed"] == 0 for p in points) else 1
