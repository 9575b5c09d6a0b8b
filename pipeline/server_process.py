"""``fedex serve``: the model server as a process (topics ensured, signals, the broker
noise filter, a clean stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from pipeline import auth
from pipeline.broker_health import install_noise_filter
from pipeline.lifecycle import stop_on_signals
from pipeline.server import ModelServer
from pipeline.settings import Settings

log = logging.getLogger(__name__)


async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    max_runtime: float | None = None,
    on_started: Callable[[ModelServer], None] | None = None,
) -> None:
    """Runs the model server until SIGINT/SIGTERM or ``max_runtime`` seconds, then drains
    and stops. Ensures the topics first (idempotent). ``host``/``port`` override the
    settings (port 0 = any free port); ``on_started`` is told the running server."""
    from pipeline.clients import wait_for_kafka
    from pipeline.topics import ensure_topics, topic_specs

    secret = settings.auth_secret
    if secret is None:
        secret = secrets.token_urlsafe(32)
        dev_token = auth.issue_token(
            secret, "dev", auth.ANY_MODEL, settings.token_ttl_s, time.time()
        )
        log.warning(
            "FEDEX_AUTH_SECRET is unset: using a random secret for this run (dev only); "
            "a token for every model: %s",
            dev_token,
        )
    await wait_for_kafka(settings.bootstrap)
    await ensure_topics(settings.bootstrap, topic_specs(settings))
    stop = asyncio.Event()
    with stop_on_signals(stop.set):
        server = ModelServer.from_settings(settings, secret=secret, host=host, port=port)
        install_noise_filter(server.health)
        async with server:
            log.info("serving the registry of %s on %s", settings.topic_prefix, server.url)
            if on_started is not None:
                on_started(server)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_runtime)
            log.info("stopping the model server")


def run_server(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    max_runtime: float | None = None,
) -> None:
    """Blocking entry point of ``fedex serve``: runs until SIGINT/SIGTERM (clean stop) or
    ``max_runtime`` seconds."""
    asyncio.run(serve(settings, host=host, port=port, max_runtime=max_runtime))
