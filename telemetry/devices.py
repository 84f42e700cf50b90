"""One device interface, several sources: NVML on real GPUs, simulated everywhere else.

``PowerSource`` is the only thing the rest of wattserve reads power and energy through.
Units are in the names and integers at this layer (``energy_mj``, ``power_mw``), exactly
as NVML reports them; conversion to joules happens once, in a measurement.

NVML errors are converted at this boundary into ``TelemetryError`` subclasses
(``MetricNotSupported``, ``TelemetryPermissionDenied``, ``DeviceLost``,
``NvmlUnavailable``) so callers never import pynvml to handle them.

Which source serves a process is decided by :func:`open_power_sources`: NVML when it
initialises and sees devices, otherwise simulated devices; ``WATTSERVE_POWER_SOURCE``
(``auto|nvml|simulated``) overrides. Changing a power limit is not part of this
interface: it needs privileges and an explicit opt-in, and lands with the actuator.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from wattserve import WattserveError

T = TypeVar("T")
SourceKind = Literal["nvml", "simulated"]


class TelemetryError(WattserveError):
    """A power or energy reading could not be taken."""


class NvmlUnavailable(TelemetryError):
    """NVML is missing or cannot initialise (no driver, no library, no GPU)."""


class MetricNotSupported(TelemetryError):
    """This device does not report the asked-for metric (e.g. the energy counter)."""


class TelemetryPermissionDenied(TelemetryError):
    """The call needs privileges this process does not have."""


class DeviceLost(TelemetryError):
    """The device fell off the bus or was reset."""


@runtime_checkable
class PowerSource(Protocol):
    """What wattserve needs from a device that draws power."""

    index: int  # index as this process sees it (after CUDA_VISIBLE_DEVICES)
    uuid: str
    name: str
    kind: SourceKind

    def supports_energy_counter(self) -> bool:
        """Whether :meth:`energy_mj` works on this device."""
        ...

    def energy_mj(self) -> int:
        """Cumulative energy since an arbitrary origin, in millijoules."""
        ...

    def power_mw(self) -> int:
        """Current power draw, in milliwatts."""
        ...

    def utilization_pct(self) -> int | None:
        """Compute utilization in percent, None when not reported."""
        ...

    def power_limit_mw(self) -> int | None:
        """The enforced power limit, None when not reported."""
        ...

    def power_limit_constraints_mw(self) -> tuple[int, int] | None:
        """(min, max) settable power limit, None when not reported."""
        ...


# --------------------------------------------------------------------------- NVML


def _nvml() -> Any:
    """The pynvml module (from the nvidia-ml-py distribution), or NvmlUnavailable."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - it is a [serve] dependency
        raise NvmlUnavailable("pynvml (nvidia-ml-py) is not installed") from exc
    return pynvml


def _convert_nvml_errors(func: Callable[..., T]) -> Callable[..., T]:
    """Turn pynvml's exceptions into TelemetryError subclasses, keeping the cause."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        nvml = _nvml()
        try:
            return func(*args, **kwargs)
        except nvml.NVMLError as exc:
            table: dict[int, type[TelemetryError]] = {
                nvml.NVML_ERROR_NOT_SUPPORTED: MetricNotSupported,
                nvml.NVML_ERROR_NO_PERMISSION: TelemetryPermissionDenied,
                nvml.NVML_ERROR_GPU_IS_LOST: DeviceLost,
                nvml.NVML_ERROR_LIBRARY_NOT_FOUND: NvmlUnavailable,
                nvml.NVML_ERROR_DRIVER_NOT_LOADED: NvmlUnavailable,
                nvml.NVML_ERROR_UNINITIALIZED: NvmlUnavailable,
            }
            cls = table.get(getattr(exc, "value", None), TelemetryError)
            raise cls(f"{func.__name__}: {exc}") from exc

    return wrapper


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlDevice:
    """A GPU read through NVML."""

    kind: SourceKind = "nvml"

    def __init__(self, index: int, handle: Any) -> None:
        nvml = _nvml()
        self.index = index
        self._handle = handle
        self.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        self.name = _text(nvml.nvmlDeviceGetName(handle))
        self._has_counter: bool | None = None

    def supports_energy_counter(self) -> bool:
        """Volta and newer report a cumulative energy counter; probe once."""
        if self._has_counter is None:
            try:
                self.energy_mj()
                self._has_counter = True
            except TelemetryError:
                self._has_counter = False
        return self._has_counter

    @_convert_nvml_errors
    def energy_mj(self) -> int:
        """``nvmlDeviceGetTotalEnergyConsumption``: mJ since the driver loaded."""
        return int(_nvml().nvmlDeviceGetTotalEnergyConsumption(self._handle))

    @_convert_nvml_errors
    def power_mw(self) -> int:
        """``nvmlDeviceGetPowerUsage``: mW (on A100/H100 a ~25 ms window, not an average)."""
        return int(_nvml().nvmlDeviceGetPowerUsage(self._handle))

    def utilization_pct(self) -> int | None:
        """GPU utilization over the driver's last sample period."""
        try:
            return int(self._utilization().gpu)
        except TelemetryError:
            return None

    @_convert_nvml_errors
    def _utilization(self) -> Any:
        return _nvml().nvmlDeviceGetUtilizationRates(self._handle)

    def power_limit_mw(self) -> int | None:
        """The power management limit in force."""
        try:
            return int(self._limit())
        except TelemetryError:
            return None

    @_convert_nvml_errors
    def _limit(self) -> int:
        return _nvml().nvmlDeviceGetPowerManagementLimit(self._handle)

    def power_limit_constraints_mw(self) -> tuple[int, int] | None:
        """(min, max) limit the driver accepts."""
        try:
            low, high = self._constraints()
        except TelemetryError:
            return None
        return int(low), int(high)

    @_convert_nvml_errors
    def _constraints(self) -> tuple[int, int]:
        return _nvml().nvmlDeviceGetPowerManagementLimitConstraints(self._handle)


