"""Energy measurements: joules that always carry where they came from.

Until live NVML telemetry lands, batch energy is **simulated**: the variant's declared
active power (catalog ``power_w``) times the busy time the worker measured. That is a
model, not a measurement, and every figure it produces says so (``simulated``). When a
batch fails before the worker can time it, the scheduler's own wall time stands in and
the figure is labeled ``estimated``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def simulated_batch_energy(power_w: float, busy_s: float) -> EnergyMeasurement:
    """Declared active power x measured busy time, labeled ``simulated``."""
    return EnergyMeasurement(joules=power_w * busy_s, source="simulated", window_s=busy_s)


def estimated_batch_energy(power_w: float, wall_s: float) -> EnergyMeasurement:
    """Declared power x the caller's wall time, for batches the worker never timed."""
    return EnergyMeasurement(joules=power_w * wall_s, source="estimated", window_s=wall_s)
