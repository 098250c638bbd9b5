"""Prometheus metrics of one server (its own registry, so that several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """The server's counters, gauges and histograms (names in ``docs/server.md``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tembed_requests", "Requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "tembed_request_seconds", "Time to answer a request.", ["route"], buckets=_SECONDS_BUCKETS, registry=r
        )
        self.queue_tokens = Gauge("tembed_queue_tokens", "Tokens admitted and not yet answered.", registry=r)
        self.batch_tokens = Histogram(
            "tembed_batch_tokens", "Tokens per encode call.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_size = Histogram("tembed_batch_size", "Texts per encode call.", buckets=_SIZE_BUCKETS, registry=r)
        self.truncated = Counter("tembed_truncated_inputs", "Inputs truncated to the model's limit.", registry=r)
        self.oom_splits = Counter("tembed_oom_splits", "Merged batches split after an out-of-memory error.", registry=r)
        self.dropped = Counter("tembed_dropped_requests", "Requests whose client left before the answer.", registry=r)
        self.overloaded = Counter("tembed_overloaded_requests", "Requests refused with 429.", registry=r)

    def observe_batch(self, texts: int, tokens: int) -> None:
        """One encode call of ``texts`` texts and ``tokens`` tokens."""
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