@_convert_nvml_errors
def _nvml_handles(visible: str | None) -> list[Any]:
    """Handles of the devices this process may use, in CUDA's visible order.

    ``CUDA_VISIBLE_DEVICES`` lists physical indices or UUIDs (Ray sets it per actor);
    NVML ignores it, so map each entry explicitly. MIG instances cannot be measured
    separately (NVML reports the whole GPU) and are refused.
    """
    nvml = _nvml()
    if visible is None or visible.strip() == "":
        if visible is not None:
            return []  # CUDA_VISIBLE_DEVICES="" hides every GPU
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for entry in (e.strip() for e in visible.split(",") if e.strip()):
        if entry.startswith("MIG-"):
            raise MetricNotSupported(f"MIG instance {entry}: energy is not measurable per MIG")
        if entry.startswith("GPU-"):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
        else:
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
    return handles


def open_nvml_devices(visible: str | None = None) -> list[NvmlDevice]:
    """Initialise NVML and open this process's visible GPUs."""
    nvml = _nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NvmlUnavailable(f"nvmlInit failed: {exc}") from exc
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [NvmlDevice(i, h) for i, h in enumerate(_nvml_handles(visible))]


# ---------------------------------------------------------------------- simulated

# ML.ENERGY v2 ran H100s at their 700 W maximum limit (power_limit_w_in_benchmark_queue);
# v3 measured 450-685 W average while generating. Idle draw is not in that data: 70 W is
# an assumption, named as one.
SIM_IDLE_W = 70.0
SIM_LIMIT_W = 700.0
SIM_MIN_LIMIT_W = 200.0  # H100 SXM's lowest settable limit; never above a type's limit
SIM_DEFAULT_NAME = "simulated GPU"


@dataclass(frozen=True)
class SimulatedType:
    """Idle draw and power limit of one simulated device type, and where they come from."""

    idle_w: float
    limit_w: float
    provenance: str


# Keyed by Ray's accelerator type (the node label ``ray.io/accelerator-type``: "H100"
# for every H100, PCIe ones included; the SXM board is simulated). limit_w is the
# vendor's maximum board power (TDP) for the SXM/datacenter part. idle_w is not
# sourced for any type: it stays the 70 W assumption (SIM_IDLE_W) until measured.
SIMULATED_TYPES: dict[str, SimulatedType] = {
    "H100": SimulatedType(SIM_IDLE_W, 700.0, "NVIDIA H100 datasheet: max TDP up to 700 W (SXM5)"),
    "H200": SimulatedType(SIM_IDLE_W, 700.0, "NVIDIA H200 datasheet: max TDP up to 700 W (SXM)"),
    "A100": SimulatedType(SIM_IDLE_W, 400.0, "NVIDIA A100 datasheet: max TDP 400 W (SXM4)"),
    "B200": SimulatedType(
        SIM_IDLE_W, 1000.0, "NVIDIA HGX B200 specifications: up to 1,000 W per GPU"
    ),
    "L4": SimulatedType(SIM_IDLE_W, 72.0, "NVIDIA L4 datasheet: max TDP 72 W"),
}


def simulated_type(device_type: str | None) -> tuple[str, SimulatedType | None]:
    """Display name and table row for a device type; unknown or None: the defaults."""
    row = SIMULATED_TYPES.get(device_type.upper()) if device_type else None
    if row is None:
        return SIM_DEFAULT_NAME, None
    return f"simulated {device_type.upper()}", row


