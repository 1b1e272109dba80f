"""Prometheus metrics of the API, served at GET /metrics (behind the API key when keys are set).

Each app has its own CollectorRegistry (tests build many apps; the process-wide default registry would
refuse the second). What is counted:

    atelier_requests_total{route,status}              chat requests by route and HTTP status
    atelier_request_duration_seconds{route}           their latency (histogram)
    atelier_model_call_duration_seconds{model}        each model call: orchestrator model, specialists
    atelier_model_tokens_total{model,type}            tokens in (input) and out (output) per model
    atelier_route_fallbacks_total{route}              requests the router was not confident about; the fallback
                                                      rate is rate(fallbacks) / rate(requests)
    atelier_rate_limited_total{code}                  429s: server_busy, requests_per_minute, tokens_per_minute
    atelier_adapter_switches_total                    a base model's active adapter changed between two calls
    atelier_specialists_loaded                        adapters (and full models) in memory now
    atelier_bases_loaded                              base models in memory now
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from atelier.tracing import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Loaded:
    """Collector read at scrape time: what the specialist runtime holds in memory."""

    def __init__(self, runtime: Any):
        self.runtime = runtime

    def collect(self):
        loaded = self.runtime.loaded() if self.runtime is not None and hasattr(self.runtime, "loaded") else {}
        specialists = sum(len(b.adapters) + len(b.full_model) for b in loaded.values())
        yield GaugeMetricFamily(
            "atelier_specialists_loaded", "Specialists (adapters and full models) in memory.", value=specialists
        )
        yield GaugeMetricFamily("atelier_bases_loaded", "Base models in memory.", value=len(loaded))


class Metrics:
    def __init__(self, runtime: Any = None):
        self.registry = CollectorRegistry()
        self.runtime = runtime
        self.requests = Counter(
            "atelier_requests", "Chat requests by route and HTTP status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "atelier_request_duration_seconds",
            "Chat request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_latency = Histogram(
            "atelier_model_call_duration_seconds",
            "Model call latency by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "atelier_model_tokens",
            "Tokens in (input) and out (output) by model.",
            ["model", "type"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "atelier_route_fallbacks",
            "Requests the semantic router was not confident about "
            "(the orchestrator model or the direct route decided).",
            ["route"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "atelier_rate_limited", "Requests refused with 429, by reason.", ["code"], registry=self.registry
        )
        self.adapter_switches = Counter(
            "atelier_adapter_switches", "Changes of a base model's active adapter.", registry=self.registry
        )
        self.registry.register(_Loaded(runtime))
        self._active: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def request(
        self, route: str, status: int, seconds: float | None = None, record: RequestRecord | None = None
    ) -> None:
        """One finished (or refused) chat request."""
        self.requests.labels(route, str(status)).inc()
        if seconds is not None:
            self.latency.labels(route).observe(seconds)
        if record is None:
            return
        if record.fallback:
            self.fallbacks.labels(route).inc()
        for call in record.model_calls:
            self.model_latency.labels(call.model).observe(call.seconds)
            self.tokens.labels(call.model, "input").inc(call.input_tokens)
            self.tokens.labels(call.model, "output").inc(call.output_tokens)
        if any(c.model.startswith("specialist:") for c in record.model_calls):
            self._count_switches()

    def refused(self, status: int, code: str | None) -> None:
        self.requests.labels("none", str(status)).inc()
        if status == 429:
            self.rate_limited.labels(code or "rate_limit").inc()

    def _count_switches(self) -> None:
        loaded = self.runtime.loaded() if self.runtime is not None and hasattr(self.runtime, "loaded") else {}
        with self._lock:
            for path, base in loaded.items():
                before = self._active.get(path)
                if base.active_adapter is not None and before is not None and before != base.active_adapter:
                    self.adapter_switches.inc()
                self._active[path] = base.active_adapter or before

    def render(self) -> bytes:
        return generate_latest(self.registry)
