"""The model server: the registry and checkpoints over HTTP, and HTTP pushes for devices.

:class:`ModelServer` owns three things: a follower of the model topic (the registry it
serves, and the checkpoints that only traveled inline on the topic, which it writes to
its checkpoint store so it can serve them), a producer to the feature log (HTTP pushes go
where Kafka pushes go, keyed by model id, acks=all), and an aiohttp application.

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>``, see ``pipeline.auth``;
errors are JSON ``{"reason": ..., "message": ...}``):

- ``GET /v1/models``: the models the token grants, with latest/best/version count.
- ``GET /v1/models/{id}``: one model, its latest, best and full history with metrics.
- ``GET|HEAD /v1/models/{id}/checkpoints/{version}``: the blob (``pipeline.server_checkpoints``:
  ETag = sha256, 304, one Range, 416). The versions ``best`` and ``latest`` are resolved in
  place (no redirect), so a device polls ``best`` with ``If-None-Match: "<sha it runs>"``
  and gets 304 until a better model exists. ``best`` and ``latest`` are therefore reserved
  and never real versions.
- ``POST /v1/models/{id}/pushes``: a wire-format feature push (``docs/wire-format.md``)
  → 202 ``{"samples": n, "partition": p, "offset": o}`` once it is on the feature log
  (``pipeline.server_pushes``: byte limit, body timeout, the agents' checks, the device).
- ``GET /healthz`` (the process runs), ``GET /readyz`` (registry caught up with the model
  topic and producer started; 503 otherwise), ``GET /metrics`` (Prometheus text).

Slow and greedy clients are bounded (``pipeline.server_connections``): a request head must
arrive within ``header_timeout_s`` and a push body within ``body_timeout_s`` (else 408 and
the connection closed), an address holds at most ``max_connections_per_ip`` connections
(else 429), an idle kept-alive connection is closed after ``keepalive_timeout_s``. A client
that goes away mid-request is its own outcome (``client_closed`` in ``/metrics``, an INFO
line), never a 500.

A version becomes visible here only after its inline checkpoint is in the store, so a
client that sees a version can always download it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline import auth, codec
from pipeline.broker_health import BrokerHealth
from pipeline.checkpoints import CheckpointStore, LocalCheckpointStore, store_inline
from pipeline.errors import ConfigError
from pipeline.http_api import (
    HttpFailure,
    json_response,
    path_id,
    route_name,
    summary_json,
    version_json,
)
from pipeline.lifecycle import Service
from pipeline.records import ModelUpdate
from pipeline.registry import ModelEntry, Registry, RegistryFollower
from pipeline.server_checkpoints import ALIASES, resolve_version, serve_checkpoint
from pipeline.server_connections import ConnectionGuard, ConnectionLimits, GuardedSite
from pipeline.server_metrics import ServerMetrics
from pipeline.server_pushes import Producer, PushIntake
from pipeline.settings import Settings
from pipeline.topics import Topics

log = logging.getLogger(__name__)
access_log = logging.getLogger("pipeline.server.access")
#: aiohttp's own HTTP-level log (requests it cannot parse, answered 400 without a handler).
protocol_log = logging.getLogger("pipeline.server.protocol")


class _ClientFaultsAtInfo(logging.Filter):
    """aiohttp logs a request it cannot parse (a bad chunk, a bad header: the client's
    fault, answered 400) as an ERROR with a traceback; any client could flood the log
    with them. Here they are one INFO line each, naming what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: bad request ({exc.message.strip()!r}), 400"
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


protocol_log.addFilter(_ClientFaultsAtInfo())

#: One line per request: client, request line, status, bytes, microseconds, user agent.
ACCESS_LOG_FORMAT: Final = '%a "%r" %s %b %Dus "%{User-Agent}i"'
#: The ``status`` label of a request whose client went away before its answer (nginx's 499).
CLIENT_CLOSED: Final = "client_closed"
#: Longest aiohttp reads and drops the unread rest of a body it refused (e.g. a 401 push).
MAX_LINGER_S: Final = 10.0


# ------------------------------------------------------------------------ injectable I/O


