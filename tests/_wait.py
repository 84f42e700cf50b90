"""Waiting on real processes in tests: poll with a deadline, never sleep and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.5) -> T:
    """``probe()``'s first non-None answer, polled until ``timeout_s``, else TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(every_s)
