"""The soak: `marserve serve` under 64 concurrent clients for a configurable time, then faults, then a summary table.

    python -m tests.soak.soak --minutes 30 [--clients 64] [--expert-cache 0.25] [--out DIR]

(scripts/soak.sh runs this.) Phases: start the server (default model, fp32, API key on, the test-only
faults armed); run every distinct greedy request alone for its reference; the load (the mix in
workload.py); once the clients stop, the idle and /metrics checks; SIGTERM under load (drain, exit 0);
a restart; SIGKILL under load (connection errors, no hang); a restart that serves. Exit 0 when every
check passes. docs/reliability.md says what each check guarantees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import secrets
import signal
import sys
import time
from pathlib import Path

from tests.soak import checks as C
from tests.soak.clients import new_client, run_clients, send
from tests.soak.server_process import ServerProcess
from tests.soak.workload import COMPLETIONS, Spec, Workload, greedy_requests, hostile_cases

IDLE_TIMEOUT = 30.0  # after the load, the server has this long to show an idle KV pool and queues


async def references(server: ServerProcess, greedy) -> dict[str, dict[int, str]]:
    """Each distinct greedy request, whole and streamed, run alone: the texts every later run must equal."""
    refs = {}
    async with new_client(server.base, 1) as client:
        for i, (path, body) in enumerate(greedy):
            for stream in (False, True):
                res = await send(client, Spec("greedy", path, {**body, "stream": stream}), server.api_key)
                if res.outcome != "ok":
                    raise RuntimeError(f"reference g{i} failed alone: {res.outcome} {res.status} {res.detail}")
                refs[f"g{i}-{'s' if stream else 'w'}"] = res.texts
    return refs


async def wait_idle(server: ServerProcess) -> tuple[bool, dict[str, float]]:
    deadline = time.monotonic() + IDLE_TIMEOUT
    while True:
        m = server.metrics()
        ended = sum(m.get(f"marserve:requests_ended_total{{{o}}}", 0) for o in ("finished", "aborted", "rejected",
                                                                                 "failed"))
        idle = (m.get("marserve:num_requests_running") == 0 and m.get("marserve:num_requests_waiting") == 0
                and m.get("marserve:kv_cache_usage_perc") == 0 and ended == m.get("marserve:requests_received_total")
                and m.get("marserve:expert_cache_reads_in_flight", 0) == 0  # (0 without an offloaded store)
                and m.get("marserve:expert_cache_pinned_slots", 0) == 0)
        if idle or time.monotonic() > deadline:
            return idle, m
        await asyncio.sleep(0.5)


def _plain_workload(seed: int, greedy) -> Workload:
    """The mix without hostile requests, faults or disconnects: for the stop and kill phases."""
    w = Workload(seed, greedy, hostile_cases())
    real_next = w.next

    def next_plain() -> Spec:
        while True:
            spec = real_next()
            if spec.kind in ("normal", "greedy") and spec.disconnect_after_chunks is None:
                return spec
    w.next = next_plain
    return w


async def _load_until_signal(server: ServerProcess, greedy, num_clients: int, sig: int, after_seconds: float,
                             long_every: int) -> tuple[list, float]:
    """Clients send the plain mix (every `long_every`-th request a long one) until the server refuses or is
    gone; `sig` goes to the server after `after_seconds`. Returns (results, the signal's monotonic time)."""
    works = [_plain_workload(1000 + i, greedy) for i in range(num_clients)]
    results, sent_at = [], {}
    long_body = {"model": "marserve-default", "prompt": "The", "max_tokens": 900, "ignore_eos": True,
                 "temperature": 1.0, "stream": True}

    async with new_client(server.base, num_clients) as client:
        async def loop(i: int):
            k = 0
            while True:
                k += 1
                spec = Spec("long", COMPLETIONS, long_body) if k % long_every == 0 else works[i].next()
                res = await send(client, spec, server.api_key)
                results.append(res)
                if res.outcome in ("conn_error", "hang") or res.status == 503 or res.code == "shutting_down":
                    return

        async def signal_later():
            await asyncio.sleep(after_seconds)
            sent_at["t"] = time.monotonic()
            server.signal(sig)

        await asyncio.gather(signal_later(), *(loop(i) for i in range(num_clients)))
    return results, sent_at["t"]


async def sigterm_phase(server: ServerProcess, greedy, num_clients: int, grace: float) -> list[C.Check]:
    results, t_sig = await _load_until_signal(server, greedy, num_clients, signal.SIGTERM, 8.0, long_every=4)
    code = await asyncio.to_thread(server.wait, grace + 30)
    allowed = [r for r in results if r.outcome == "ok"
               or (r.outcome == "stream_error" and r.code == "shutting_down" and "no [DONE]" not in r.detail)
               or (r.status == 503 and r.code == "shutting_down")
               or (r.outcome == "conn_error" and r.t_start >= t_sig)]  # refused: the listener is closed
    bad = [r for r in results if r not in allowed]
    cut = sum(r.code == "shutting_down" for r in results)
    return [C.Check("SIGTERM under load: drain, exit 0", code == 0 and not bad,
                             f"exit code {code}; {len(results)} requests: {sum(r.outcome == 'ok' for r in results)} "
                             f"finished, {cut} ended with shutting_down (grace {grace:.0f} s), "
                             f"{sum(r.outcome == 'conn_error' for r in results)} refused after the signal, "
                             f"{len(bad)} otherwise" + "".join(f"; {r.outcome} {r.status} {r.code} {r.detail}"
                                                                 for r in bad[:3]))]


async def sigkill_phase(server: ServerProcess, greedy, num_clients: int) -> list[C.Check]:
    results, t_kill = await _load_until_signal(server, greedy, num_clients, signal.SIGKILL, 6.0, long_every=4)
    in_flight = [r for r in results if r.t_start < t_kill <= r.t_end]
    hung = [r for r in results if r.outcome == "hang"]
    late = max((r.t_end - t_kill for r in in_flight), default=0.0)
    errors = sum(r.outcome == "conn_error" for r in in_flight)
    # A response the server wrote whole before it died is read by the client after the kill: it counts as
    # finished, not as in flight. Anything else (an error answer, a hang) fails the check.
    whole = sum(r.outcome == "ok" for r in in_flight)
    ok = not hung and errors + whole == len(in_flight) and late < 10
    code = server.wait(10)
    others = [r for r in in_flight if r.outcome not in ("conn_error", "ok")]
    return [C.Check("SIGKILL under load: clients see connection errors, never a hang", ok,
                    f"{len(in_flight)} requests in flight at the kill: {errors} connection errors, {whole} "
                    f"complete answers already written, the last {late:.2f} s after it; {len(hung)} hangs; "
                    f"exit {code}" + "".join(f"; {r.outcome} {r.status} {r.code} {r.detail}" for r in others[:3]))]


async def serves_again(server: ServerProcess, refs: dict, greedy, what: str) -> C.Check:
    took = await asyncio.to_thread(server.start)
    same = 0
    async with new_client(server.base, 1) as client:
        for i in range(4):
            res = await send(client, Spec("greedy", greedy[i][0], {**greedy[i][1], "stream": bool(i % 2)}),
                             server.api_key)
            same += res.outcome == "ok" and res.texts == refs[f"g{i}-{'s' if i % 2 else 'w'}"]
    return C.Check(f"restarted after {what}: serves", same == 4,
                   f"up in {took:.1f} s; {same}/4 greedy requests equal their reference")


def load_checks(results, refs, m, idle, rss_samples, t0, t1, args) -> list[C.Check]:
    warm_until = t0 + args.warmup_fraction * (t1 - t0)
    return (C.completion_checks(results, refs) + C.hostile_checks(results)
            + C.metrics_checks(m, idle, results, args.expert_cache)
            + [C.rss_check(rss_samples, warm_until, t1), C.ttft_check(results, t0, t1)])


async def soak(args) -> tuple[list[C.Check], dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grace = 10.0
    server = ServerProcess(secrets.token_hex(16), out / "server.log", expert_cache=args.expert_cache,
                           shutdown_grace=grace)
    info = {"command": " ".join(["python", "-m", "tests.soak.soak", *args.argv]),
            "server": server.command.replace(server.api_key, "KEY"), "loadavg_start": os.getloadavg()}
    try:
        return await _phases(args, server, info, grace)
    finally:
        if server.proc is not None and server.proc.poll() is None:  # a phase failed: leave nothing running
            server.proc.kill()


async def _phases(args, server: ServerProcess, info: dict, grace: float) -> tuple[list[C.Check], dict]:
    info["startup_seconds"] = await asyncio.to_thread(server.start)
    server.sample_rss()
    greedy, hostile = greedy_requests(), hostile_cases()
    t_ref = time.monotonic()
    refs = await references(server, greedy)
    info["reference_seconds"] = time.monotonic() - t_ref
    works = [Workload(i, greedy, hostile) for i in range(args.clients)]
    seconds = args.minutes * 60
    t0 = time.monotonic()
    done = {"n": 0}

    def progress(_res):
        done["n"] += 1
        if done["n"] % 500 == 0:
            print(f"  {time.monotonic() - t0:6.0f} s: {done['n']} requests, server RSS {server.rss_mb():.0f} MB, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

    m0 = server.metrics()  # the references' requests are counted too: the checks take the load's difference
    print(f"load: {args.clients} clients for {seconds:.0f} s", flush=True)
    results = await run_clients(server.base, server.api_key, args.clients, seconds, lambda i: works[i].next(), progress)
    t1 = time.monotonic()
    idle, m = await wait_idle(server)
    m = {k: v - m0.get(k, 0) if k.endswith("_total") or "_total{" in k else v for k, v in m.items()}
    server.stop_sampling()
    info.update(loadavg_end=os.getloadavg(), load_seconds=t1 - t0, requests=len(results),
                kinds={k: sum(r.spec.kind == k for r in results) for k in ("normal", "greedy", "hostile", "fault")},
                disconnected=sum(r.outcome == "disconnected" for r in results),
                generation_tokens=m.get("marserve:generation_tokens_total"),
                prompt_tokens=m.get("marserve:prompt_tokens_total"), preemptions=m.get("marserve:num_preemptions_total"))
    # Kept before judging, so that a check can be recomputed (or a new one computed) from a long run's data.
    with open(Path(args.out) / "load.pkl", "wb") as f:
        pickle.dump({"results": results, "refs": refs, "metrics": m, "idle": idle, "t0": t0, "t1": t1,
                     "rss": list(server.rss_samples)}, f)
    checks = load_checks(results, refs, m, idle, server.rss_samples, t0, t1, args)
    info["rss_samples"] = [(round(t - t0, 1), round(mb)) for t, mb in server.rss_samples]
    if not args.skip_faults:
        print("faults: SIGTERM under load, restart, SIGKILL under load, restart", flush=True)
        checks += await sigterm_phase(server, greedy, args.clients, grace)
        checks.append(await serves_again(server, refs, greedy, "SIGTERM"))
        checks += await sigkill_phase(server, greedy, args.clients)
        checks.append(await serves_again(server, refs, greedy, "SIGKILL"))
    code = server.stop()
    checks.append(C.Check("the last stop (SIGTERM, idle) exits 0", code == 0, f"exit code {code}"))
    return checks, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the load phase")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--expert-cache", default=None, help="passed to `marserve serve --expert-cache` when given")
    ap.add_argument("--warmup-fraction", type=float, default=0.2,
                    help="share of the load phase before RSS is taken as warmed up")
    ap.add_argument("--skip-faults", action="store_true", help="no SIGTERM / SIGKILL phases")
    ap.add_argument("--out", default=f"/tmp/marserve-soak-{time.strftime('%Y%m%d-%H%M%S')}",
                    help="where the server log and report.json go")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    checks, info = asyncio.run(soak(args))
    print(C.table(checks))
    print(f"\n{info['requests']} requests in {info['load_seconds']:.0f} s ({info['kinds']}, {info['disconnected']} left "
          f"mid-stream); {info['generation_tokens']:.0f} tokens generated; load average "
          f"{info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}; server up in {info['startup_seconds']:.1f} s")
    print(f"command: {info['command']}\nserver: {info['server']}\nlog and report: {args.out}")
    report = {"checks": [c.__dict__ for c in checks], **info}
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
