"""The running counts behind ``bench.trace.trace_stats``, fed one request at a time."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, get_args

from wattserve._schemas import Quality

if TYPE_CHECKING:
    from wattserve.bench.trace import TraceRequest

QUALITIES: tuple[Quality, ...] = get_args(Quality)


class Tally:
    """Repeats, distinct outputs, mixes and timing of a stream of trace requests.

    A request is a repeat when a seeded request with the same prompt, seed, size and
    quality came before it; every unseeded request is a distinct output. Memory grows
    with the distinct seeded outputs, not with the requests.
    """

    def __init__(self) -> None:
        self.requests = self.images = self.unseeded = self.repeats = 0
        self.last_s = 0.0
        self.outputs: Counter[tuple[str, int, str, str]] = Counter()
        self.tiers: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()
        self.tenants: Counter[str] = Counter()

    def add(self, request: TraceRequest) -> TraceRequest:
        """Count ``request``; return it, so a tally can sit in a stream (``map``)."""
        self.requests += 1
        self.images += request.n
        self.last_s = request.arrival_s
        self.tiers[request.quality] += 1
        self.sizes[request.size] += 1
        if request.tenant is not None:
            self.tenants[request.tenant] += 1
        if request.seed is None:
            self.unseeded += 1
        else:
            key = (request.prompt, request.seed, request.size, request.quality)
            self.repeats += key in self.outputs
            self.outputs[key] += 1
        return request

    def summary(self) -> dict[str, Any]:
        """The statistics as plain values; fractions of requests rounded to 4 places."""

        def share(count: int) -> float:
            return round(count / self.requests, 4) if self.requests else 0.0

        return {
            "requests": self.requests,
            "images": self.images,
            "repeats": self.repeats,
            "repeat_rate": share(self.repeats),
            "distinct_outputs": len(self.outputs) + self.unseeded,
            "hottest_output_share": share(max(self.outputs.values(), default=0)),
            "seeded_fraction": share(self.requests - self.unseeded),
            "tiers": {tier: share(self.tiers[tier]) for tier in QUALITIES},
            "sizes": {size: share(count) for size, count in sorted(self.sizes.items())},
            "tenants": {name: share(count) for name, count in sorted(self.tenants.items())},
            "duration_s": round(self.last_s, 3),
            "mean_rate_per_s": round(self.requests / self.last_s, 4) if self.last_s else None,
        }
