"""Prometheus metrics: requests, tokens in and out, time to first token, time per output
token, queue depth and running batch size. One registry per app, so tests and several apps
in one process do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hanlin_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hanlin_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hanlin_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("hanlin_time_to_first_token_seconds", "time from submit to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("hanlin_time_per_output_token_seconds", "time between output tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("hanlin_queue_depth", "requests waiting for a slot", registry=r)
        self.running = Gauge("hanlin_running_requests", "requests in the running batch", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
