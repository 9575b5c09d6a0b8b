"""Whether a process reaches its Kafka cluster, and how it waits when it does not.

Every long-lived process that talks to Kafka (trainer, model server) keeps one
:class:`BrokerHealth`. It probes the cluster every ``interval`` seconds with a metadata
request (a paused broker still accepts TCP connections, so a socket probe would not see
it), and the process's own I/O reports what it saw (:meth:`BrokerHealth.failed`,
:meth:`BrokerHealth.ok`). It logs one line when the broker becomes unreachable and one
when it is back, with the outage's length and the failed attempts in between: never one
line per attempt. Its state is a Prometheus gauge (``fedex_broker_reachable``) beside the
time of the last change and the outages counted.

:func:`is_transient` names the errors worth waiting out, and :func:`backoff_delays` the
waits between attempts (exponential with jitter, capped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.lifecycle import Service

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]


def is_transient(exc: BaseException) -> bool:
    """An error that a broker outage causes and that goes away with it: any Kafka client
    error, a timeout, a refused or reset connection."""
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError | TimeoutError | ConnectionError | OSError)


def backoff_delays(
    first: float = 0.5, cap: float = 10.0, *, rng: random.Random | None = None
) -> Iterator[float]:
    """Endless waits: ``first``, doubling up to ``cap``, each with ±20% jitter (so that
    processes restarted together do not retry in step)."""
    rng = rng or random.Random()
    delay = first
    while True:
        yield delay * rng.uniform(0.8, 1.2)
        delay = min(cap, delay * 2)


class BrokerHealth(Service):
    """The broker's reachability as seen by one process (``name`` in its log lines).

    ``probe`` (settable until :meth:`start`, once the process's clients exist) is awaited
    every ``interval`` seconds with a ``timeout``; None probes nothing (the state then
    follows :meth:`ok` / :meth:`failed` alone). ``registry`` receives the gauges.
    """

    def __init__(
        self,
        name: str,
        *,
        probe: Probe | None = None,
        interval: float = 2.0,
        timeout: float = 5.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.probe = probe
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self.reachable = True
        self.since = clock()
        self.outages = 0
        self.failed_attempts = 0
        #: Kafka client log lines folded by :class:`KafkaNoiseFilter` in this outage.
        self.folded = 0
        self.last_error = ""
        self.summary_every = 60.0
        self._last_summary = self.since
        self._task: asyncio.Task[None] | None = None
        self._back = asyncio.Event()
        self._back.set()
        if registry is not None:
            Gauge(
                "fedex_broker_reachable",
                "1 while this process reaches the Kafka cluster, 0 during an outage.",
                registry=registry,
            ).set_function(lambda: 1.0 if self.reachable else 0.0)
            Gauge(
                "fedex_broker_state_seconds",
                "Seconds since the broker's reachability last changed.",
                registry=registry,
            ).set_function(lambda: self._clock() - self.since)
            self._outage_counter: Counter | None = Counter(
                "fedex_broker_outages", "Broker outages this process saw.", registry=registry
            )
        else:
            self._outage_counter = None

    # ----------------------------------------------------------------- what I/O saw

    def failed(self, exc: BaseException | str) -> None:
        """An attempt to talk to the broker failed."""
        self.failed_attempts += 1
        self.last_error = str(exc) or type(exc).__name__
        if not self.reachable:
            return
        self.reachable = False
        self.since = self._last_summary = self._clock()
        self.outages += 1
        self._back.clear()
        if self._outage_counter is not None:
            self._outage_counter.inc()
        log.warning(
            "%s: Kafka unreachable (%s); retrying with backoff, one line when it is back",
            self.name,
            self.last_error,
        )

    def ok(self) -> None:
        """An attempt to talk to the broker succeeded."""
        if self.reachable:
            return
        now = self._clock()
        log.warning(
            "%s: Kafka back after %.1f s (%d failed attempts, %d client errors folded)",
            self.name,
            now - self.since,
            self.failed_attempts,
            self.folded,
        )
        self.reachable = True
        self.since = now
        self.failed_attempts = 0
        self.folded = 0
        self._back.set()

    async def wait_back(self, timeout: float | None = None) -> bool:
        """Wait until the broker is reachable again; False on timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._back.wait(), timeout)
        return self._back.is_set()

    # ----------------------------------------------------------------- the probe

    async def start(self) -> None:
        if self._task is None and self.probe is not None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-broker-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe_once(self) -> bool:
        assert self.probe is not None
        try:
            await asyncio.wait_for(self.probe(), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(exc if str(exc) else f"no answer within {self._timeout:g} s")
            return False
        self.ok()
        return True

    def summarize(self) -> None:
        """One line per ``summary_every`` seconds with the counts: while unreachable, or
        when client errors were folded while the broker answered (a flapping link)."""
        now = self._clock()
        if now - self._last_summary < self.summary_every:
            return
        self._last_summary = now
        if self.reachable:
            if self.folded:
                log.warning(
                    "%s: the Kafka client logged %d connection errors in the last %.0f s "
                    "(folded; last: %s)",
                    self.name, self.folded, self.summary_every, self.last_error,
                )  # fmt: skip
                self.folded = 0
            return
        log.warning(
            "%s: Kafka still unreachable after %.0f s (%d failed attempts, %d client errors "
            "folded; last: %s)",
            self.name, now - self.since, self.failed_attempts, self.folded, self.last_error,
        )  # fmt: skip

    async def _run(self) -> None:
        while True:
            await self.probe_once()
            self.summarize()
            await asyncio.sleep(self._interval)


#: What aiokafka logs, once per attempt, while a broker is away (refused: the error is in
#: the line; paused or unroutable: ``Unable connect to "host:port": `` with an empty error).
OUTAGE_PHRASES = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
    "NodeNotReadyError",
    "KafkaConnectionError",
    "Connect call failed",
    "RequestTimedOutError",
    "Marking the coordinator dead",
    "marking coordinator dead",
    "is either not started or not valid",
    "Heartbeat send request failed",
    "Error sending HeartbeatRequest",
    "Got error produce response",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Failed fetch messages",
    "Failed fetch offsets",
    "Coordinator dead",
    "NotCoordinatorForGroupError",
)

