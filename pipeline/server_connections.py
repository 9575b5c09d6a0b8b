"""The model server's connection guard: what one slow or greedy client may hold.

aiohttp bounds the *size* of a request head but not the *time* it takes to arrive, and it
lets one address open as many connections as it likes: 50 connections trickling a byte a
second held the server's sockets indefinitely. :class:`ConnectionGuard` owns the
per-connection half of the fix:

- a **head timeout**: a connection must deliver a complete request head within
  ``header_timeout_s`` of its first byte (or of being opened, for a new connection);
  otherwise it gets a ``408`` and is closed. A kept-alive connection idle *between*
  requests is aiohttp's ``keepalive_timeout``'s business, not this one's;
- a **per-address limit**: an address (peer IP) holding ``max_per_ip`` connections gets
  a ``429`` on its next one, which is closed at once.

The body half (a push body must arrive within ``body_timeout_s`` of its head) lives in the
push handler, which reads the body; :class:`ConnectionLimits` carries the three numbers.

The guard sits between asyncio and aiohttp: :class:`GuardedSite` listens with a protocol
factory that wraps each aiohttp ``RequestHandler`` in a :class:`_GuardedConnection`, which
forwards every protocol callback and only adds timers and counting. The server tells the
guard when a request's head is in (:meth:`ConnectionGuard.request_started`, from its
middleware) and when its response is done (:meth:`ConnectionGuard.request_finished`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pipeline.reasons import HttpReason

log = logging.getLogger(__name__)

#: Labels of ``fedex_server_connections_cut_total``.
CUT_HEADER_TIMEOUT: Final = "header_timeout"
CUT_BODY_TIMEOUT: Final = "body_timeout"
CUT_TOO_MANY: Final = "too_many_connections"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client may hold: seconds for a request head, seconds for a push body,
    concurrent connections per peer address."""

    header_timeout_s: float
    body_timeout_s: float
    max_per_ip: int

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError(
                f"header and body timeouts must be positive, got {self.header_timeout_s} "
                f"and {self.body_timeout_s}"
            )
        if self.max_per_ip < 1:
            raise ValueError(f"max connections per address must be ≥ 1, got {self.max_per_ip}")


def raw_response(status: int, phrase: str, reason: str, message: str) -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 response with the server's JSON error body,
    for the guard to write straight to a transport no request owns."""
    body = orjson.dumps({"reason": reason, "message": message})
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """Counts open connections per address, arms each connection's head timer, and tells
    ``on_accept()`` / ``on_cut(reason)`` about every connection it takes / cuts or refuses
    (the server's metrics)."""

    def __init__(
        self,
        limits: ConnectionLimits,
        *,
        on_accept: Callable[[], None] = lambda: None,
        on_cut: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limits = limits
        self._on_accept = on_accept
        self._on_cut = on_cut
        self._per_ip: Counter[str] = Counter()
        self._by_handler: dict[RequestHandler, _GuardedConnection] = {}

    @property
    def open(self) -> int:
        """Connections open now (those refused for the per-address limit not included)."""
        return self._per_ip.total()

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls per connection: aiohttp's handler, guarded."""
        return lambda: _GuardedConnection(self, server())

    def request_started(self, request: web.BaseRequest) -> None:
        """A request's head is in: its connection's head timer stops."""
        connection = self._by_handler.get(request.protocol)
        if connection is not None:
            connection.head_done()

    def request_finished(self, request: web.BaseRequest) -> None:
        """A request is answered: the next byte on its connection starts a new head."""
        connection = self._by_handler.get(request.protocol)
        if connection is not None:
            connection.idle()

    # -------------------------------------------------------- the connections' side

    def _admit(self, ip: str, connection: _GuardedConnection) -> bool:
        if self._per_ip[ip] >= self.limits.max_per_ip:
            return False
        self._per_ip[ip] += 1
        self._by_handler[connection.handler] = connection
        self._on_accept()
        return True

    def _release(self, ip: str, connection: _GuardedConnection) -> None:
        self._by_handler.pop(connection.handler, None)
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def _cut(self, reason: str) -> None:
        self._on_cut(reason)


class _GuardedConnection(asyncio.Protocol):
    """One connection: forwards every protocol callback to aiohttp's ``RequestHandler``
    and adds the per-address count and the head timer.

    States: ``head`` (waiting for a complete request head, timer armed), ``request`` (a
    request is being handled: body bytes and pipelined heads pass untimed; the body has its
    own deadline in the handler), ``idle`` (answered; the next byte re-enters ``head``).
    """

    def __init__(self, guard: ConnectionGuard, handler: RequestHandler) -> None:
        self.guard = guard
        self.handler = handler
        self._transport: asyncio.Transport | None = None
        self._ip = ""
        self._admitted = False
        self._state = "head"
        self._timer: asyncio.TimerHandle | None = None

    # asyncio's protocol callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self.guard._admit(self._ip, self):
            limit = self.guard.limits.max_per_ip
            log.info("refused a connection from %s: it holds %d already", self._ip, limit)
            self.guard._cut(CUT_TOO_MANY)
            self._refuse(
                transport,
                429,
                "Too Many Requests",
                HttpReason.TOO_MANY_CONNECTIONS,
                f"{self._ip} holds {limit} connections to this server, the most one "
                "address may; reuse one (keep-alive) or close some and retry",
            )
            return
        self._admitted = True
        self.handler.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._state == "idle":
            self._state = "head"
            self._arm()
        self.handler.data_received(data)

    def eof_received(self) -> None:
        # None: the transport closes itself on the client's EOF, as aiohttp's does.
        if self._admitted:
            self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._admitted:
            return
        self._admitted = False
        self.guard._release(self._ip, self)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self.handler.resume_writing()

    # the guard's --------------------------------------------------------------

    def head_done(self) -> None:
        self._state = "request"
        self._disarm()

    def idle(self) -> None:
        self._state = "idle"
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.guard.limits.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if self._state != "head" or transport is None or transport.is_closing():
            return
        timeout = self.guard.limits.header_timeout_s
        log.info("cut %s: no complete request head within %g s", self._ip, timeout)
        self.guard._cut(CUT_HEADER_TIMEOUT)
        # No request owns the connection (its head is not in), so nothing else writes.
        self._refuse(
            transport,
            408,
            "Request Timeout",
            HttpReason.TIMEOUT,
            f"the request head did not arrive within {timeout:g} s; send the request "
            "line and headers at once",
        )

    @staticmethod
    def _refuse(
        transport: asyncio.Transport, status: int, phrase: str, reason: str, message: str
    ) -> None:
        """Answer with the server's JSON error and close: no request owns the connection."""
        transport.write(raw_response(status, phrase, reason, message))
        transport.close()


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite`` with each connection behind a :class:`ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
