"""The online energy profile: what each variant costs, learned from measured batches.

Per (variant, batch size) the profile keeps an exponentially weighted moving average of
measured joules per output and of batch latency, seeded by the catalog's energy prior
(joules) and by nothing (latency: unknown until measured). Routing reads it through
:meth:`EnergyProfile.estimate`, which also accounts for the batch an output would join
given the variant's queue. Plain data in, plain data out; the caller serialises updates.

For replaying this service's own fleet in the simulator (``wattserve simulate
--profile``) it also keeps what an average tracks badly: per (variant, batch size) the
lifetime mean J/output (what the ledger's totals add up to) and the median of recent
round trips (one slow batch should not move a typical latency), and the time a served
request spends outside any batch (cache lookup and store, flights, bookkeeping).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from wattserve.policies.catalog import Catalog

DEFAULT_ALPHA = 0.2
OVERHEAD_SAMPLES = 256  # recent requests per outcome the overhead median is taken over


@dataclass(frozen=True)
class VariantEstimate:
    """What routing expects of one variant right now."""

    joules_per_output: float
    batch_size: int  # the batch a new output would join
    expected_latency_s: float | None  # queue wait + one batch; None until measured
    measured: bool  # False: the catalog prior, not yet a measurement


class MeasuredRow(NamedTuple):
    """What has been learned of one variant at one batch size."""

    variant: str
    batch_size: int
    joules_per_output: float  # EWMA: what routing uses
    batch_latency_s: float  # EWMA of round trips
    batches: int
    mean_joules_per_output: float  # over every batch measured
    median_batch_latency_s: float  # over the most recent batches
    recent_batch_latencies_s: tuple[float, ...]  # those batches' round trips


@dataclass(slots=True)
class _History:
    batches: int = 0
    joules_sum: float = 0.0
    joules_sq_sum: float = 0.0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=OVERHEAD_SAMPLES))


class EnergyProfile:
    """EWMA of measured joules/output and latency per (variant, batch size)."""

    def __init__(self, catalog: Catalog, alpha: float = DEFAULT_ALPHA) -> None:
        self._catalog = catalog
        self._alpha = alpha
        # EWMAs by variant, then batch size
        self._joules: dict[str, dict[int, float]] = {}
        self._latency_s: dict[str, dict[int, float]] = {}
        self._sizes: dict[str, list[int]] = {}  # measured batch sizes per variant, sorted
        # mean J/output ± 2 standard errors by variant, then size (two batches or more)
        self._bounds: dict[str, dict[int, tuple[float, float]]] = {}
        self._overhead_s: dict[str, deque[float]] = {}
        self._history: dict[tuple[str, int], _History] = {}

    def use_catalog(self, catalog: Catalog) -> None:
        """Estimate against ``catalog`` from now on; what was learned is kept."""
        self._catalog = catalog

    def observe(
        self, variant: str, batch_size: int, joules_per_output: float, latency_s: float
    ) -> None:
        """Fold one measured batch into the averages."""
        key = (variant, batch_size)
        sizes = self._sizes.setdefault(variant, [])
        if batch_size not in sizes:
            bisect.insort(sizes, batch_size)
        for tables, value in ((self._joules, joules_per_output), (self._latency_s, latency_s)):
            table = tables.setdefault(variant, {})
            old = table.get(batch_size)
            table[batch_size] = value if old is None else old + self._alpha * (value - old)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = _History()
        history.batches += 1
        history.joules_sum += joules_per_output
        history.joules_sq_sum += joules_per_output * joules_per_output
        history.latencies_s.append(latency_s)
        n = history.batches
        if n >= 2:
            mean = history.joules_sum / n
            variance = max(0.0, (history.joules_sq_sum - n * mean * mean) / (n - 1))
            half = 2.0 * math.sqrt(variance / n)
            self._bounds.setdefault(variant, {})[batch_size] = (mean - half, mean + half)

    @property
    def joules_bounds(self) -> dict[str, dict[int, tuple[float, float]]]:
        """(low, high) of the mean J/output (± 2 standard errors), by variant and size.

        Sizes measured in two batches or more. The live table, for the batcher to size
        batches by: read it, do not write it.
        """
        return self._bounds

    def observe_overhead(self, outcome: str, seconds: float) -> None:
        """One served request's time outside batches; ``outcome`` is ``hit`` or ``miss``."""
        recent = self._overhead_s.setdefault(outcome, deque(maxlen=OVERHEAD_SAMPLES))
        recent.append(max(0.0, seconds))

    def overhead_s(self) -> dict[str, float]:
        """Median recent time outside batches per outcome, s.

        A median, so that one slow disk write does not move it.
        """
        return {k: statistics.median(v) for k, v in sorted(self._overhead_s.items()) if v}

    def measured(self) -> list[MeasuredRow]:
        """What has been learned, per (variant, batch size)."""
        rows = []
        for variant, size in sorted(self._history):
            history = self._history[(variant, size)]
            rows.append(MeasuredRow(
                variant, size, self._joules[variant][size], self._latency_s[variant][size],
                history.batches, history.joules_sum / history.batches,
                statistics.median(history.latencies_s), tuple(history.latencies_s),
            ))  # fmt: skip
        return rows

    def _at(self, tables: dict[str, dict[int, float]], variant: str, size: int) -> float | None:
        """The value measured at ``size``, else at the nearest measured size, else None.

        Ties between two nearest sizes go to the smaller.
        """
        table = tables.get(variant)
        if not table:
            return None
        value = table.get(size)
        if value is not None:
            return value
        sizes = self._sizes[variant]
        at = bisect.bisect_left(sizes, size)
        if at == len(sizes) or (at > 0 and size - sizes[at - 1] <= sizes[at] - size):
            at -= 1
        return table[sizes[at]]

    def batch_latency_s(self, variant: str, size: int) -> float | None:
        """The measured round trip of a batch of ``size`` (nearest size), None until seen."""
        return self._at(self._latency_s, variant, size)

    def estimate(self, variant: str, queued: int) -> VariantEstimate:
        """Expected cost and latency of one more output, given ``queued`` ahead of it."""
        spec = self._catalog.get(variant)
        if spec is None:
            raise KeyError(variant)
        cap = spec.max_batch_size
        size = min(cap, queued + 1)
        measured = self._at(self._joules, variant, size)
        joules = measured if measured is not None else spec.energy_prior.at_batch_size(size)
        batch_latency = self._at(self._latency_s, variant, size)
        latency = None if batch_latency is None else (queued // cap + 1) * batch_latency
        return VariantEstimate(joules, size, latency, measured is not None)
