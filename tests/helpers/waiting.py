"""Waiting on a condition in tests, with a deadline: never a bare sleep standing in for synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``cond`` every 10 ms until it holds; raises TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)
