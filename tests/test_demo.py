import json

import pytest
from PIL import Image

from wattserve.cli.demo import build_workload, demo_prompts, drive_workload


def test_workload_is_deterministic_mixed_and_repeats():
    prompts = demo_prompts()
    assert len(prompts) >= 20
    workload = build_workload(prompts, 36, seed=0)
    assert workload == build_workload(prompts, 36, seed=0)
    assert {r.seed for r in workload}.isdisjoint({r.seed for r in build_workload(prompts, 36, 1)})
    assert [r.n for r in workload[:3]] == [1, 1, 1]
    assert [r.quality for r in workload[:3]] == ["draft", "standard", "high"]
    keys = [(r.prompt, r.seed, r.quality) for r in workload]
    assert 0.15 < 1 - len(set(keys)) / len(keys) < 0.5
    assert {r.n for r in workload} == {1, 2}


@pytest.mark.ray
def test_demo_report_covers_every_variant_with_labeled_receipts(service, url, catalog, tmp_path):
    report = drive_workload(url, catalog, tmp_path, requests=9, concurrency=3, seed=5,
                            admin_token=service.admin_token, audit_rate=1.0)  # fmt: skip
    assert set(report["variants"]) == set(catalog.names)
    on_disk = json.loads((tmp_path / "demo-report.json").read_text())
    receipts = [r for req in on_disk["requests"] for r in req["receipts"]]
    assert len(receipts) == on_disk["totals"]["images"] >= 9
    assert {r["energy_source"] for r in receipts} == {"simulated"}
    assert all(r["joules"] > 0 for r in receipts if r["cache"] != "hit")
    assert all(r["joules"] == 0 for r in receipts if r["cache"] == "hit")
    totals = on_disk["totals"]
    assert totals["generations"] + totals["avoided_by_cache"] + totals[
        "avoided_by_coalescing"
    ] == len(receipts)
    assert "tiny-sd-large" in on_disk["baseline"]["name"]
    measured = on_disk["baseline_measured"]
    assert measured["variants"] == ["tiny-sd-large"] and measured["images"] == len(receipts)
    assert measured["joules_per_image"] > on_disk["totals"]["joules_per_image"]
    causes = on_disk["savings"]["by_cause_joules"]
    assert sum(causes.values()) == pytest.approx(on_disk["savings"]["joules"], abs=0.01)
    assert Image.open(tmp_path / "demo-contact-sheet.png").size[0] > 0
    audit = on_disk["audit"]  # every off-reference output audited, scores labeled
    assert audit["rate"] == 1.0 and audit["still_pending"] == 0
    assert audit["random_weight_scores"] and "mean nothing" in audit["note"]
    groups = audit["report"]["groups"]
    off_reference = [
        r for r in receipts if r["variant"] != "tiny-sd-large" and r["cache"] == "miss"
    ]
    assert sum(g["audited"] + g["dropped"] for g in groups) >= len(off_reference) > 0
    assert {g["variant"] for g in groups} >= {r["variant"] for r in off_reference}
    scored = [g for g in groups if g["audited"]]
    assert scored and all("ssim" in g["scores"] and "clip_drop" in g["scores"] for g in scored)
    assert all(j > 0 for j in audit["joules"].values()) and audit["joules"]
