"""Energy measurements: joules that always carry where they came from.

Batch energy comes from the node's telemetry agent (``telemetry.agent``): measured on
the device (``nvml-counter``, ``nvml-power``) or on a simulated device (``simulated``).
When no device reading covers a batch (it failed before the worker could report it, or
the agent was unreachable), the variant's declared power times wall time stands in, and
the figure is labeled ``estimated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from wattserve._schemas import EnergySource


@dataclass(frozen=True)
class EnergyMeasurement:
    """Joules spent over a window, with the method that produced the number."""

    joules: float
    source: EnergySource
    window_s: float

    def per_output(self, outputs: int) -> float:
        """Equal share of this energy for each of ``outputs`` outputs of one batch."""
        return self.joules / outputs if outputs else 0.0


class BatchMeter(Protocol):
    """How a worker reports a batch to telemetry and learns what it cost."""

    def begin(self, batch_id: str, power_w: float) -> None:
        """The batch starts now; ``power_w`` is its declared draw."""
        ...

    def end(self, batch_id: str) -> EnergyMeasurement:
        """The batch ended now; return its energy."""
        ...

    def abandon(self, batch_id: str) -> None:
        """The batch failed now: its energy is a failed attempt's, charged to no output."""
        ...


def estimated_batch_energy(power_w: float, wall_s: float) -> EnergyMeasurement:
    """Declared power x wall time, for batches no device reading covers."""
    return EnergyMeasurement(joules=power_w * wall_s, source="estimated", window_s=wall_s)
