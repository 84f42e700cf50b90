"""The telemetry agent without Ray: injected clock, simulated devices."""

import time

import pytest

from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
from wattserve.telemetry.devices import (
    DeviceSet,
    SimulatedDevice,
    TelemetryError,
    open_power_sources,
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def agent_with(clock, count=1):
    devices = [SimulatedDevice(i, clock=clock) for i in range(count)]
    return TelemetryAgent(DeviceSet("simulated", devices, "test"), sample_hz=10, clock=clock)


def test_batches_on_one_device_are_priced_and_the_books_balance():
    clock = Clock()
    agent = agent_with(clock)
    meter = LocalMeter(agent)
    clock.now = 1.0
    agent.sample_once()
    meter.begin("a", power_w=450)
    clock.now = 3.0
    energy = meter.end("a")
    assert (energy.joules, energy.source, energy.window_s) == (900.0, "simulated", 2.0)
    clock.now = 4.0
    agent.sample_once()
    rec = agent.reconciliation()
    assert (rec.device_j, rec.attributed_j, rec.idle_j) == (pytest.approx(1040), 900, 140)
    assert rec.error_pct == pytest.approx(0)


def test_status_reports_power_window_and_limits():
    clock = Clock()
    agent = agent_with(clock, count=2)
    agent.batch_started("b", 400, device_uuid="SIM-local-1")
    node, devices = agent.status()
    assert node.power_w == pytest.approx(70 + 400)
    second = devices[1]
    assert (second.id, second.source, second.power_w) == ("SIM-local-1", "simulated", 400)
    assert second.power_limit_w == 700 and second.utilization_pct == 100
    with pytest.raises(TelemetryError, match="not on node"):
        agent.batch_started("c", 400, device_uuid="GPU-elsewhere")


def test_sampling_thread_runs_and_costs_little():
    agent = TelemetryAgent(open_power_sources("simulated"), sample_hz=50)
    agent.start()
    time.sleep(0.5)
    agent.stop()
    assert agent.status()[0].window_s >= 0.3  # ring buffer filled by the thread
    assert 0 < agent.sampling_cpu_pct < 20


def test_workers_without_a_gpu_get_their_own_simulated_device_round_robin():
    clock = Clock()
    agent = agent_with(clock, count=2)
    first, second, third = (agent.assign_device(k) for k in ("w1", "w2", "w3"))
    assert (first, second, third) == ("SIM-local-0", "SIM-local-1", "SIM-local-0")
    assert agent.assign_device("w2") == second  # sticky
