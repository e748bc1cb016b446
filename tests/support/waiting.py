"""Waiting for something another thread or process does, without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until[T](
    condition: Callable[[], T | None], *, timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Call `condition` until it returns something truthy, and return that; AssertionError if
    it has not within `timeout` seconds (`what` says what was awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)
