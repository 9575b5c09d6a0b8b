"""Running the agents: :class:`AgentWorker` (async, for tests and benches) and
:func:`run_worker` (the blocking entry point of ``fedex worker``).

A worker is two stages in one process and event loop: the ingest stage
(``agents.ingest``: feature log → validated batch summaries and dead letters) and the Faust
app (``agents.app``: summaries, model updates and ticks → the per-model table and triggers).

Several workers share the work through two consumer groups, ``<prefix>-agents-ingest``
(the feature log) and ``<prefix>-agents`` (Faust: summaries, models, ticks, changelog):
start more ``fedex worker`` processes (each with its own ``FEDEX_HOME`` or state dir when
they share a machine, since RocksDB locks its files) and the partitions spread over them.
When a worker leaves, its partitions move, its uncommitted batches are re-read, and its
table state is rebuilt from the changelog.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from agents.app import DEFAULT_OPTIONS, AgentApp, AppOptions
from agents.ingest import IngestStage
from agents.policy import ModelState
from pipeline.broker_health import BrokerHealth, install_noise_filter
from pipeline.clients import metadata_probe
from pipeline.errors import FedexError
from pipeline.lifecycle import Service, stop_on_signals
from pipeline.settings import Settings
from pipeline.topics import Role, ensure_topics, topic_specs

log = logging.getLogger(__name__)


class AgentError(FedexError):
    """An agent failed; the worker stopped without committing the batch it was handling."""


class AgentWorker(Service):
    """One agents worker in the current event loop: ``start()``, ``stop()``, ``async with``.

    ``options`` run its Faust app (and give the ingest stage its clock). ``wait_ready()``
    returns once this worker has partitions of both groups and its table is recovered. A
    crashed agent or ingest stage fails ``wait_stopped()`` and ``wait_ready()``.
    """

    def __init__(
        self, settings: Settings, options: AppOptions = DEFAULT_OPTIONS, *, ensure: bool = True
    ) -> None:
        self.settings = settings
        self._ensure = ensure
        self.agents = AgentApp(settings, options, on_error=self._on_agent_error)
        self.app = self.agents.app
        self.health = BrokerHealth(f"agents worker {self.agents.app_id}")
        self.ingest = IngestStage(
            bootstrap=settings.bootstrap,
            features_topic=self.agents.topics.features,
            models_topic=self.agents.topics.models,
            summaries_topic=self.agents.summaries_topic.get_topic_name(),
            deadletter_topic=self.agents.topics.deadletter,
            group_id=f"{self.agents.app_id}-ingest",
            max_push_bytes=settings.max_push_bytes,
            max_push_samples=settings.max_push_samples,
            batch_max=settings.ingest_batch_max,
            linger_ms=settings.ingest_linger_ms,
            clock=options.clock,
            on_error=self._on_agent_error,
            health=self.health,
        )
        self._failed: asyncio.Future[None] | None = None
        self._started = False
        self._stopped = False

    async def _on_agent_error(self, source: str, exc: BaseException) -> None:
        log.error("agent on %s failed: %r; its batch stays uncommitted", source, exc)
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(AgentError(f"agent on {source} failed: {exc!r}"))

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._failed = asyncio.get_running_loop().create_future()
        # The internal topics must exist before the group's first assignment: Faust declares
        # them only after subscribing, and an assignor that found one missing never hands out
        # its partitions (no ticks: age triggers and job timeouts never checked; no
        # summaries: nothing counted).
        specs = topic_specs(self.settings)
        if not self._ensure:
            specs = [s for s in specs if s.role in (Role.AGENTS_TICKS, Role.AGENTS_SUMMARIES)]
        await ensure_topics(self.settings.bootstrap, specs)
        self.agents.datadir.mkdir(parents=True, exist_ok=True)
        await self.app.start()
        await self.ingest.start()
        if self.ingest.producer is not None:
            self.health.probe = metadata_probe(self.ingest.producer)
        await self.health.start()

    def _check(self) -> None:
        if self._failed is not None and self._failed.done():
            self._failed.result()
        if self.app.crashed:
            raise AgentError(f"the agents app crashed: {self.app.crash_reason!r}")

    @property
    def ready(self) -> bool:
        app = self.app
        ticks = self.agents.ticks_topic.get_topic_name()
        actives = app.assignor.assigned_actives()
        return (
            bool(actives)
            and any(tp.topic == ticks for tp in actives)
            and not app.rebalancing
            and app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
            and bool(self.ingest.assignment)
        )

    @property
    def partitions(self) -> set[int]:
        """The table partitions (= feature-log partitions) whose models this worker counts,
        ages and triggers now."""
        ticks = self.agents.ticks_topic.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == ticks}

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once partitions are assigned and the table recovered."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents worker {self.agents.app_id} not ready in {timeout} s")
            await asyncio.sleep(0.05)

    async def wait_stopped(self) -> None:
        """Returns when the app stops; raises if an agent failed."""
        assert self._failed is not None, "start() first"
        stopped = asyncio.ensure_future(self.app.wait_until_stopped())
        try:
            await asyncio.wait([stopped, self._failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        self._check()

    def states(self) -> list[ModelState]:
        return self.agents.states()

    def state(self, model_id: str) -> ModelState | None:
        return self.agents.load_state(model_id)

    async def stop(self, timeout: float = 30.0) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        await self.health.stop()
        # Input first: the ingest stage finishes its batch in flight and leaves its group.
        await self.ingest.stop()
        try:
            await asyncio.wait_for(self.app.stop(), timeout)
        except TimeoutError:
            log.warning("agents worker did not stop within %s s", timeout)
        if self._failed is not None and not self._failed.done():
            self._failed.cancel()


def _log_to_stdout() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stdout,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )


async def _serve(settings: Settings, max_runtime: float | None) -> None:
    stop = asyncio.Event()
    with stop_on_signals(stop.set):
        await _run(settings, max_runtime, stop)


async def _run(settings: Settings, max_runtime: float | None, stop: asyncio.Event) -> None:
    worker = AgentWorker(settings, AppOptions(web_enabled=True))
    install_noise_filter(worker.health)
    try:
        await worker.start()
        log.info(
            "agents worker %s on %s (web :%d), tick %.1f s",
            worker.agents.app_id,
            settings.bootstrap,
            settings.worker_port,
            settings.agent_tick_s,
        )
        stop_waiter = asyncio.ensure_future(stop.wait())
        app_waiter = asyncio.ensure_future(worker.wait_stopped())
        done, _ = await asyncio.wait(
            [stop_waiter, app_waiter], timeout=max_runtime, return_when=asyncio.FIRST_COMPLETED
        )
        stop_waiter.cancel()
        if app_waiter in done:
            app_waiter.result()  # an agent failure surfaces here
        else:
            app_waiter.cancel()
            log.info("stopping: %s", "signal" if stop.is_set() else f"max runtime {max_runtime} s")
    finally:
        await worker.stop()
        agents, ingest = worker.agents, worker.ingest
        log.info(
            "agents worker stopped: %d pushes (%d samples) validated, %d samples counted, "
            "%d triggers, %d dead letters",
            ingest.pushes,
            ingest.samples,
            agents.counted_samples,
            agents.triggers_sent,
            ingest.dead_letters_sent + agents.dead_letters_sent,
        )


def run_worker(settings: Settings, *, max_runtime: float | None = None) -> None:
    """Runs one agents worker until SIGINT/SIGTERM (or ``max_runtime`` seconds). Blocking;
    logs to stdout; the Faust web server listens on ``settings.worker_port``. Raises
    AgentError if an agent failed (the process should exit non-zero and be restarted)."""
    _log_to_stdout()
    asyncio.run(_serve(settings, max_runtime))
