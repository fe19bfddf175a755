"""The soak's checks over what the clients saw and what the server says, and the summary table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tests.soak.clients import Result

RSS_GROWTH_LIMIT = 0.05  # after warm-up, over the rest of the run
TTFT_P99_RATIO_LIMIT = 3.0  # last minute's p99 against the first minute's


@dataclass
class Check:
    name: str
    ok: bool | None  # None: reported, not judged
    detail: str


def p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _fmt(x: float | None, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.3f}{unit}"


def completion_checks(results: list[Result], references: dict[str, dict[int, str]]) -> list[Check]:
    normal = [r for r in results if r.spec.kind in ("normal", "greedy") and r.outcome != "disconnected"]
    bad = [r for r in normal if r.outcome != "ok"]
    checks = [Check("every request not aborted completes", not bad,
                    f"{len(normal) - len(bad)}/{len(normal)} completed; "
                    + ("; ".join(f"{r.spec.kind} {r.outcome} {r.status} {r.code} {r.detail}" for r in bad[:5])
                       or f"{sum(r.outcome == 'disconnected' for r in results)} left mid-stream by their client"))]
    greedy = [r for r in results if r.spec.kind == "greedy" and r.outcome == "ok"]
    wrong = [r for r in greedy if r.texts != references[r.spec.name]]
    detail = f"{len(greedy) - len(wrong)}/{len(greedy)} equal their reference ({len(references)} references run alone)"
    if wrong:
        r = wrong[0]
        detail += f"; first difference: {r.spec.name}: {r.texts!r:.120} vs {references[r.spec.name]!r:.120}"
    checks.append(Check("greedy requests equal the same request run alone", not wrong and bool(greedy), detail))
    five = [r for r in results if r.spec.kind != "fault"
            and ((r.status or 0) >= 500 or r.outcome in ("stream_error", "conn_error", "hang", "bad_answer"))]
    faults = [r for r in results if r.spec.kind == "fault"]
    faults_ok = [r for r in faults if r.code == "generation_failed"
                 and ((r.outcome == "http_error" and r.status == 500) or r.outcome == "stream_error")]
    checks.append(Check("no 5xx (or stream error) except injected faults", not five,
                        f"{len(five)} unexpected" + (f": {five[0].status} {five[0].code} {five[0].detail}" if five else "")))
    checks.append(Check("an injected sampling fault fails its own request only", len(faults_ok) == len(faults),
                        f"{len(faults_ok)}/{len(faults)} fault requests got 500 generation_failed (the rest of "
                        f"their batches: the rows above)"))
    return checks


def hostile_checks(results: list[Result]) -> list[Check]:
    hostile = [r for r in results if r.spec.kind == "hostile"]
    wrong = [r for r in hostile if r.status != r.spec.expect_status]
    cases = {r.spec.name for r in hostile}
    checks = [Check("hostile requests get their 4xx", not wrong,
                    f"{len(hostile) - len(wrong)}/{len(hostile)} ({len(cases)} distinct cases)"
                    + "".join(f"; {r.spec.name}: got {r.status} {r.outcome} {r.detail}, want {r.spec.expect_status}"
                              for r in wrong[:3]))]
    # Streams whose time to first token overlapped a hostile request, against the others.
    spans = [(r.t_start, r.t_end) for r in hostile]
    near, far = [], []
    for r in results:
        if r.spec.kind in ("normal", "greedy") and r.ttft is not None:
            overlaps = any(s <= r.t_first and e >= r.t_start for s, e in spans)
            (near if overlaps else far).append(r.ttft)
    checks.append(Check("hostile requests slow no one (reported)", None,
                        f"TTFT p50/p90 of streams overlapping a hostile request {_fmt(p(near, .5))}/{_fmt(p(near, .9))} "
                        f"(n={len(near)}) vs others {_fmt(p(far, .5))}/{_fmt(p(far, .9))} (n={len(far)})"))
    return checks


def metrics_checks(m: dict[str, float], idle: bool, results: list[Result], expert_cache: str | None) -> list[Check]:
    running, waiting = m.get("marserve:num_requests_running", -1), m.get("marserve:num_requests_waiting", -1)
    kv = m.get("marserve:kv_cache_usage_perc", -1)
    checks = [Check("after the run: KV pool and queues idle", idle,
                    f"running {running:.0f}, waiting {waiting:.0f}, KV usage {kv:.3f}")]
    outcomes = {o: m.get(f"marserve:requests_ended_total{{{o}}}", 0) for o in ("finished", "aborted", "rejected", "failed")}
    received = m.get("marserve:requests_received_total", 0)
    sent = len(results)
    hostile = sum(r.spec.kind == "hostile" for r in results)
    faults = sum(r.spec.kind == "fault" for r in results)
    left = sum(r.outcome == "disconnected" for r in results)
    adds_up = (received == sum(outcomes.values()) == sent and outcomes["rejected"] == hostile
               and outcomes["failed"] == faults and outcomes["aborted"] <= left)
    checks.append(Check("/metrics adds up: received = finished + aborted + rejected + failed", adds_up,
                        f"received {received:.0f} (clients sent {sent}) = finished {outcomes['finished']:.0f} + aborted "
                        f"{outcomes['aborted']:.0f} (clients left {left}) + rejected {outcomes['rejected']:.0f} "
                        f"(hostile {hostile}) + failed {outcomes['failed']:.0f} (faults {faults})"))
    if expert_cache is None:
        checks.append(Check("expert cache idle", None, "not checked: every expert resident (no --expert-cache)"))
    else:
        in_flight = m.get("marserve:expert_cache_reads_in_flight", -1)
        pinned = m.get("marserve:expert_cache_pinned_slots", -1)
        rereads = m.get("marserve:expert_cache_rereads_total", 0)
        lookups = m.get("marserve:expert_cache_lookups_total", 0)
        misses, hit_rate = m.get("marserve:expert_cache_misses_total", 0), m.get("marserve:expert_cache_hit_rate", 0)
        # faulty_serve.py damages 1% of expert reads: the greedy row shows no text changed, this one the re-reads.
        checks.append(Check("after the run: expert cache idle; corrupt reads read again",
                            in_flight == 0 and pinned == 0 and rereads > 0,
                            f"--expert-cache {expert_cache}: reads in flight {in_flight:.0f}, pinned slots "
                            f"{pinned:.0f}; {rereads:.0f} corrupt reads read again; {lookups:.0f} lookups, "
                            f"{misses:.0f} misses, hit rate {hit_rate:.3f}"))
    return checks


def rss_check(samples: list[tuple[float, float]], warm_until: float, end: float) -> Check:
    """RSS at the end of warm-up against RSS at the end of the run, each the median of its last 10% of
    samples (one step's batch shows as a peak of tens of MB that the next trim returns; the peak is reported)."""
    warm = [mb for t, mb in samples if t <= warm_until]
    after = [mb for t, mb in samples if warm_until < t <= end]
    if not warm or not after:
        return Check("RSS after warm-up grows < 5%", False, "no RSS samples")
    base = statistics.median(warm[-max(1, len(warm) // 10):])
    final = statistics.median(after[-max(1, len(after) // 10):])
    growth = (final - base) / base
    return Check("RSS after warm-up grows < 5%", growth < RSS_GROWTH_LIMIT,
                 f"{base:.0f} MB at the end of warm-up -> {final:.0f} MB at the end ({100 * growth:+.1f}%); "
                 f"peak after warm-up {max(after):.0f}, start {samples[0][1]:.0f} MB")


def ttft_check(results: list[Result], t0: float, t1: float) -> Check:
    """p99 TTFT of streams started in the last minute against those started in the first."""
    minute = min(60.0, (t1 - t0) / 2)
    first = [r.ttft for r in results if r.ttft is not None and r.t_start < t0 + minute]
    last = [r.ttft for r in results if r.ttft is not None and r.t_start >= t1 - minute]
    a, b = p(first, .99), p(last, .99)
    ok = a is not None and b is not None and b <= TTFT_P99_RATIO_LIMIT * a
    return Check("p99 TTFT, last minute within 3x of the first", ok,
                 f"first {_fmt(a)} (n={len(first)}), last {_fmt(b)} (n={len(last)})"
                 + (f", ratio {b / a:.2f}" if a and b else ""))


def table(checks: list[Check]) -> str:
    rows = [("check", "result", "detail")] + [(c.name, {True: "PASS", False: "FAIL", None: "info"}[c.ok], c.detail)
                                              for c in checks]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"| {a:<{w0}} | {b:<{w1}} | {c} |" for a, b, c in rows]
    lines.insert(1, f"| {'-' * w0} | {'-' * w1} | --- |")
    return "\n".join(lines)
