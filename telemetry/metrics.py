"""Prometheus metrics through Ray's metrics API (``ray.util.metrics``).

Ray exports them on each node's metrics endpoint with the rest of Ray's metrics. Names
carry units: ``wattserve_device_power_watts``, ``wattserve_device_energy_joules``,
``wattserve_joules_total`` (by variant and energy source), ``wattserve_outputs_total``
and ``wattserve_joules_per_output`` (last batch, by variant); the shadow audit's
``wattserve_audits_total`` (by variant, cause, tier, status), ``wattserve_audit_score``
(last score, by variant, cause and measure; ``random_weights`` says when it means
nothing) and ``wattserve_audit_joules_total`` (by source). Created lazily, inside Ray
processes only.
"""

from __future__ import annotations

from wattserve._schemas import DeviceInfo
from wattserve.telemetry.audits import SCORES, AuditRow


class AgentMetrics:
    """Device gauges, recorded by a node's telemetry agent."""

    def __init__(self, node_id: str) -> None:
        from ray.util.metrics import Gauge

        keys = ("node", "device", "source")
        self._node = node_id[:12]
        self._power = Gauge("wattserve_device_power_watts", "Device power draw", tag_keys=keys)
        self._energy = Gauge(
            "wattserve_device_energy_joules", "Device cumulative energy", tag_keys=keys
        )

    def record_devices(self, devices: list[DeviceInfo]) -> None:
        """Set the gauges from an agent's device snapshot."""
        for device in devices:
            tags = {"node": self._node, "device": device.id, "source": device.source}
            if device.power_w is not None:
                self._power.set(device.power_w, tags=tags)
            if device.energy_j is not None:
                self._energy.set(device.energy_j, tags=tags)


class SchedulerMetrics:
    """Per-variant energy counters, recorded by the scheduler for every finished batch."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self._joules = Counter(
            "wattserve_joules_total", "Joules charged to outputs", tag_keys=("variant", "source")
        )
        self._outputs = Counter(
            "wattserve_outputs_total", "Outputs generated", tag_keys=("variant",)
        )
        self._per_output = Gauge(
            "wattserve_joules_per_output", "Joules per output of the last batch",
            tag_keys=("variant", "source"),
        )  # fmt: skip

    def record_batch(self, variant: str, source: str, joules: float, outputs: int) -> None:
        """Count one finished batch."""
        tags = {"variant": variant, "source": source}
        self._joules.inc(joules, tags=tags)
        self._outputs.inc(outputs, tags={"variant": variant})
        if outputs:
            self._per_output.set(joules / outputs, tags=tags)


class AuditMetrics:
    """The shadow audit's series, recorded by the scheduler replica for each audit."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self._audits = Counter(
            "wattserve_audits_total", "Outputs audited against the reference variant",
            tag_keys=("variant", "cause", "tier", "status"),
        )  # fmt: skip
        self._score = Gauge(
            "wattserve_audit_score", "Last audit score of a served output against its reference",
            tag_keys=("variant", "cause", "measure", "random_weights"),
        )  # fmt: skip
        self._joules = Counter(
            "wattserve_audit_joules_total", "Joules the audit's reference runs drew",
            tag_keys=("source",),
        )  # fmt: skip

    def record(self, row: AuditRow) -> None:
        """Count one audit and set its scores."""
        self._audits.inc(1, tags={"variant": row.variant, "cause": row.cause, "tier": row.tier,
                                  "status": row.status})  # fmt: skip
        if row.joules:
            self._joules.inc(row.joules, tags={"source": row.energy_source})
        for measure in SCORES:
            value = getattr(row, measure)
            if value is not None:
                tags = {
                    "variant": row.variant,
                    "cause": row.cause,
                    "measure": measure,
                    "random_weights": str(row.random_weights and measure == "clip_drop"),
                }
                self._score.set(value, tags=tags)  # fmt: skip
