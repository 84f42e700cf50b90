"""The node telemetry agent: samples every local device and prices batches.

One ``TelemetryAgent`` per node owns that node's devices (NVML or simulated, from
:func:`telemetry.devices.open_power_sources`). A background thread samples each device
at ``sample_hz`` (default 10 Hz) into a bounded ring buffer and feeds each device's
:class:`~telemetry.attribution.DeviceAttributor`. Workers report batch start and end;
the agent takes a reading at each, so a batch's window is bounded by real samples, and
answers the batch's joules with their source. Status and reconciliation are served from
the same state, so the scheduler never calls NVML itself.

Plain Python with an injected clock: the Ray actor that hosts it lives in
``cluster/agents.py``; tests and the GPU check drive it directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

from wattserve._schemas import DeviceInfo, EnergySource, NodeInfo
from wattserve.telemetry.attribution import BatchEnergy, DeviceAttributor, Reconciliation, Sample
from wattserve.telemetry.devices import DeviceSet, PowerSource, SimulatedDevice, TelemetryError
from wattserve.telemetry.energy import EnergyMeasurement

log = structlog.get_logger(__name__)

AGENT_NAMESPACE = "wattserve"
DEFAULT_SAMPLE_HZ = 10.0
# NVML refreshes the energy counter every ~20-100 ms depending on the GPU; windows shorter
# than this are priced by sampled power instead (see telemetry.attribution).
NVML_COUNTER_UPDATE_S = 0.1
BATCH_TIMEOUT_S = 900.0


def agent_actor_name(node_id: str) -> str:
    """Ray actor name of the telemetry agent on ``node_id``."""
    return f"wattserve-telemetry-{node_id}"


def _labels(device: PowerSource) -> tuple[EnergySource, EnergySource, float]:
    """(counter label, power label, counter update period) for a device."""
    if isinstance(device, SimulatedDevice) or device.kind == "simulated":
        return "simulated", "simulated", 0.0
    if device.supports_energy_counter():
        return "nvml-counter", "nvml-power", NVML_COUNTER_UPDATE_S
    return "nvml-power", "nvml-power", 0.0


class TelemetryAgent:
    """Samples a node's devices and attributes their energy to batches. Thread-safe."""

    def __init__(
        self,
        devices: DeviceSet,
        *,
        node_id: str = "local",
        sample_hz: float = DEFAULT_SAMPLE_HZ,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sample_hz <= 0:
            raise ValueError("sample_hz must be positive")
        self.node_id = node_id
        self.kind = devices.kind
        self.devices = list(devices.devices)
        self.sample_hz = sample_hz
        self._clock = clock
        self._lock = threading.Lock()
        self._attributors = []
        for device in self.devices:
            counter, power, update_s = _labels(device)
            self._attributors.append(
                DeviceAttributor(
                    counter_source=counter, power_source=power, counter_update_s=update_s
                )
            )
        self._ring: deque[tuple[float, tuple[int | None, ...]]] = deque(
            maxlen=max(1, int(window_s * sample_hz))
        )
        self._batch_device: dict[str, int] = {}
        self._batch_owner: dict[str, str] = {}  # batch -> the worker running it, if known
        self._assigned: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampling_cpu_s = 0.0
        self._sampling_wall_s = 0.0
        self.sample_once()

    # ----------------------------------------------------------------- sampling

    def _read(self, device: PowerSource, now: float) -> Sample:
        try:
            energy_mj: int | None = device.energy_mj()
        except TelemetryError:
            energy_mj = None
        try:
            power_mw: int | None = device.power_mw()
        except TelemetryError:
            power_mw = None
        return Sample(now, energy_mj, power_mw)

    def sample_once(self) -> None:
        """Read every device once and feed the attributors and the ring buffer."""
        with self._lock:
            now = self._clock()
            samples = [self._read(d, now) for d in self.devices]
            for attributor, sample in zip(self._attributors, samples, strict=True):
                attributor.add_sample(sample)
            self._ring.append((now, tuple(s.power_mw for s in samples)))
            for attributor in self._attributors:
                attributor.expire(now - BATCH_TIMEOUT_S)

    def _loop(self) -> None:
        period_s = 1.0 / self.sample_hz
        started_wall, started_cpu = time.monotonic(), time.thread_time()
        next_s = started_wall
        while not self._stop.is_set():
            self.sample_once()
            self._sampling_cpu_s = time.thread_time() - started_cpu
            self._sampling_wall_s = time.monotonic() - started_wall
            next_s += period_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def start(self) -> None:
        """Start the background sampling thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="wattserve-sampler", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def sampling_cpu_pct(self) -> float:
        """CPU time of the sampling thread as a percentage of one core, since start."""
        if self._sampling_wall_s <= 0:
            return 0.0
        return self._sampling_cpu_s / self._sampling_wall_s * 100

    # ------------------------------------------------------------------ batches

    def assign_device(self, worker_key: str) -> str | None:
        """A simulated device for a worker with no GPU of its own: round-robin, sticky.

        On a real (NVML) node a worker without a GPU gets None: it is not charged to a GPU.
        """
        if self.kind != "simulated":
            return None
        with self._lock:
            index = self._assigned.setdefault(worker_key, len(self._assigned) % len(self.devices))
        return self.devices[index].uuid

    def device_index(self, device_uuid: str | None) -> int:
        """The local device a worker runs on: by UUID, else the first device."""
        if device_uuid is not None:
            for index, device in enumerate(self.devices):
                if device.uuid == device_uuid:
                    return index
            raise TelemetryError(f"device {device_uuid} is not on node {self.node_id}")
        return 0

    def batch_started(
        self,
        batch_id: str,
        power_w: float,
        device_uuid: str | None = None,
        owner: str | None = None,
    ) -> None:
        """A batch begins on a device; ``power_w`` is its declared draw (the split weight).

        ``owner`` names the worker running it, so the batch can be closed if that worker
        dies before reporting its end (``abandon_owner``).
        """
        index = self.device_index(device_uuid)
        device = self.devices[index]
        with self._lock:
            if isinstance(device, SimulatedDevice):
                device.begin(batch_id, power_w)
            self._attributors[index].begin(batch_id, self._read(device, self._clock()), power_w)
            self._batch_device[batch_id] = index
            if owner is not None:
                self._batch_owner[batch_id] = owner

    def batch_abandoned(self, batch_id: str) -> bool:
        """The batch's attempt failed: end its draw, book its joules as a failed attempt.

        False if the batch is not open here (ended, or abandoned already).
        """
        with self._lock:
            index = self._batch_device.pop(batch_id, None)
            if index is None:
                return False
            self._batch_owner.pop(batch_id, None)
            device = self.devices[index]
            if isinstance(device, SimulatedDevice):
                device.end(batch_id)
            joules = self._attributors[index].abandon(batch_id, self._read(device, self._clock()))
        log.warning("batch_abandoned", batch_id=batch_id, failed_attempt_j=round(joules, 3))
        return True

    def open_owners(self) -> set[str]:
        """Workers that have a batch open here."""
        with self._lock:
            return set(self._batch_owner.values())

    def abandon_owner(self, owner: str) -> list[str]:
        """``owner`` died: abandon every batch it left open; their ids."""
        with self._lock:
            batches = [b for b, o in self._batch_owner.items() if o == owner]
        return [b for b in batches if self.batch_abandoned(b)]

    def batch_finished(self, batch_id: str) -> EnergyMeasurement:
        """The batch ended: its joules on the device, with the method that measured them."""
        with self._lock:
            index = self._batch_device.pop(batch_id)
            self._batch_owner.pop(batch_id, None)
            device = self.devices[index]
            if isinstance(device, SimulatedDevice):
                device.end(batch_id)
            energy: BatchEnergy = self._attributors[index].end(
                batch_id, self._read(device, self._clock())
            )
        return EnergyMeasurement(energy.joules, energy.source, energy.window_s)

    # ---------------------------------------------------------------- reporting

    def _window_power_w(self, index: int) -> float | None:
        values = [powers[index] for _, powers in self._ring if powers[index] is not None]
        return sum(values) / len(values) / 1000 if values else None  # type: ignore[operator]

    def power_w(self) -> float:
        """The node's power read now, W: what the admission service holds against the cap."""
        with self._lock:
            readings = [d.power_mw() for d in self.devices]
        return sum(readings) / 1000

    def status(self) -> tuple[NodeInfo, list[DeviceInfo]]:
        """The node's totals and each device's current and windowed power."""
        with self._lock:
            devices = []
            for index, device in enumerate(self.devices):
                now = self._read(device, self._clock())
                limit_mw = device.power_limit_mw()
                devices.append(
                    DeviceInfo(
                        node_id=self.node_id,
                        id=device.uuid,
                        index=index,
                        name=device.name,
                        source=self._attributors[index].counter_source,
                        power_w=None if now.power_mw is None else now.power_mw / 1000,
                        power_w_window=self._window_power_w(index),
                        energy_j=None if now.energy_mj is None else now.energy_mj / 1000,
                        power_limit_w=None if limit_mw is None else limit_mw / 1000,
                        utilization_pct=device.utilization_pct(),
                    )
                )
            window_s = len(self._ring) / self.sample_hz
        node = NodeInfo(
            node_id=self.node_id,
            source_kind=self.kind,
            power_w=sum(d.power_w or 0.0 for d in devices),
            window_s=window_s,
            sample_hz=self.sample_hz,
            sampling_cpu_pct=round(self.sampling_cpu_pct, 3),
        )
        return node, devices

    def reconciliation(self) -> Reconciliation:
        """Where all energy measured on this node since the agent started went."""
        with self._lock:
            return sum((a.reconciliation() for a in self._attributors), Reconciliation.zero())


class LocalMeter:
    """A worker's meter over an in-process agent (tests, the GPU check, single process)."""

    def __init__(self, agent: TelemetryAgent, device_uuid: str | None = None) -> None:
        self.agent = agent
        self.device_uuid = device_uuid

    def begin(self, batch_id: str, power_w: float) -> None:
        """Report a batch start."""
        self.agent.batch_started(batch_id, power_w, self.device_uuid)

    def end(self, batch_id: str) -> EnergyMeasurement:
        """Report a batch end and get its energy."""
        return self.agent.batch_finished(batch_id)

    def abandon(self, batch_id: str) -> None:
        """Report a failed batch."""
        self.agent.batch_abandoned(batch_id)
