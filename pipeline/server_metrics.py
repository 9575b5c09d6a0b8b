"""The model server's Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as prometheus_text

from pipeline.registry import Registry


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (one per server).

    A request's ``status`` label is its HTTP status, or ``client_closed`` when the client
    went away before its answer (nginx's 499): a client-side outcome, never a 500.
    ``open_connections`` reads the connection guard's count."""

    def __init__(
        self, registry: Registry, *, open_connections: Callable[[], int] = lambda: 0
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedex_server_requests",
            "HTTP requests by route, method and status (client_closed: the client went "
            "away mid-request).",
            ["route", "method", "status"],
            registry=r,
        )
        self.in_progress = Gauge(
            "fedex_server_requests_in_progress",
            "HTTP requests being handled now, by route.",
            ["route"],
            registry=r,
        )
        self.connections = Counter(
            "fedex_server_connections", "TCP connections accepted.", registry=r
        )
        self.connections_cut = Counter(
            "fedex_server_connections_cut",
            "Connections the server cut or refused, by reason (header_timeout, body_timeout, "
            "too_many_connections).",
            ["reason"],
            registry=r,
        )
        Gauge(
            "fedex_server_connections_open", "TCP connections open now.", registry=r
        ).set_function(open_connections)
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
