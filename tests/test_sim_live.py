"""The simulator replays what a live service learned: the seam of the sim-vs-live check."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from wattserve import AdminClient
from wattserve._admin import ProfileList
from wattserve.bench.trace import load_prompts, make_trace, preset_spec, write_trace
from wattserve.cli.main import app
from wattserve.policies.catalog import builtin_catalog_path

pytestmark = pytest.mark.ray


def test_a_live_profile_drives_a_simulation_of_the_live_fleet(service, url, tmp_path):
    for seed, tier in enumerate(("draft", "standard", "high")):  # each variant learns
        body = {"prompt": f"profile me {seed}", "seed": 400 + seed, "quality": tier, "n": 2}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).status_code == 200
    with AdminClient(url, service.admin_token) as admin:
        profile = admin.profiles()
    # (the shared service may also have learned variants other tests added and retired)
    assert {p.variant for p in profile.data} >= {"tiny-sd-large", "tiny-sd-medium",
                                                 "tiny-sd-turbo"}  # fmt: skip
    assert all(p.joules_per_output > 0 and p.batch_latency_s > 0 for p in profile.data)
    assert profile.overhead_s["miss"] > 0  # time in the scheduler outside batches, measured
    assert "simulated" in profile.energy_sources
    saved = tmp_path / "profile.json"
    exported = CliRunner().invoke(app, ["profile", "--url", url, "--token",
                                        service.admin_token, "--out", str(saved)])  # fmt: skip
    assert exported.exit_code == 0 and f"wrote {saved}" in exported.output.replace("\n", "")
    assert ProfileList.model_validate_json(saved.read_text()).replica == profile.replica
    points = ProfileList.model_validate_json(saved.read_text()).data
    assert all(len(p.recent_batch_latencies_s) == min(p.batches, 256) for p in points)
    nowhere = CliRunner().invoke(app, ["profile", "--url", url, "--token", service.admin_token,
                                       "--out", str(tmp_path / "no" / "p.json")])  # fmt: skip
    assert nowhere.exit_code == 2 and "--out: no directory" in nowhere.output
    spec = preset_spec("draft-heavy", requests=40, rate_per_s=2.0, seed=5)
    prompts = load_prompts(builtin_catalog_path().parent.parent / "cli" / "demo_prompts.txt")
    trace_file = tmp_path / "t.jsonl"
    from wattserve.bench.trace import TraceHeader

    header = TraceHeader(**spec.model_dump(), preset="draft-heavy", prompts=prompts.source)
    write_trace(trace_file, header, make_trace(spec, prompts.prompts))
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, [
        "simulate", "--trace", str(trace_file), "--fleet", "3xCPU", "--profile", str(saved),
        "--catalog", str(builtin_catalog_path()), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "live profile" in report["energy_source"] and report["achieved"]["outputs"] == 40
    assert report["achieved"]["placement_gpus"] == {  # the live fleet, as deployed
        "tiny-sd-large": 1,
        "tiny-sd-medium": 1,
        "tiny-sd-turbo": 1,
    }
