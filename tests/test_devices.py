"""The device layer: NVML paths against an in-process fake of the NVML calls we use."""

import sys
import types

import pynvml
import pytest

from wattserve.telemetry.devices import (
    DeviceLost,
    MetricNotSupported,
    NvmlUnavailable,
    PowerSource,
    SimulatedDevice,
    TelemetryError,
    TelemetryPermissionDenied,
    open_power_sources,
)


class FakeGpu:
    def __init__(self, uuid, energy_mj=1_000, power_mw=300_000, errors=None):
        self.uuid, self.energy, self.power = uuid, energy_mj, power_mw
        self.errors = errors or {}  # NVML function name -> NVML error code


def fake_nvml(gpus, init_error=None):
    """A stand-in pynvml module: real error classes and codes, fake device calls."""

    def call(name, handle, value):
        if name in handle.errors:
            raise pynvml.NVMLError(handle.errors[name])
        return value

    def init():
        if init_error is not None:
            raise pynvml.NVMLError(init_error)

    by_uuid = {g.uuid: g for g in gpus}
    fake = types.SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        **{k: getattr(pynvml, k) for k in dir(pynvml) if k.startswith("NVML_ERROR_")},
    )
    fake.nvmlInit = init
    fake.nvmlDeviceGetCount = lambda: len(gpus)
    fake.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    fake.nvmlDeviceGetHandleByUUID = lambda u: by_uuid[u]
    fake.nvmlDeviceGetUUID = lambda h: h.uuid
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: call("energy", h, h.energy)
    fake.nvmlDeviceGetPowerUsage = lambda h: call("power", h, h.power)
    fake.nvmlDeviceGetUtilizationRates = lambda h: call(
        "util", h, types.SimpleNamespace(gpu=87, memory=10)
    )
    fake.nvmlDeviceGetPowerManagementLimit = lambda h: call("limit", h, 700_000)
    fake.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: call(
        "limit", h, (200_000, 700_000)
    )
    return fake


