"""The only place the pipeline reads time, so that tests can run it on a simulated clock.

Two clocks matter: a monotonic one for pacing and measuring intervals, and the wall clock
(CLOCK_REALTIME) that stamps capture times on the wire so two hosts can compare them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Reads time in integer nanoseconds."""

    def monotonic_ns(self) -> int: ...

    def wall_ns(self) -> int: ...


class SystemClock:
    """The real clocks; ``wall_offset_ns`` shifts the wall clock (to test cross-host offsets)."""

    def __init__(self, wall_offset_ns: int = 0) -> None:
        self.wall_offset_ns = wall_offset_ns

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def wall_ns(self) -> int:
        return time.time_ns() + self.wall_offset_ns


class ManualClock:
    """A clock that only moves when told to; both readings advance together."""

    def __init__(
        self, start_ns: int = 1_000_000_000, wall_offset_ns: int = 1_700_000_000_000_000_000
    ) -> None:
        self.now_ns = start_ns
        self.wall_offset_ns = wall_offset_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns

    def monotonic_ns(self) -> int:
        return self.now_ns

    def wall_ns(self) -> int:
        return self.now_ns + self.wall_offset_ns


SYSTEM_CLOCK = SystemClock()


class Wake:
    """A wake-up one thread posts and another waits for: a ``threading.Lock`` used as a binary semaphore.

    For hand-offs on the audio path (once per packet): ``threading.Event`` is a Python-level Condition
    that allocates a lock per wait and notifies in Python; this is one C call on each side. Posts made
    while nobody waits collapse into one (the waiter then wakes once, at once), so a waiter re-checks its
    own state after every wake. Any thread may post.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held: not posted

    def post(self) -> None:
        """Wakes the waiter (now, or its next wait if none waits)."""
        with contextlib.suppress(RuntimeError):  # already posted
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s for a post and consumes it; False on timeout."""
        return self._lock.acquire(timeout=timeout)
