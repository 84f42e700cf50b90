"""Attribution and reconciliation, driven by hand-built sample streams (no clock, no Ray)."""

import pytest

from wattserve.telemetry.attribution import DeviceAttributor, Sample
from wattserve.telemetry.devices import SimulatedDevice


def nvml(counter_update_s=0.1):
    return DeviceAttributor(
        counter_source="nvml-counter", power_source="nvml-power", counter_update_s=counter_update_s
    )


def s(t, mj, mw=None):
    return Sample(t_s=t, energy_mj=mj, power_mw=mw)


def test_single_batch_gets_its_counter_delta_and_idle_is_kept_apart():
    dev = nvml()
    dev.add_sample(s(0.0, 0))
    dev.add_sample(s(1.0, 100_000))  # 100 J idle
    dev.begin("b1", s(1.5, 150_000))  # 50 J more idle
    dev.add_sample(s(2.0, 400_000))
    result = dev.end("b1", s(2.5, 650_000))
    assert (result.joules, result.source, result.window_s) == (500.0, "nvml-counter", 1.0)
    rec = dev.reconciliation()
    assert (rec.device_j, rec.attributed_j, rec.idle_j, rec.pending_j) == (650, 500, 150, 0)
    assert rec.error_pct == 0


def test_overlapping_batches_split_by_declared_power_never_double_charged():
    dev = nvml()
    dev.begin("big", s(0.0, 0), weight=3)
    dev.add_sample(s(1.0, 300_000))  # big alone: 300 J
    dev.begin("small", s(1.0, 300_000), weight=1)
    dev.add_sample(s(2.0, 700_000))  # both: 400 J split 3:1
    big = dev.end("big", s(2.0, 700_000))
    small = dev.end("small", s(3.0, 800_000))  # small alone: 100 J
    assert big.joules == pytest.approx(300 + 300)
    assert small.joules == pytest.approx(100 + 100)
    assert big.joules + small.joules == dev.reconciliation().device_j


def test_equal_split_when_power_unknown_and_pending_while_open():
    dev = nvml()
    dev.begin("a", s(0, 0))
    dev.begin("b", s(0, 0))
    dev.add_sample(s(1, 90_000))
    rec = dev.reconciliation()
    assert rec.pending_j == 90 and rec.attributed_j == 0 and rec.error_pct == 0
    assert dev.end("a", s(1, 90_000)).joules == 45
    assert sorted(dev.open_batches) == ["b"]


def test_zero_length_window_costs_nothing_and_breaks_nothing():
    dev = nvml()
    dev.add_sample(s(0, 0, 100_000))
    dev.begin("z", s(1, 100_000, 100_000))
    result = dev.end("z", s(1, 100_000, 100_000))
    assert result.joules == 0 and result.window_s == 0
    assert dev.reconciliation().device_j == 100


def test_window_shorter_than_counter_update_uses_power_and_says_so():
    # The counter refreshes every 100 ms; a 40 ms batch sees a stale counter (no change).
    dev = nvml(counter_update_s=0.1)
    dev.add_sample(s(0.00, 1_000, 300_000))
    dev.begin("short", s(0.05, 1_000, 500_000))
    result = dev.end("short", s(0.09, 1_000, 500_000))
    assert result.source == "nvml-power"
    assert result.joules == pytest.approx(500 * 0.04)
    # the counter never saw those 20 J, so the books are honestly off by that much
    dev.add_sample(s(0.10, 41_000, 300_000))
    rec = dev.reconciliation()
    assert rec.device_j == pytest.approx(40)
    assert rec.attributed_j + rec.idle_j == pytest.approx(60)
    assert rec.error_pct == pytest.approx(50)


