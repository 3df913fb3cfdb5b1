"""Prometheus metrics: one CollectorRegistry per app (two servers in one process never mix).

Three sources: HTTP answers (counted by the `CountRequests` middleware), the engine's counters
(read from `engine.snapshot()` at scrape time), and per-step / per-request histograms (fed by
`engine.on_step` from the engine thread and by the routes when a request finishes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self, routes: set[str]):
        self.routes = routes  # known paths; anything else is counted as "other" (scanners hit many)
        self.engine = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("nbkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.finished = Counter("nbkit_request_finish", "Generation requests ended, by finish reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("nbkit_time_to_first_token_seconds", "Queue + prefill time until the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("nbkit_time_per_output_token_seconds", "Mean time per token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("nbkit_step_seconds", "Duration of one decoding step (all running requests)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.step_batch = Histogram("nbkit_step_batch_size", "Requests decoded together in one step",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.step_tree = Histogram("nbkit_spec_tree_size", "Tree size chosen for a step (1 = no speculation)",
                                   buckets=SIZE_BUCKETS, registry=r)
        r.register(_EngineCollector(self))

    def attach(self, engine) -> None:
        """Read counters from `engine` and observe its steps (chaining any previous on_step hook)."""
        self.engine = engine
        previous = engine.on_step

        def on_step(info: dict) -> None:
            self.step_seconds.observe(info["seconds"])
            self.step_batch.observe(info["batch"])
            self.step_tree.observe(info["tree_size"])
            if previous is not None:
                previous(info)

        engine.on_step = on_step

    def observe_finished(self, fin) -> None:
        self.finished.labels(fin.finish_reason).inc()
        if not fin.finish_reason.completed or fin.time_to_first_token is None:
            return
        self.ttft.observe(fin.time_to_first_token)
        if fin.completion_tokens > 1:
            self.tpot.observe((fin.latency - fin.time_to_first_token) / (fin.completion_tokens - 1))

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.routes else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters taken from the engine's snapshot when Prometheus scrapes."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # values come from the engine at collect time

    def collect(self):
        engine = self.metrics.engine
        if engine is None:
            return
        try:
            s = engine.snapshot()
        except RuntimeError:  # a dict changed size while the engine thread was stepping: skip this scrape
            return
        yield _gauge("nbkit_queue_size", "Requests waiting for a slot", s["waiting"])
        yield _gauge("nbkit_batch_size", "Requests running now (holding a slot)", s["running"])
        yield _gauge("nbkit_kv_cache_bytes", "Bytes the KV cache holds (the torch runner's grows with the longest "
                     "sequence served and is kept)", s.get("kv_bytes", 0))
        yield _gauge("nbkit_engine_alive", "1 while the engine thread runs", 1 if engine.alive else 0)
        yield _counter("nbkit_engine_restarts", "Times the supervisor restarted the engine after a crash",
                       s.get("restarts", 0))
        yield _counter("nbkit_generated_tokens", "Tokens generated", s["tokens"])
        yield _counter("nbkit_prefill_tokens", "Prompt tokens prefilled", s["prefill_tokens"])
        yield _counter("nbkit_steps", "Decoding steps", s["steps"])
        yield _counter("nbkit_requests_rejected", "Requests refused because the queue was full", s["rejected"])
        yield _counter("nbkit_requests_cancelled", "Requests cancelled (client gone, server stopping)",
                       s["cancelled"])
        yield _counter("nbkit_spec_proposed_tokens", "Speculated tokens sent to verification", s["proposed_tokens"])
        yield _counter("nbkit_spec_accepted_tokens", "Speculated tokens accepted", s["accepted_tokens"])
        yield _gauge("nbkit_spec_mean_accepted_per_step",
                     "Tokens emitted per speculative step (bonus token included)", s["mean_accepted_per_spec_step"])
        yield _counter("nbkit_prefix_cached_tokens", "Prompt tokens whose KV was reused, not prefilled",
                       s["prefix_cached_tokens"])
        yield _counter("nbkit_prefix_hits", "Requests that reused a cached prefix", s["prefix_hits"])
        yield _gauge("nbkit_prefix_hit_rate", "Cached / prompt tokens of finished requests", s["prefix_hit_rate"])
        yield _counter("nbkit_prefix_evictions", "Kept KV dropped for room (least recently used)",
                       s["prefix_evictions"])
        trees = CounterMetricFamily("nbkit_spec_tree_choices", "Steps that used each tree", labels=["tree"])
        for name, n in sorted(s["tree_choices"].items()):
            trees.add_metric([name], n)
        yield trees


def _gauge(name, doc, value):
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name, doc, value):
    return CounterMetricFamily(name, doc, value=value)


class CountRequests:
    """ASGI middleware: count every HTTP answer by route and status (401/413/429 from the guards too)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, send=counting_send)
