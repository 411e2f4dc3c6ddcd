"""How a `jprobe attach` session ends: its duration, a termination signal, or the target's exit."""
from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CHECK_EVERY = 0.5                  # seconds between looks for an exec


@contextmanager
def held(signals: tuple[int, ...]) -> Iterator[None]:
    """`signals` blocked in this thread (left pending) while the block runs."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_for_end(pid: int, duration: float | None, ended: Callable[[], str | None]) -> str | None:
    """Block until the session ends; why, when it is not the duration's end or a signal
    (both normal ends, SPEC §2): the process exited, or `ended` says why (an exec)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"process {pid} exited"
    deadline = None if duration is None else time.monotonic() + duration
    next_check = time.monotonic() + CHECK_EVERY
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
    try:
        while True:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return None
            if signal.sigtimedwait(ENDING, 0) is not None:
                return None
            if select.select([pidfd], [], [], left)[0]:
                return f"process {pid} exited"
            if time.monotonic() >= next_check:
                why = ended()
                if why:
                    return why
                next_check = time.monotonic() + CHECK_EVERY
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(pidfd)
