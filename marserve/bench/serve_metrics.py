"""The serving benchmark's figures from per-request timelines: TTFT, TPOT, ITL, E2EL, throughputs, goodput.

Pure functions over `RequestResult`s (times in seconds, from the client's clock), so the math is tested on
hand-made timelines. Definitions (those of vLLM's serving benchmark, so figures compare across engines):
- TTFT: from sending the request to the first streamed chunk that carries a choice.
- ITL: the gaps between successive such chunks, every gap of every request pooled (a chunk is one token
  on marserve and vLLM; a server that batches tokens into chunks shows fewer, longer gaps).
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1): the mean decode time of one token after the
  first, then summarised over requests (so a long request weighs as much as a short one).
- E2EL: from sending to the last byte.
- Throughputs: successful requests, output tokens, and input + output tokens per second of the whole
  run (first send to last finish). Goodput: successful requests per second that met every SLO given.
Percentiles interpolate linearly between samples (numpy's default).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from marserve.errors import ConfigError

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One request's timeline. `chunk_times` are offsets from the send, one per streamed chunk with a choice."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds after the send
    latency: float = 0.0  # E2EL, seconds
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] if self.chunk_times else self.latency

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """None for a one-token output: it has no decode step to time."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft:500 tpot:50' (milliseconds; also comma-separated) -> {'ttft': 0.5, 'tpot': 0.05} in seconds."""
    slo: dict[str, float] = {}
    for item in (text or "").replace(",", " ").split():
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ConfigError(f"--goodput takes NAME:MS pairs with NAME one of {', '.join(SLO_METRICS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ConfigError(f"--goodput {item!r}: the limit must be > 0 ms")
        slo[name] = ms / 1e3
    return slo


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] <= limit for name, limit in slo.items())


def stats_ms(values: list[float]) -> dict[str, float]:
    """mean, median (p50), p90, p99 of seconds, in milliseconds; NaN when there are no values."""
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    arr = np.asarray(values, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(arr, PERCENTILES)
    return {"mean": float(arr.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float] | None = None) -> dict:
    """The run's figures: counts, throughputs per second of `duration`, goodput, latency stats in ms."""
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common()),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "slo_ms": {k: v * 1e3 for k, v in (slo or {}).items()},
        "goodput": per_s(sum(meets_slo(r, slo) for r in done)) if slo else None,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itls]),
        "e2el_ms": stats_ms([r.latency for r in done]),
    }


def format_report(s: dict, title: str) -> str:
    """One point's figures as the table printed after it runs."""
    lines = [f"==== {title} ====",
             f"{'successful requests':<34}{s['completed']:>12}",
             f"{'failed requests':<34}{s['failed']:>12}",
             f"{'duration (s)':<34}{s['duration_s']:>12.2f}",
             f"{'total input tokens':<34}{s['total_input_tokens']:>12}",
             f"{'total output tokens':<34}{s['total_output_tokens']:>12}",
             f"{'request throughput (req/s)':<34}{s['request_throughput']:>12.2f}",
             f"{'output token throughput (tok/s)':<34}{s['output_throughput']:>12.1f}",
             f"{'total token throughput (tok/s)':<34}{s['total_token_throughput']:>12.1f}"]
    if s["goodput"] is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in s["slo_ms"].items())
        lines.append(f"{'goodput (req/s)':<34}{s['goodput']:>12.2f}   SLO: {slo}")
    lines.append(f"{'(ms)':<10}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        st = s[f"{name}_ms"]
        lines.append(f"{name.upper():<10}" + "".join(f"{st[k]:>10.1f}" for k in ("mean", "median", "p90", "p99")))
    for error, count in s["errors"].items():
        lines.append(f"error x{count}: {error}")
    return "\n".join(lines)
