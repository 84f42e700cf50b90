"""Watching a cluster's power while a burst of requests runs: for the cap test and benchmark.

The lease book's promise is checked from the outside: a burst of distinct mixed-tier
requests is sent at once through the SDK while a reader of the cluster's power (the
caller's: ``cluster.admission.cluster_power_w`` reads every node's agent directly) is
sampled at a fixed period, so the samples do not depend on the service's own view.
``bench._live_stats.longest_over_cap_s`` then reads the samples.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from wattserve import AsyncClient

T = TypeVar("T")
TIERS = ("draft", "standard", "high")


async def burst(
    url: str, requests: int, seed0: int, timeout_s: float = 900
) -> tuple[list[object], float]:
    """``requests`` distinct requests at once, tiers in turn; (results or errors, seconds)."""
    started = time.monotonic()
    async with AsyncClient(url, timeout_s=timeout_s) as client:
        results = await asyncio.gather(
            *(client.generate(f"burst {seed0 + i}", seed=seed0 + i, quality=TIERS[i % 3],
                              size="64x64") for i in range(requests)),
            return_exceptions=True,
        )  # fmt: skip
    return list(results), time.monotonic() - started


def status_counts(results: list[object]) -> dict[str, int]:
    """``{"200": n, "<ErrorClass>": m, ...}`` over a burst's results."""
    counts: dict[str, int] = {}
    for result in results:
        key = type(result).__name__ if isinstance(result, BaseException) else "200"
        counts[key] = counts.get(key, 0) + 1
    return counts


async def sampled(
    load: Awaitable[T],
    read_w: Callable[[], float],
    samples: list[tuple[float, float]],
    every_s: float,
) -> T:
    """Await ``load`` while appending (time s, ``read_w()``) to ``samples`` every ``every_s``.

    ``read_w`` may block (it runs in a thread).
    """
    task = asyncio.ensure_future(load)
    while not task.done():
        samples.append((time.monotonic(), await asyncio.to_thread(read_w)))
        await asyncio.sleep(every_s)
    return await task