class SimulatedDevice:
    """A virtual GPU whose energy counter advances with time and reported busy state.

    Power is ``idle_w`` plus, for every activity in progress, its declared power above
    idle, capped at ``limit_w``; the counter integrates that piecewise-constant power
    exactly, so any window's energy is known. Thread-safe; deterministic under an
    injected clock.
    """

    kind: SourceKind = "simulated"

    def __init__(
        self,
        index: int = 0,
        *,
        idle_w: float = SIM_IDLE_W,
        limit_w: float = SIM_LIMIT_W,
        clock: Callable[[], float] = time.monotonic,
        node: str = "local",
        name: str = SIM_DEFAULT_NAME,
    ) -> None:
        self.index = index
        self.uuid = f"SIM-{node}-{index}"
        self.name = name
        self.idle_w = idle_w
        self.limit_w = limit_w
        self._clock = clock
        self._lock = threading.Lock()
        self._active_w: dict[str, float] = {}
        self._energy_j = 0.0
        self._last_s = clock()

    def _power_w_locked(self) -> float:
        extra = sum(max(0.0, w - self.idle_w) for w in self._active_w.values())
        return min(self.limit_w, self.idle_w + extra)

    def _advance_locked(self) -> None:
        now = self._clock()
        self._energy_j += self._power_w_locked() * max(0.0, now - self._last_s)
        self._last_s = now

    def begin(self, activity: str, power_w: float) -> None:
        """An activity (a batch) starts drawing ``power_w`` in total while it runs."""
        with self._lock:
            self._advance_locked()
            self._active_w[activity] = power_w

    def end(self, activity: str) -> None:
        """The activity stopped; unknown activities are ignored (idempotent)."""
        with self._lock:
            self._advance_locked()
            self._active_w.pop(activity, None)

    def supports_energy_counter(self) -> bool:
        """The simulated counter always works."""
        return True

    def energy_mj(self) -> int:
        """Integrated energy so far, in millijoules."""
        with self._lock:
            self._advance_locked()
            return int(self._energy_j * 1000)

    def power_mw(self) -> int:
        """Current simulated draw, in milliwatts."""
        with self._lock:
            return int(self._power_w_locked() * 1000)

    def utilization_pct(self) -> int | None:
        """100 while anything runs, else 0."""
        with self._lock:
            return 100 if self._active_w else 0

    def power_limit_mw(self) -> int | None:
        """The simulated cap."""
        return int(self.limit_w * 1000)

    def power_limit_constraints_mw(self) -> tuple[int, int] | None:
        """An H100 SXM's 200 W floor (at most the limit) up to the limit."""
        return int(min(SIM_MIN_LIMIT_W, self.limit_w) * 1000), int(self.limit_w * 1000)


# ------------------------------------------------------------------------ factory


@dataclass(frozen=True)
class DeviceSet:
    """The devices a process reads, and why that source was chosen."""

    kind: SourceKind
    devices: Sequence[PowerSource]
    reason: str


def open_power_sources(
    mode: str | None = None,
    *,
    simulated_count: int = 1,
    node: str = "local",
    device_type: str | None = None,
) -> DeviceSet:
    """NVML when it initialises and sees devices, else simulated; ``mode`` overrides.

    ``mode`` defaults to ``WATTSERVE_POWER_SOURCE`` (``auto``, ``nvml`` or ``simulated``).
    ``nvml`` fails loudly when NVML is unusable instead of silently simulating.
    Simulated devices take ``device_type``'s idle and limit power and name (e.g.
    ``"simulated H100"``, see ``SIMULATED_TYPES``); unknown or None: "simulated GPU".
    """
    mode = (mode or os.environ.get("WATTSERVE_POWER_SOURCE") or "auto").lower()
    if mode not in ("auto", "nvml", "simulated"):
        raise TelemetryError(f"WATTSERVE_POWER_SOURCE must be auto, nvml or simulated: {mode!r}")
    reason = "configured: simulated"
    if mode in ("auto", "nvml"):
        try:
            devices = open_nvml_devices()
        except TelemetryError as exc:
            if mode == "nvml":
                raise
            reason = f"NVML unusable ({exc.message}); simulating"
        else:
            if devices:
                return DeviceSet("nvml", devices, "NVML initialised")
            if mode == "nvml":
                raise NvmlUnavailable("NVML initialised but sees no visible GPU")
            reason = "NVML sees no visible GPU; simulating"
    name, row = simulated_type(device_type)
    power = {"idle_w": row.idle_w, "limit_w": row.limit_w} if row is not None else {}
    sims = [SimulatedDevice(i, node=node, name=name, **power) for i in range(simulated_count)]
    return DeviceSet("simulated", sims, reason)