def test_long_batches_with_a_100ms_counter_stay_within_one_percent():
    """A counter that only changes every 100 ms, sampled at 10 Hz with jitter."""
    true_w = {"idle": 70.0, "busy": 450.0}

    def counter_at(t):  # true energy up to the last 100 ms tick
        tick = int(t * 10) / 10
        busy = max(0.0, min(tick, 6.0) - 1.0)
        return int((true_w["idle"] * tick + (true_w["busy"] - true_w["idle"]) * busy) * 1000)

    dev = nvml(counter_update_s=0.1)
    t = 0.0
    while t < 1.0:
        dev.add_sample(s(t, counter_at(t), 70_000))
        t += 0.1037
    dev.begin("long", s(1.0, counter_at(1.0), 450_000))
    while t < 6.0:
        dev.add_sample(s(t, counter_at(t), 450_000))
        t += 0.1037
    result = dev.end("long", s(6.0, counter_at(6.0), 450_000))
    assert result.source == "nvml-counter"
    assert result.joules == pytest.approx(450 * 5, rel=0.01)
    assert dev.reconciliation().error_pct < 1


def test_counter_reset_falls_back_to_power_for_that_interval():
    dev = nvml()
    dev.begin("b", s(0, 900_000, 200_000))
    dev.add_sample(s(1, 1_100_000, 200_000))  # +200 J by counter
    dev.add_sample(s(2, 5_000, 400_000))  # driver reload: counter restarted
    result = dev.end("b", s(3, 305_000, 400_000))  # +300 J by counter again
    assert result.joules == pytest.approx(200 + 300 + 300)
    assert result.source == "nvml-power"  # part of it was not counter-measured


def test_device_that_disappears_leaves_a_gap_not_invented_energy():
    dev = nvml()
    dev.begin("b", s(0, 0, 300_000))
    dev.add_sample(s(1, 300_000, 300_000))
    dev.add_sample(s(2, None, None))  # device lost
    dev.add_sample(s(3, None, None))
    result = dev.end("b", s(4, None, None))
    assert result.joules == 300
    rec = dev.reconciliation()
    assert rec.gap_s == 3 and rec.device_j == 300 and rec.error_pct == 0


def test_lost_batches_expire_into_unattributed():
    dev = nvml()
    dev.begin("orphan", s(0, 0))
    dev.add_sample(s(5, 500_000))
    assert dev.expire(older_than_s=1) == ["orphan"]
    rec = dev.reconciliation()
    assert (rec.unattributed_j, rec.pending_j, rec.error_pct) == (500, 0, 0)
    assert dev.expire(older_than_s=100) == []


def test_out_of_order_samples_are_ignored():
    dev = nvml()
    dev.add_sample(s(2, 200_000))
    dev.add_sample(s(1, 100_000))
    dev.add_sample(s(3, 300_000))
    assert dev.reconciliation().device_j == 100


def test_simulated_device_under_injected_clock_reconciles_exactly():
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()
    gpu = SimulatedDevice(idle_w=70, limit_w=700, clock=clock)
    dev = DeviceAttributor(counter_source="simulated", power_source="simulated")

    def read():
        return Sample(clock.now, gpu.energy_mj(), gpu.power_mw())

    dev.add_sample(read())
    clock.now = 1.0
    gpu.begin("a", 450)
    dev.begin("a", read(), weight=450)
    clock.now = 1.5
    gpu.begin("b", 350)
    dev.begin("b", read(), weight=350)
    clock.now = 2.5
    gpu.end("a")
    a = dev.end("a", read())
    clock.now = 3.0
    gpu.end("b")
    b = dev.end("b", read())
    clock.now = 4.0
    dev.add_sample(read())
    # a: 0.5 s at 450 W + 1 s of the capped 700 W (70+380+280) split 450:350
    assert a.joules == pytest.approx(225 + 700 * 450 / 800)
    assert b.joules == pytest.approx(700 * 350 / 800 + 0.5 * 350)
    rec = dev.reconciliation()
    assert rec.device_j == pytest.approx(70 + 225 + 700 + 175 + 70)
    assert rec.idle_j == pytest.approx(140) and rec.error_pct == pytest.approx(0, abs=1e-6)
