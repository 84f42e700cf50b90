"""Energy attribution for one device: from counter samples to joules per batch.

The device's energy is read as a sequence of samples ``(t_s, energy_mj, power_mw)``
(periodically by the node's telemetry agent, and additionally whenever a batch starts or
ends). Every interval between two consecutive samples is measured once:

* by the **counter delta** when both readings have one and it did not go backwards;
* otherwise (no counter, counter reset or wrap) by **power x time**, the mean of the two
  power readings times the interval;
* an interval with neither is a gap: not measured, not attributed, reported in seconds.

The interval's energy is then split, never copied: the share of the interval during which
at least one batch ran goes to the batches active in it, in proportion to
``overlap_s x weight`` (weight = the batch's declared power, equal when unknown); the
rest of the interval goes to the **idle** bucket. A batch whose end is never reported is
expired after a timeout and its energy moves to the **unattributed** bucket. So over the
device's life: measured = attributed + idle + unattributed + pending (batches still open),
exactly, except where the short-window rule below replaces a counter figure.

A batch shorter than the counter's update period (NVML refreshes it every ~20-100 ms)
cannot be resolved by counter deltas; its energy is its mean sampled power x its
duration, labeled with the power source, and any difference from its counter-based share
shows up in the reconciliation error instead of being hidden.

Plain Python over an explicit sample stream: no clock of its own, no threads, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wattserve._schemas import EnergySource


@dataclass(frozen=True)
class Sample:
    """One reading of one device."""

    t_s: float
    energy_mj: int | None
    power_mw: int | None


@dataclass(frozen=True)
class BatchEnergy:
    """What a finished batch cost on this device."""

    batch_id: str
    joules: float
    source: EnergySource
    window_s: float


@dataclass(frozen=True)
class Reconciliation:
    """Where every measured joule of a device (or a sum of devices) went."""

    device_j: float
    attributed_j: float
    idle_j: float
    unattributed_j: float
    pending_j: float
    gap_s: float
    failed_attempt_j: float = 0.0  # drawn by batch attempts that produced no outputs

    @classmethod
    def zero(cls) -> Reconciliation:
        """Empty books, the start of a sum."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def error_pct(self) -> float:
        """|measured - (attributed + idle + unattributed + failed + pending)| as % of it."""
        if self.device_j <= 0:
            return 0.0
        accounted = (self.attributed_j + self.idle_j + self.unattributed_j
                     + self.failed_attempt_j + self.pending_j)  # fmt: skip
        return abs(self.device_j - accounted) / self.device_j * 100

    def __add__(self, other: Reconciliation) -> Reconciliation:
        return Reconciliation(
            self.device_j + other.device_j,
            self.attributed_j + other.attributed_j,
            self.idle_j + other.idle_j,
            self.unattributed_j + other.unattributed_j,
            self.pending_j + other.pending_j,
            self.gap_s + other.gap_s,
            self.failed_attempt_j + other.failed_attempt_j,
        )


@dataclass
class _OpenBatch:
    start_s: float
    weight: float
    joules: float = 0.0
    used_power_fallback: bool = False
    power_samples_mw: list[int] = field(default_factory=list)