@pytest.fixture
def install(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WATTSERVE_POWER_SOURCE", raising=False)

    def _install(fake):
        monkeypatch.setitem(sys.modules, "pynvml", fake)

    return _install


def test_auto_picks_nvml_when_it_sees_gpus(install):
    install(fake_nvml([FakeGpu("GPU-a", energy_mj=5_000, power_mw=420_000)]))
    found = open_power_sources()
    assert found.kind == "nvml"
    device = found.devices[0]
    assert isinstance(device, PowerSource)
    assert (device.uuid, device.name, device.kind) == ("GPU-a", "NVIDIA H100 80GB HBM3", "nvml")
    assert (device.energy_mj(), device.power_mw()) == (5_000, 420_000)
    assert device.supports_energy_counter()
    assert (device.utilization_pct(), device.power_limit_mw()) == (87, 700_000)
    assert device.power_limit_constraints_mw() == (200_000, 700_000)


def test_auto_falls_back_to_labeled_simulation_without_nvml(install):
    install(fake_nvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    found = open_power_sources()
    assert found.kind == "simulated" and "NVML unusable" in found.reason
    assert all(d.kind == "simulated" for d in found.devices)
    with pytest.raises(NvmlUnavailable):
        open_power_sources("nvml")


def test_nvml_with_no_visible_gpu(install, monkeypatch):
    install(fake_nvml([FakeGpu("GPU-a")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert open_power_sources().kind == "simulated"
    with pytest.raises(NvmlUnavailable, match="no visible GPU"):
        open_power_sources("nvml")


def test_forced_simulation_and_bad_mode(install):
    install(fake_nvml([FakeGpu("GPU-a")]))
    assert open_power_sources("simulated").kind == "simulated"
    with pytest.raises(TelemetryError, match="auto, nvml or simulated"):
        open_power_sources("guess")


@pytest.mark.parametrize(
    ("visible", "uuids"),
    [("2,0", ["GPU-c", "GPU-a"]), ("GPU-b", ["GPU-b"]), (" 1 , GPU-c ", ["GPU-b", "GPU-c"])],
)
def test_cuda_visible_devices_maps_visible_index_to_physical_device(
    install, monkeypatch, visible, uuids
):
    install(fake_nvml([FakeGpu("GPU-a"), FakeGpu("GPU-b"), FakeGpu("GPU-c")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    devices = open_power_sources().devices
    assert [d.uuid for d in devices] == uuids
    assert [d.index for d in devices] == list(range(len(uuids)))


def test_mig_instances_are_refused_not_misreported(install, monkeypatch):
    install(fake_nvml([FakeGpu("GPU-a")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    with pytest.raises(MetricNotSupported, match="MIG"):
        open_power_sources("nvml")


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, MetricNotSupported),
        (pynvml.NVML_ERROR_NO_PERMISSION, TelemetryPermissionDenied),
        (pynvml.NVML_ERROR_GPU_IS_LOST, DeviceLost),
        (pynvml.NVML_ERROR_UNKNOWN, TelemetryError),
    ],
)
def test_each_nvml_error_becomes_our_exception_with_cause(install, code, exc):
    install(fake_nvml([FakeGpu("GPU-a", errors={"energy": code, "power": code})]))
    device = open_power_sources().devices[0]
    with pytest.raises(exc) as info:
        device.power_mw()
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert not device.supports_energy_counter()


def test_unsupported_optional_metrics_read_as_none(install):
    install(
        fake_nvml(
            [
                FakeGpu(
                    "GPU-a",
                    errors={
                        "util": pynvml.NVML_ERROR_NOT_SUPPORTED,
                        "limit": pynvml.NVML_ERROR_NO_PERMISSION,
                    },
                )
            ]
        )
    )
    device = open_power_sources().devices[0]
    assert device.utilization_pct() is None
    assert device.power_limit_mw() is None and device.power_limit_constraints_mw() is None
    assert device.power_mw() == 300_000


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_simulated_counter_integrates_idle_and_busy_power_exactly():
    clock = Clock()
    gpu = SimulatedDevice(idle_w=70, limit_w=700, clock=clock)
    clock.now = 2.0
    assert gpu.energy_mj() == 140_000  # 2 s idle
    gpu.begin("b1", power_w=450)
    assert (gpu.power_mw(), gpu.utilization_pct()) == (450_000, 100)
    clock.now = 3.0
    gpu.begin("b2", power_w=400)  # overlapping: 70 + 380 + 330 = 780 W, capped at 700
    assert gpu.power_mw() == 700_000
    clock.now = 3.5
    gpu.end("b1")
    gpu.end("b1")  # idempotent
    assert gpu.power_mw() == 400_000
    clock.now = 4.5
    gpu.end("b2")
    assert gpu.energy_mj() == 140_000 + 450_000 + 350_000 + 400_000
    clock.now = 5.5
    assert gpu.energy_mj() == 1_340_000 + 70_000
    assert gpu.utilization_pct() == 0 and gpu.supports_energy_counter()


@pytest.mark.parametrize(
    ("device_type", "name", "limit_w"),
    [
        ("H100", "simulated H100", 700),
        ("H200", "simulated H200", 700),
        ("a100", "simulated A100", 400),
        ("B200", "simulated B200", 1000),
        ("L4", "simulated L4", 72),
        ("RTX-PRO-6000", "simulated GPU", 700),  # unknown type: today's defaults
        (None, "simulated GPU", 700),
    ],
)
def test_simulated_devices_take_the_node_device_type(install, device_type, name, limit_w):
    install(fake_nvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    found = open_power_sources(simulated_count=2, node="n1", device_type=device_type)
    assert found.kind == "simulated" and len(found.devices) == 2
    for index, device in enumerate(found.devices):
        assert (device.name, device.uuid) == (name, f"SIM-n1-{index}")
        assert device.power_mw() == 70_000  # idle is the 70 W assumption for every type
        assert device.power_limit_mw() == limit_w * 1000
        low, high = device.power_limit_constraints_mw()
        assert low <= high == limit_w * 1000


def test_simulated_type_caps_busy_power_at_its_limit():
    (gpu,) = open_power_sources("simulated", device_type="L4").devices
    gpu.begin("b1", power_w=450)
    assert gpu.power_mw() == 72_000


def test_nvml_devices_ignore_the_device_type(install):
    install(fake_nvml([FakeGpu("GPU-a")]))
    found = open_power_sources(device_type="L4")
    assert found.kind == "nvml" and found.devices[0].name == "NVIDIA H100 80GB HBM3"