#: What Faust's consumer logs per partition, every few seconds, once fetching has stalled
#: (after ``stream_processing_timeout``). During an outage that is the outage; with the
#: broker reachable it is a real stall, so it is folded only while unreachable.
STALL_PHRASES = (
    "Aiokafka stopped fetching from",
    "Aiokafka has not sent fetch request",
    "Aiokafka has not received fetch response",
    "Broker stopped responding to fetch requests",
)


class KafkaNoiseFilter(logging.Filter):
    """Drops the Kafka clients' per-attempt connection errors (thousands a minute during
    an outage) and counts them on ``health`` instead, which reports them in its own
    lines: lost, a summary per minute, back. Everything else passes."""

    def __init__(self, health: BrokerHealth) -> None:
        super().__init__()
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if record.name.startswith("aiokafka"):
            phrases: tuple[str, ...] = OUTAGE_PHRASES
        elif record.name.startswith("faust.transport") and not self.health.reachable:
            phrases = STALL_PHRASES
        else:
            return True
        message = record.getMessage()
        if not any(phrase in message for phrase in phrases):
            return True
        # Counted, not judged: the probe and the process's own I/O decide the state.
        self.health.folded += 1
        self.health.last_error = message[:200]
        return False


def install_noise_filter(health: BrokerHealth) -> KafkaNoiseFilter:
    """Puts a :class:`KafkaNoiseFilter` on every handler of the root logger (a filter on
    the ``aiokafka`` logger itself would not see its children's records). For entry
    points, after logging is configured."""
    noise = KafkaNoiseFilter(health)
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    return noise
