"""A process's Prometheus metrics over HTTP (``GET /metrics``), for processes that serve
nothing else (the trainer). The model server has its own ``/metrics`` route."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline.lifecycle import Service

log = logging.getLogger(__name__)


class MetricsServer(Service):
    """Serves ``registry`` on ``host:port``; port 0 serves nothing (start and stop are
    then no-ops)."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def start(self) -> None:
        if self._runner is not None or self._port == 0:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self._host, self._port).start()
        self._runner = runner
        log.info("metrics on http://%s:%d/metrics", self._host, self._port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