class Follower(Protocol):
    """What the server needs of a registry follower (``RegistryFollower`` in production)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def wait_caught_up(self, timeout: float = 30.0) -> None: ...


# -------------------------------------------------------------------------------- server


def _client_gone(request: web.Request, exc: Exception) -> bool:
    """True when ``exc`` is the client having gone away (its connection reset or closed
    mid-request), not a fault of the server: a connection error *and* a closed transport,
    so a connection error of the server's own (a store, say) still counts as a 500."""
    transport = request.transport
    return isinstance(exc, ConnectionError) and (transport is None or transport.is_closing())


async def _quietly(what: str, step: Awaitable[object]) -> None:
    """One shutdown step: a failure is logged and the next steps still run."""
    try:
        await step
    except Exception as exc:
        log.warning("%s failed: %r", what, exc)


class ModelServer(Service):
    """The model server component: ``async start()`` binds, ``async stop()`` drains and
    closes (idempotent), or ``async with``. ``port=0`` binds a free port; ``port`` and
    ``url`` tell which once started.

    ``follower`` and ``producer`` are injectable for tests without Kafka; by default the
    server builds a :class:`RegistryFollower` on ``models_topic`` and an acks=all producer
    on ``bootstrap``. An injected follower must call :meth:`on_update` for each new version.

    ``header_timeout_s``, ``body_timeout_s``, ``max_connections_per_ip`` and
    ``keepalive_timeout_s`` bound what one client may hold (see the module docstring).
    """

    def __init__(
        self,
        *,
        secret: str | bytes,
        store: CheckpointStore,
        features_topic: str,
        models_topic: str | None = None,
        bootstrap: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_push_bytes: int = 4 * 1024 * 1024,
        max_push_samples: int = codec.DEFAULT_MAX_SAMPLES,
        follower: Follower | None = None,
        producer: Producer | None = None,
        shutdown_timeout: float = 5.0,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 60.0,
        max_connections_per_ip: int = 128,
        keepalive_timeout_s: float = 75.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ConfigError("the model server needs a token secret: set FEDEX_AUTH_SECRET")
        if keepalive_timeout_s <= 0:
            raise ConfigError(f"keepalive_timeout_s must be positive, got {keepalive_timeout_s}")
        try:
            self.connection_limits = ConnectionLimits(
                header_timeout_s, body_timeout_s, max_connections_per_ip
            )
        except ValueError as exc:
            raise ConfigError(f"model server connection limits: {exc}") from None
        self._keepalive_timeout_s = keepalive_timeout_s
        self.registry = Registry()
        self.store = store
        self.metrics = ServerMetrics(self.registry, open_connections=lambda: self._guard.open)
        self._guard = ConnectionGuard(
            self.connection_limits,
            on_accept=self.metrics.connections.inc,
            on_cut=lambda reason: self.metrics.connections_cut.labels(reason).inc(),
        )
        self.health = BrokerHealth("model server", registry=self.metrics.registry)
        self._secret = secret
        self._host = host
        self._requested_port = port
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        if follower is None:
            if bootstrap is None or models_topic is None:
                raise ConfigError("ModelServer needs bootstrap and models_topic, or a follower")
            follower = RegistryFollower(
                bootstrap=bootstrap,
                topic=models_topic,
                on_update=self.on_update,
                client_id="fedex-server-registry",
            )
        if producer is None:
            if bootstrap is None:
                raise ConfigError("ModelServer needs bootstrap, or a producer")
            from pipeline.clients import make_producer

            producer = make_producer(bootstrap=bootstrap, client_id="fedex-server", acks="all")
        self._follower: Follower = follower
        self._producer: Producer = producer
        self._pushes = PushIntake(
            producer=producer,
            features_topic=features_topic,
            max_push_bytes=max_push_bytes,
            max_push_samples=max_push_samples,
            body_timeout_s=self.connection_limits.body_timeout_s,
            metrics=self.metrics,
            health=self.health,
        )
        self._producer_up = False
        self._caught_up = asyncio.Event()
        self._changed = asyncio.Condition()
        self._follower_error: BaseException | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._started_once = False
        self._port: int | None = None
        self.app = self._make_app()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        secret: str | None = None,
        store: CheckpointStore | None = None,
        host: str | None = None,
        port: int | None = None,
        **overrides: Any,
    ) -> ModelServer:
        """A server configured from the process's settings (``secret``, ``host`` and ``port``
        override theirs; ``store`` defaults to the local checkpoint dir)."""
        topics = Topics(settings.topic_prefix)
        key = secret or settings.auth_secret
        if not key:
            raise ConfigError("the model server needs a token secret: set FEDEX_AUTH_SECRET")
        return cls(
            secret=key,
            store=store or LocalCheckpointStore(settings.checkpoint_dir),
            features_topic=topics.features,
            models_topic=topics.models,
            bootstrap=settings.bootstrap,
            host=settings.server_host if host is None else host,
            port=settings.server_port if port is None else port,
            max_push_bytes=settings.max_push_bytes,
            max_push_samples=settings.max_push_samples,
            header_timeout_s=settings.server_header_timeout_s,
            body_timeout_s=settings.server_body_timeout_s,
            max_connections_per_ip=settings.server_max_connections_per_ip,
            keepalive_timeout_s=settings.server_keepalive_timeout_s,
            **overrides,
        )

    # ---------------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the model server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self._caught_up.is_set() and self._producer_up and self._follower_error is None

    async def start(self) -> None:
        if self._runner is not None:
            return
        if self._started_once:
            raise RuntimeError("a ModelServer cannot be restarted once stopped; build a new one")
        self._started_once = True
        runner = web.AppRunner(
            self.app,
            access_log=access_log,
            access_log_format=ACCESS_LOG_FORMAT,
            shutdown_timeout=self._shutdown_timeout,
            keepalive_timeout=self._keepalive_timeout_s,
            logger=protocol_log,
            lingering_time=min(MAX_LINGER_S, self.connection_limits.body_timeout_s),
        )
        self._runner = runner
        try:
            await self._producer.start()
            self._producer_up = True
            from aiokafka import AIOKafkaProducer

            from pipeline.clients import metadata_probe

            if isinstance(self._producer, AIOKafkaProducer):
                self.health.probe = metadata_probe(self._producer)
            await self.health.start()
            await self._follower.start()
            self._watch_task = asyncio.create_task(self._watch_catch_up(), name="server-catch-up")
            await runner.setup()
            site = GuardedSite(runner, self._host, self._requested_port, guard=self._guard)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self._port = int(runner.addresses[0][1])
        log.info("model server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop taking requests and drain those in flight, then stop following and
        producing (the producer flushes what was accepted)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await _quietly("stopping the HTTP server", runner.cleanup())
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.health.stop()
        await _quietly("stopping the registry follower", self._follower.stop())
        self._producer_up = False
        await _quietly("stopping the producer", self._producer.stop())
        self._port = None

    async def _watch_catch_up(self) -> None:
        while True:
            try:
                await self._follower.wait_caught_up(timeout=60.0)
            except TimeoutError:
                log.info("still catching up with the model topic")
                continue
            except Exception as exc:
                self._follower_error = exc
                log.error("registry follower failed: %s", exc)
                return
            self._caught_up.set()
            log.info(
                "registry caught up: %d models, %d versions",
                len(self.registry),
                sum(len(e.history) for e in self.registry.models()),
            )
            return

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once the registry has caught up with the model topic."""
        await asyncio.wait_for(self._caught_up.wait(), timeout)

    # ------------------------------------------------------------------ registry input

    async def on_update(self, update: ModelUpdate) -> None:
        """Folds a new version into the served registry, first writing its inline
        checkpoint to the store if the store lacks it (so the server can serve blobs that
        only traveled on the topic)."""
        if update.checkpoint is not None:
            outcome = await asyncio.to_thread(store_inline, self.store, update, update.checkpoint)
            self.metrics.checkpoints.labels(outcome).inc()
        if self.registry.apply(update):
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_version(
        self, model_id: str, version: str, timeout: float = 30.0
    ) -> ModelUpdate:
        """Returns the update of ``model_id``/``version`` once the server serves it."""

        def known() -> ModelUpdate | None:
            entry = self.registry.get(model_id)
            return entry.version(version) if entry else None

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: known() is not None), timeout)
        update = known()
        assert update is not None
        return update

    # ------------------------------------------------------------------------- the app

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{id}", self._get_model)
        app.router.add_get("/v1/models/{id}/checkpoints/{version}", self._get_checkpoint)
        app.router.add_post("/v1/models/{id}/pushes", self._post_push)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        route = route_name(request)
        status = "500"
        self._guard.request_started(request)
        in_progress = self.metrics.in_progress.labels(route)
        in_progress.inc()
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except HttpFailure as failure:
            status = str(failure.status)
            failed = failure.response()
            if failure.status == 408:  # the rest of the body is not worth waiting for
                failed.force_close()
            return failed
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # aiohttp cancels a handler whose client went away
            raise
        except Exception as exc:
            if _client_gone(request, exc):
                status = CLIENT_CLOSED
                log.info(
                    "%s %s: client %s went away mid-request (%s)",
                    request.method,
                    request.path,
                    request.remote,
                    exc,
                )
                # Never delivered; returned so that aiohttp does not log it as a 500.
                return web.Response(status=499)
            log.exception("%s %s failed", request.method, request.path)
            return HttpFailure(
                500, "internal", "internal server error; see the server log"
            ).response()
        finally:
            in_progress.dec()
            self._guard.request_finished(request)
            self.metrics.requests.labels(route, request.method, status).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _authenticate(self, request: web.Request) -> auth.Claims:
        try:
            token = auth.bearer_token(request.headers.get("Authorization"))
            return auth.verify_token(self._secret, token, self._clock())
        except auth.AuthError as exc:
            challenge = 'Bearer realm="fedex"'
            if exc.reason is not auth.AuthReason.MISSING:
                description = exc.message.replace('"', "'")
                challenge += f', error="invalid_token", error_description="{description}"'
            raise HttpFailure(
                401, exc.reason.value, exc.message, {"WWW-Authenticate": challenge}
            ) from None

    def _authorize(self, request: web.Request) -> tuple[auth.Claims, str]:
        """Token first (401), then the path's model id (400), then the grant (403)."""
        claims = self._authenticate(request)
        model_id = path_id(request, "id", "model id")
        try:
            claims.require_model(model_id)
        except auth.AuthError as exc:
            raise HttpFailure(403, exc.reason.value, exc.message) from None
        return claims, model_id

    def _entry(self, model_id: str) -> ModelEntry:
        entry = self.registry.get(model_id)
        if entry is None:
            raise HttpFailure(404, "unknown_model", f"model {model_id!r} has no version yet")
        return entry

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        registry = self._caught_up.is_set() and self._follower_error is None
        if registry:
            try:  # fails at once if the follower crashed since it caught up
                await self._follower.wait_caught_up(timeout=1.0)
            except Exception as exc:
                self._follower_error = exc
                registry = False
        checks = {"registry": registry, "producer": self._producer_up}
        ok = all(checks.values())
        # Kafka's state is reported, not required: downloads are served through an outage
        # (pushes then get 503).
        kafka = {
            "reachable": self.health.reachable,
            "since_s": round(time.monotonic() - self.health.since, 1),
            "outages": self.health.outages,
        }
        body: dict[str, object] = {"ready": ok, "checks": checks, "kafka": kafka}
        if self._follower_error is not None:
            body["error"] = str(self._follower_error)
        return json_response(body, 200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _list_models(self, request: web.Request) -> web.Response:
        claims = self._authenticate(request)
        models = [summary_json(e) for e in self.registry.models() if claims.allows(e.model_id)]
        return json_response({"models": models})

    async def _get_model(self, request: web.Request) -> web.Response:
        _, model_id = self._authorize(request)
        entry = self._entry(model_id)
        body: dict[str, object] = summary_json(entry)
        body["latest"] = version_json(model_id, entry.latest) if entry.latest else None
        body["best"] = version_json(model_id, entry.best) if entry.best else None
        body["history"] = [version_json(model_id, u) for u in entry.history]
        return json_response(body)

    async def _get_checkpoint(self, request: web.Request) -> web.StreamResponse:
        _, model_id = self._authorize(request)
        version = path_id(request, "version", "version")
        update = resolve_version(self._entry(model_id), version)
        return await serve_checkpoint(
            request,
            self.store,
            update,
            alias=version in ALIASES,
            on_bytes=self.metrics.bytes_served.inc,
        )

    async def _post_push(self, request: web.Request) -> web.Response:
        try:
            claims, model_id = self._authorize(request)
            return await self._pushes.accept(request, claims, model_id, self._entry(model_id))
        except HttpFailure as failure:
            self.metrics.pushes_rejected.labels(failure.reason).inc()
            raise