class DeviceAttributor:
    """Splits one device's measured energy among the batches that ran on it.

    Not thread-safe: the telemetry agent serialises calls per device.
    """

    def __init__(
        self,
        *,
        counter_source: EnergySource,
        power_source: EnergySource,
        counter_update_s: float = 0.0,
    ) -> None:
        self.counter_source = counter_source
        self.power_source = power_source
        self.counter_update_s = counter_update_s
        self._last: Sample | None = None
        self._open: dict[str, _OpenBatch] = {}
        self._device_j = 0.0
        self._attributed_j = 0.0
        self._idle_j = 0.0
        self._unattributed_j = 0.0
        self._failed_attempt_j = 0.0
        self._gap_s = 0.0

    @property
    def open_batches(self) -> list[str]:
        """Ids of batches that started and have not ended."""
        return list(self._open)

    def add_sample(self, sample: Sample) -> None:
        """Close the interval since the previous sample and split its energy."""
        for batch in self._open.values():
            if sample.power_mw is not None:
                batch.power_samples_mw.append(sample.power_mw)
        last = self._last
        if last is not None and sample.t_s <= last.t_s:
            return  # same instant or out of order: nothing new to measure
        self._last = sample
        if last is None:
            return
        joules, by_counter = self._interval_energy(last, sample)
        if joules is None:
            self._gap_s += sample.t_s - last.t_s
            return
        self._device_j += joules
        self._split(last.t_s, sample.t_s, joules, by_counter)

    def _interval_energy(self, a: Sample, b: Sample) -> tuple[float | None, bool]:
        if a.energy_mj is not None and b.energy_mj is not None and b.energy_mj >= a.energy_mj:
            return (b.energy_mj - a.energy_mj) / 1000, True
        if a.power_mw is not None and b.power_mw is not None:
            return (a.power_mw + b.power_mw) / 2000 * (b.t_s - a.t_s), False
        return None, False

    def _split(self, t0: float, t1: float, joules: float, by_counter: bool) -> None:
        overlaps = {
            batch_id: max(0.0, t1 - max(t0, batch.start_s))
            for batch_id, batch in self._open.items()
        }
        weighted = {b: o * self._open[b].weight for b, o in overlaps.items() if o > 0}
        total_weight = sum(weighted.values())
        if total_weight <= 0:
            self._idle_j += joules
            return
        # Open batches all run until t1, so their union is [earliest start, t1].
        busy_s = t1 - max(t0, min(self._open[b].start_s for b in weighted))
        busy_j = joules * busy_s / (t1 - t0)
        self._idle_j += joules - busy_j
        for batch_id, weight in weighted.items():
            batch = self._open[batch_id]
            batch.joules += busy_j * weight / total_weight
            batch.used_power_fallback |= not by_counter

    def begin(self, batch_id: str, sample: Sample, weight: float = 1.0) -> None:
        """A batch starts at ``sample.t_s`` (a reading taken at its start)."""
        if batch_id in self._open:
            raise ValueError(f"batch {batch_id} already started")
        self.add_sample(sample)
        self._open[batch_id] = _OpenBatch(sample.t_s, max(weight, 1e-9))
        if sample.power_mw is not None:
            self._open[batch_id].power_samples_mw.append(sample.power_mw)

    def end(self, batch_id: str, sample: Sample) -> BatchEnergy:
        """The batch ended at ``sample.t_s``; return its energy and how it was measured."""
        self.add_sample(sample)
        batch = self._open.pop(batch_id)
        window_s = max(0.0, sample.t_s - batch.start_s)
        joules, source = batch.joules, self.counter_source
        if batch.used_power_fallback:
            source = self.power_source
        elif window_s < self.counter_update_s and batch.power_samples_mw:
            # Too short for the counter to resolve: mean sampled power x duration.
            mean_mw = sum(batch.power_samples_mw) / len(batch.power_samples_mw)
            joules, source = mean_mw / 1000 * window_s, self.power_source
            self._idle_j += max(0.0, batch.joules - joules)
        self._attributed_j += joules
        return BatchEnergy(batch_id, joules, source, window_s)

    def abandon(self, batch_id: str, sample: Sample) -> float:
        """The batch's attempt died or failed at ``sample.t_s``; returns its joules.

        They are a failed attempt's: in the books, charged to no output.
        """
        self.add_sample(sample)
        joules = self._open.pop(batch_id).joules
        self._failed_attempt_j += joules
        return joules

    def expire(self, older_than_s: float) -> list[str]:
        """Give up on batches started before ``older_than_s``: their energy is unattributed."""
        lost = [b for b, batch in self._open.items() if batch.start_s < older_than_s]
        for batch_id in lost:
            self._unattributed_j += self._open.pop(batch_id).joules
        return lost

    def reconciliation(self) -> Reconciliation:
        """Totals since this device was first sampled."""
        return Reconciliation(
            device_j=self._device_j,
            attributed_j=self._attributed_j,
            idle_j=self._idle_j,
            unattributed_j=self._unattributed_j,
            pending_j=sum(b.joules for b in self._open.values()),
            gap_s=self._gap_s,
            failed_attempt_j=self._failed_attempt_j,
        )
