import pytest

from wattserve import Receipt
from wattserve.telemetry.savings import savings_by_cause


def receipt(variant, joules, batch_size=1, cache="miss", batch="b", seed=0):
    return Receipt(
        request_id="r", image_index=0, variant=variant, batch_id=batch,
        batch_size=batch_size, joules=joules, energy_source="simulated", cache=cache,
        latency_ms=1, seed=seed, route_reason="cheapest_capable", width_px=64, height_px=64,
    )  # fmt: skip


def test_causes_add_up_to_the_total_saving():
    receipts = [
        receipt("big", 100, batch="b1"),
        receipt("big", 120, batch="b2"),  # reference B = 110
        receipt("small", 20, batch="s1"),  # small batch-1 price P = 20
        receipt("small", 16, batch_size=2, batch="s2", seed=1),  # a batch of two...
        receipt("small", 16, batch_size=2, batch="s2", seed=2),  # ...16 J each
        receipt("small", 10, batch="s3"),
        receipt("small", 10, batch="s3", cache="coalesced"),
        receipt("big", 0, cache="hit"),
    ]
    report = savings_by_cause(receipts, "big")
    assert report.baseline_joules_per_output == 110  # priced from batch-1 generations
    assert report.baseline_joules == 110 * 8
    assert report.achieved_joules == 100 + 120 + 20 + 16 + 16 + 10 + 10
    causes = report.by_cause_joules
    assert causes["cache"] == 110
    assert causes["coalescing"] == 1 * 20  # one generation avoided, at small's price
    assert causes["variant_choice"] == 0 + 0 + 90 + 90 + 90 + 2 * 90
    assert causes["batching"] == 10 + (-10) + 0 + 4 + 4 + (20 - 20)
    assert sum(causes.values()) == pytest.approx(report.saved_joules)
    assert "big" in report.baseline_name and report.energy_sources == ("simulated",)


def test_baseline_needs_a_measured_reference():
    with pytest.raises(ValueError, match="reference variant 'big'"):
        savings_by_cause([receipt("small", 20)], "big")
