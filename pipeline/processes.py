"""Child processes that never outlive their parent, and stopping them gracefully.

Shared by the local Kafka runner (a JVM) and ``fedex up`` (the worker, trainer and server
children): a child started with :func:`die_with_parent` gets SIGTERM when its parent dies,
even by SIGKILL, so a crashed test or a killed supervisor leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs. A zombie counts as gone: a detached broker's parent
    has exited, and a container's pid 1 may never reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def terminate_pid(pid: int, *, timeout: float, group: bool) -> bool:
    """SIGTERM (controlled shutdown), wait up to ``timeout``, then SIGKILL. Blocking.
    Returns True if SIGKILL was needed."""

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return False
        time.sleep(0.05)
    log.warning("pid %d ignored SIGTERM for %.0f s; sending SIGKILL", pid, timeout)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not process_gone(pid):
        time.sleep(0.05)
    return True


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn for a child: SIGTERM it when the parent dies, even by SIGKILL (Linux).

    The death signal fires when the *thread* that forked exits; children are started from
    the event loop's thread, which lives as long as the process.
    """
    libc: ctypes.CDLL | None = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc is not None:
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would stop us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def trim_memory() -> None:
    """Give the heap freed so far back to the OS (glibc's ``malloc_trim``): a fleet
    process frees ~60 MB after start-up (each head is built from a whole backbone)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
