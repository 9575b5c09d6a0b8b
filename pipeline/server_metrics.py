"""The model server's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as prometheus_text

from pipeline.registry import Registry


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (one per server)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedex_server_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fedex_server_request_seconds",
            "HTTP request handling time by route.",
            ["route"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
            registry=r,
        )
        self.bytes_served = Counter(
            "fedex_server_checkpoint_bytes_served", "Checkpoint bytes sent to clients.", registry=r
        )
        self.pushes_accepted = Counter(
            "fedex_server_pushes_accepted", "HTTP pushes written to the feature log.", registry=r
        )
        self.samples_accepted = Counter(
            "fedex_server_push_samples_accepted", "Samples in accepted HTTP pushes.", registry=r
        )
        self.pushes_rejected = Counter(
            "fedex_server_pushes_rejected",
            "HTTP pushes refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.checkpoints = Counter(
            "fedex_server_inline_checkpoints",
            "Inline checkpoints seen on the model topic, by outcome "
            "(stored, present, sha256_mismatch, unstorable, error).",
            ["outcome"],
            registry=r,
        )
        Gauge("fedex_server_registry_models", "Models in the registry.", registry=r).set_function(
            lambda: len(registry)
        )
        Gauge(
            "fedex_server_registry_versions", "Model versions in the registry.", registry=r
        ).set_function(lambda: sum(len(e.history) for e in registry.models()))

    def exposition(self) -> bytes:
        return prometheus_text(self.registry)
