import pytest

from telemetry.savings import savings_by_cause
from wattserve import Receipt


def receipt(variant, joules, batch_size=1, cache="miss", index=0):
    return Receipt(
        request_id=f"r{index}", image_index=0, variant=variant, batch_id="b",
        batch_size=batch_size, joules=joules, energy_source="simulated", cache=cache,
        latency_ms=1, seed=0, route_reason="cheapest_capable", width_px=64, height_px=64,
    )  # fmt: skip


def test_causes_add_up_to_the_total_saving():
    receipts = [
        receipt("big", 100),
        receipt("big", 120),  # reference, batch-1 price 110
        receipt("small", 20),
        receipt("small", 16, batch_size=2),  # small batch-1 price 20
        receipt("big", 0, cache="hit"),
        receipt("small", 8, cache="coalesced"),
    ]
    report = savings_by_cause(receipts, "big")
    assert report.baseline_joules_per_output == 110
    assert report.baseline_joules == 660
    assert report.achieved_joules == 264
    causes = report.by_cause_joules
    assert causes["cache"] == 110
    assert causes["coalescing"] == 102
    assert causes["variant_choice"] == 90 + 90
    assert causes["batching"] == -10 + 10 + 4
    assert sum(causes.values()) == pytest.approx(report.saved_joules)
    assert "big" in report.baseline_name and report.energy_sources == ("simulated",)


def test_baseline_needs_a_measured_reference():
    with pytest.raises(ValueError, match="reference variant 'big'"):
        savings_by_cause([receipt("small", 20)], "big")
