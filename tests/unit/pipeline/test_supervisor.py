"""The supervisor of ``fedex up``: backoff, restarts of dying children, clean stop."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeline.supervisor import Backoff, ChildSpec, Supervisor, cloud_children


def test_backoff_doubles_until_the_cap_and_resets_after_a_healthy_run() -> None:
    backoff = Backoff(initial=1, factor=2, maximum=5, healthy_after=60)
    assert [backoff.next_delay(0.1) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.next_delay(120) == 1
    assert backoff.next_delay(0.1) == 2


def test_cloud_children_run_the_fedex_commands() -> None:
    children = cloud_children(trainers=["cpu", "cuda:0"])
    assert [c.name for c in children] == ["worker", "trainer-0", "trainer-1", "server"]
    assert children[2].argv[-3:] == ("trainer", "--device", "cuda:0")
    assert all(c.argv[:3] == (sys.executable, "-m", "pipeline") for c in children)


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls state that lives in another process (files, pids), under a deadline."""

    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - no event to await across processes
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_dying_child_is_reported_and_restarted(tmp_path: Path) -> None:
    events: list[str] = []
    marker = tmp_path / "runs"
    # Appends a line per start, then dies at once with code 3.
    crasher = ChildSpec(
        "crasher",
        (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x\\n'); raise SystemExit(3)"),
    )
    steady = ChildSpec("steady", (sys.executable, "-c", "import time; time.sleep(600)"))
    supervisor = Supervisor(
        [crasher, steady],
        log_dir=tmp_path / "logs",
        env=dict(os.environ),
        grace=5,
        on_event=events.append,
        backoff=lambda: Backoff(initial=0.05, maximum=0.1),
    )
    async with supervisor:
        await wait_until(lambda: marker.exists() and len(marker.read_text().split()) >= 3)
        steady_pid = supervisor.children[1].process.pid  # type: ignore[union-attr]
        assert psutil.pid_exists(steady_pid)
    assert supervisor.children[0].restarts >= 2
    assert supervisor.children[0].last_exit == 3
    assert any("crasher exited with code 3" in e for e in events)
    assert supervisor.children[1].restarts == 0
    assert not psutil.pid_exists(steady_pid) or psutil.Process(steady_pid).status() == "zombie"
    assert (tmp_path / "logs" / "crasher.log").exists()


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = ChildSpec(
        "stubborn",
        (
            sys.executable,
            "-c",
            "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)",
        ),
    )
    events: list[str] = []
    supervisor = Supervisor(
        [stubborn], log_dir=tmp_path, env=dict(os.environ), grace=0.5, on_event=events.append
    )
    await supervisor.start()
    log = tmp_path / "stubborn.log"
    await wait_until(lambda: log.exists() and "ready" in log.read_text())
    await supervisor.stop()
    proc = supervisor.children[0].process
    assert proc is not None and proc.returncode is not None
    assert any("SIGKILL" in e for e in events)
    await supervisor.stop()  # idempotent
