"""Prometheus metrics, `marserve:` prefix, in vLLM's style: engine state read at scrape time, latencies observed per request.

Gauges and totals come from AsyncEngine.stats() when /metrics is scraped (no bookkeeping twice);
histograms are observed by the serving layer when a request finishes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from marserve.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
REQUEST_OUTCOMES = ("finished", "aborted", "rejected", "failed")
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Reads the engine's counters and gauges when Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"marserve:{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(f"marserve:{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage)
        yield gauge("engine_alive", "1 while the engine loop runs, 0 once it has died.", float(self.engine.is_running))
        yield counter("num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.",
                      s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens received.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("prefix_cache_queries", "Prompt blocks looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt blocks found in the prefix cache.", s.prefix_cache_hits)
        per_layer = [("lookups", "Expert lookups (token, expert routing decisions)."),
                     ("hits", "Expert lookups served from fast memory."),
                     ("misses", "Expert lookups that had to load the expert from a slower tier."),
                     ("prefetches", "Experts prefetched ahead of use."),
                     ("prefetch_hits", "Prefetched experts that were then used."),
                     ("bytes_moved", "Bytes of expert weights copied into fast memory."),
                     ("stall_seconds", "Seconds the forward pass waited for expert weights.")]
        for field, doc in per_layer:
            c = CounterMetricFamily(f"marserve:expert_cache_{field}", doc, labels=["model_name", "layer"])
            for layer in s.expert_cache:
                c.add_metric([self.model_name, str(layer.layer_idx)], float(getattr(layer, field)))
            yield c
        lookups = sum(c.lookups for c in s.expert_cache)
        prefetches = sum(c.prefetches for c in s.expert_cache)
        yield gauge("expert_cache_hit_rate", "Expert lookups served from fast memory, all layers (1 = all).",
                    sum(c.hits for c in s.expert_cache) / lookups if lookups else 1.0)
        yield gauge("expert_cache_reads_in_flight", "Expert reads from the slow tier not yet landed (0 when idle).",
                    s.expert_reads_in_flight)
        yield gauge("expert_cache_pinned_slots", "Expert slots pinned by a forward pass in progress (0 when idle; "
                    "the hottest experts kept for good are not counted).", s.expert_pinned_slots)
        yield counter("expert_cache_rereads", "Expert reads whose checksum failed and that were read again.",
                      s.expert_rereads)
        yield gauge("expert_prefetch_precision", "Prefetched experts that were used, all layers.",
                    sum(c.prefetch_hits for c in s.expert_cache) / prefetches if prefetches else 0.0)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram("marserve:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("marserve:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("marserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("marserve:request_queue_time_seconds", "Time waiting before first scheduled.",
                               labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("marserve:request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.http_errors = Counter("marserve:http_errors", "Requests answered with an error, by status.",
                                   ["model_name", "status"], registry=self.registry)
        # Generation requests (/v1/completions, /v1/chat/completions) as they arrive and as they end: once
        # nothing is in flight, received = the sum of ended over its outcomes (request_outcomes.py).
        self.received = Counter("marserve:requests_received", "Generation requests received (any method, any body).",
                                labels, registry=self.registry)
        self.ended = Counter("marserve:requests_ended", "Generation requests ended, by outcome: finished, aborted "
                             "(the client left), rejected (4xx), failed (5xx or an error event in the stream).",
                             ["model_name", "outcome"], registry=self.registry)
        self.received.labels(model_name)  # every count shows from the start, at 0
        for outcome in REQUEST_OUTCOMES:
            self.ended.labels(model_name, outcome)
        self.registry.register(_EngineCollector(engine, model_name))

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        name = self.model_name
        if m is not None:
            if m.ttft is not None:
                self.ttft.labels(name).observe(m.ttft)
            if m.queue_time is not None:
                self.queue.labels(name).observe(m.queue_time)
            for gap in m.inter_token_latencies:
                self.itl.labels(name).observe(gap)
            end = m.finished_time or m.last_token_time
            if end is not None:
                self.e2e.labels(name).observe(end - m.arrival_time)
        for o in out.outputs:
            self.finished.labels(name, o.finish_reason or "unknown").inc()

    def observe_received(self) -> None:
        self.received.labels(self.model_name).inc()

    def observe_ended(self, outcome: str) -> None:
        self.ended.labels(self.model_name, outcome).inc()

    def observe_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
