"""Prometheus metrics for the owner's dashboards (served on ``/metrics`` when ``PORT`` is set).

Each bot has its own registry, so several bots in one test process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

API_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180)


class Metrics:
    """Counters, gauges and histograms of one bot process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "kontext_jobs", "Jobs by outcome and cause", ["outcome", "cause"], registry=self.registry
        )
        self.api_latency = Histogram(
            "kontext_api_latency_seconds",
            "Seconds from API call to image",
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        self.credits_spent = Counter(
            "kontext_credits_spent", "Credits committed for posted images", registry=self.registry
        )
        self.rate_limited = Counter(
            "kontext_api_rate_limited", "429 answers from the image API", registry=self.registry
        )
        self.queue_depth = Gauge(
            "kontext_queue_depth", "Jobs waiting in the queue", registry=self.registry
        )
        self.running = Gauge("kontext_jobs_running", "Jobs calling the API", registry=self.registry)
        self.paused = Gauge(
            "kontext_api_paused", "1 while the API account needs attention", registry=self.registry
        )

    def bind_queue(self, depth: Callable[[], int], running: Callable[[], int], paused: Callable[[], bool]) -> None:
        """Read the queue's live numbers at scrape time."""
        self.queue_depth.set_function(lambda: float(depth()))
        self.running.set_function(lambda: float(running()))
        self.paused.set_function(lambda: 1.0 if paused() else 0.0)

    def job_finished(self, outcome: str, cause: str | None) -> None:
        self.jobs.labels(outcome=outcome, cause=cause or "none").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
