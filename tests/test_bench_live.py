import base64
import io
import json
from importlib import resources
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from wattserve import AsyncClient, Receipt, VariantInfo
from wattserve._schemas import ReconciliationInfo
from wattserve.bench.live import (
    Outcome,
    PhaseRun,
    by_source,
    check_sizes,
    choose_salt,
    factor,
    fleet_energy,
    fleet_factor,
    percentile,
    replay,
    run_live,
    salted,
    summarize,
)
from wattserve.bench.trace import (
    Trace,
    TraceHeader,
    TraceRequest,
    load_prompts,
    make_trace,
    preset_spec,
)
from wattserve.cli.main import app


def receipt(variant="v", joules=10.0, source="simulated", cache="miss", batch="b1", size=1,
            seed=1, request="r1", index=0):  # fmt: skip
    return Receipt(
        request_id=request, image_index=index, variant=variant, batch_id=batch, batch_size=size,
        joules=joules, energy_source=source, cache=cache, latency_ms=5.0, seed=seed,
        route_reason="cheapest_capable", width_px=64, height_px=64,
    )  # fmt: skip


def request(seed=1, n=1, arrival_s=0.0, size="64x64", quality="draft"):
    return TraceRequest(arrival_s=arrival_s, prompt="a red cube", seed=seed, size=size,
                        quality=quality, n=n)  # fmt: skip


def variant_info(name, quality_score, max_size_px=256, prior=100.0):
    return VariantInfo(
        id=name, task="text-to-image", steps=1, guidance_scale=0.0, max_size_px=max_size_px,
        quality_score=quality_score, quality_provenance="test", power_w=400.0,
        joules_per_image_prior=prior, energy_prior_provenance="test",
    )  # fmt: skip


def mixed_trace(requests, rate_per_s):
    prompts = load_prompts(Path(str(resources.files("wattserve.cli") / "demo_prompts.txt")))
    spec = preset_spec("mixed", requests=requests, rate_per_s=rate_per_s)
    header = TraceHeader(**spec.model_dump(), preset="mixed", prompts=prompts.source)
    return Trace(header, tuple(make_trace(spec, prompts.prompts)))


# --- pure aggregation -------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks_and_p50_is_the_median():
    assert percentile([], 0.5) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0], 0.0) == 1.0 and percentile([1.0, 2.0, 3.0], 1.0) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == pytest.approx(95.05)


def test_joules_are_summed_per_energy_source():
    found = by_source([receipt(joules=10.0), receipt(joules=30.0),
                       receipt(joules=50.0, source="estimated")])  # fmt: skip
    assert list(found) == ["estimated", "simulated"]
    assert found["simulated"].outputs == 2 and found["simulated"].joules == 40.0
    assert found["simulated"].joules_per_output == 20.0
    assert found["estimated"].joules_per_output == 50.0


def test_a_phase_counts_failures_reuse_batches_and_latency_of_successes_only():
    generated = (
        receipt(joules=20.0, batch="b1", size=2, seed=1, index=0, request="r1"),
        receipt(joules=20.0, batch="b1", size=2, seed=2, index=1, request="r1"),
    )
    coalesced = (
        receipt(joules=10.0, batch="b2", size=1, seed=3, request="r2"),
        receipt(joules=10.0, batch="b2", size=1, seed=3, request="r3", cache="coalesced"),
    )
    hit = (receipt(joules=0.0, batch="b0", size=1, cache="hit", request="r4", variant="w"),)
    outcomes = [
        Outcome(0, request(n=2), 0.0, 1.0, receipts=generated),
        Outcome(1, request(seed=3), 0.1, 2.0, receipts=coalesced[:1]),
        Outcome(2, request(seed=3), 0.2, 3.0, receipts=coalesced[1:]),
        Outcome(3, request(seed=4), 0.3, 4.0, receipts=hit),
        Outcome(4, request(seed=5, n=2), 0.4, 0.01, http_status=429, error="over budget"),
        Outcome(5, request(seed=6), 0.5, 0.02, error="cannot reach wattserve"),
    ]  # fmt: skip
    summary = summarize(PhaseRun("default", outcomes, wall_s=2.5))
    assert (summary.requests, summary.requests_failed) == (6, 2)
    assert (summary.outputs, summary.outputs_failed) == (5, 3)
    assert summary.failures_by_status == {"429": 1, "unreachable": 1}
    assert (summary.generated, summary.coalesced, summary.cache_hits) == (3, 1, 1)
    assert summary.batch_sizes == {1: 1, 2: 1} and summary.mean_batch_size == 1.5
    assert summary.joules == 60.0 and summary.joules_per_output == 12.0
    assert summary.latency_s.p50 == 2.5 and summary.latency_s.p99 == pytest.approx(3.97)
    assert summary.throughput_outputs_per_s == 2.0
    assert summary.by_variant["v"].outputs == 4 and summary.by_variant["v"].requests == 3
    assert summary.by_variant["w"].cache_hits == 1 and summary.by_variant["w"].joules == 0.0


def test_factor_is_baseline_over_achieved_joules_per_output():
    achieved = summarize(PhaseRun("default", [Outcome(0, request(), 0, 1, (receipt(joules=100),))],
                                  wall_s=1))  # fmt: skip
    baseline = summarize(PhaseRun("baseline", [Outcome(0, request(), 0, 1, (receipt(joules=400),))],
                                  wall_s=1))  # fmt: skip
    assert factor(baseline, achieved) == 4.0
    all_hits = summarize(PhaseRun("default", [
        Outcome(0, request(), 0, 1, (receipt(joules=0.0, cache="hit"),))], wall_s=1))  # fmt: skip
    assert factor(baseline, all_hits) is None


def books(device_j, idle_j):
    return ReconciliationInfo(
        device_j=device_j, attributed_j=device_j - idle_j, idle_j=idle_j, unattributed_j=0.0,
        pending_j=0.0, gap_s=0.0, error_pct=0.0,
    )  # fmt: skip


def test_fleet_energy_is_the_growth_of_the_device_books_over_the_outputs_served():
    energy = fleet_energy(books(1000.0, 300.0), books(1900.0, 500.0), 3.0, 4, ["simulated"] * 2)
    assert (energy.device_joules, energy.idle_joules) == (900.0, 200.0)
    assert energy.joules_per_output == 225.0 and energy.mean_power_w == 300.0
    assert energy.energy_sources == ["simulated"]
    assert fleet_energy(books(1000.0, 300.0), books(10.0, 5.0), 3.0, 4, []) is None  # restarted
    assert fleet_energy(books(0.0, 0.0), books(50.0, 50.0), 1.0, 0, []).joules_per_output is None
    one = [Outcome(0, request(), 0, 1, (receipt(joules=100),))]
    cheap = summarize(PhaseRun("default", one, 1, fleet=fleet_energy(
        books(0, 0), books(150, 50), 1, 1, [])))  # fmt: skip
    dear = summarize(PhaseRun("baseline", one, 1, fleet=fleet_energy(
        books(0, 0), books(450, 50), 1, 1, [])))  # fmt: skip
    assert cheap.fleet.joules_per_output == 150.0 and fleet_factor(dear, cheap) == 3.0
    assert fleet_factor(dear, summarize(PhaseRun("default", one, 1))) is None  # not measured


def test_salting_moves_every_seed_by_one_offset_so_repeats_stay_repeats():
    trace = [request(seed=5), request(seed=9), request(seed=5),
             request(seed=None)]  # fmt: skip
    moved = salted(trace, 1000)
    assert [r.seed for r in moved] == [1005, 1009, 1005, None]
    assert salted(trace, 0) == trace
    assert choose_salt(0).chosen == "off" and choose_salt(7).offset == 7
    assert choose_salt(None).chosen == "random" and choose_salt(None).offset > 0
    with pytest.raises(ValueError, match="--salt"):
        choose_salt(-1)


def test_a_size_no_variant_can_make_is_refused_with_its_count():
    variants = [variant_info("small", 0.5, max_size_px=128), variant_info("big", 0.9, 256)]
    check_sizes([request(size="256x128")], variants)
    with pytest.raises(ValueError, match=r"512x512 \(2 requests\).*256 px"):
        check_sizes([request(size="512x512"), request(size="512x512"), request()], variants)


# --- replay over the SDK's transport seam ------------------------------------------------


def png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PRICES = {"baseline": ("large", 400.0), "competent": ("medium", 100.0),
          "default": ("turbo", 20.0)}  # fmt: skip


def fake_service(seen, books_readable=True):
    """A service that refuses seed 13, serves the rest: large at batch 1 for the baseline.

    Its device books grow by what it served plus 50 J of idle draw per reading.
    """
    served = {"j": 0.0, "readings": 0}

    def handler(http: httpx.Request) -> httpx.Response:
        if http.url.path == "/v1/report":
            if not books_readable:
                return httpx.Response(403, json={"error": {"message": "no", "type": "x"}})
            served["readings"] += 1
            idle_j = 50.0 * served["readings"]
            return httpx.Response(200, json={
                "reconciliation": books(served["j"] + idle_j, idle_j).model_dump(),
                "target": {"joules_per_output_target": None, "rolling_joules_per_output": None,
                           "over_target": False},
                "variants": []})  # fmt: skip
        if http.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                variant_info("large", 0.9, prior=400.0).model_dump(),
                variant_info("turbo", 0.3, prior=20.0).model_dump()]})  # fmt: skip
        if http.url.path == "/v1/status":
            return httpx.Response(200, json={
                "cluster_power_w": 70.0, "power_cap_w": None, "nodes": [],
                "budget": {"cluster_cap_w": None, "joules_per_output_target": None,
                           "node_caps_w": {}, "updated_at": None, "revision": 0},
                "devices": [{"node_id": "n", "id": f"d{i}", "index": i, "name": "sim-H100",
                             "source": "simulated", "power_w": 70.0, "power_w_window": None,
                             "energy_j": None, "power_limit_w": None, "utilization_pct": None}
                            for i in range(2)]})  # fmt: skip
        body = json.loads(http.content)
        seen.append(body)
        if body["seed"] % 100 == 13:
            return httpx.Response(429, json={"error": {"message": "over budget", "type": "x"}})
        variant, joules = PRICES[body.get("policy", "default")]
        served["j"] += joules
        got = receipt(variant=variant, joules=joules, seed=body["seed"], batch=f"b{len(seen)}")
        route = {"variant": got.variant, "reason": "x", "expected_joules_per_output": 1.0,
                 "candidates": []}  # fmt: skip
        return httpx.Response(200, json={
            "created": 0, "data": [{"b64_json": png()}],
            "wattserve": {"request_id": got.request_id, "route": route,
                          "receipts": [got.model_dump(mode="json")]}})  # fmt: skip

    return httpx.MockTransport(handler)


async def test_replay_never_drops_a_request_and_keeps_trace_order():
    seen: list[dict] = []
    progress: list[tuple[str, int, int]] = []
    trace = [request(seed=1), request(seed=13, n=2), request(seed=2, arrival_s=0.01)]
    async with AsyncClient("http://ws", transport=fake_service(seen)) as client:
        run = await replay(client, trace, policy="baseline", speed=100.0, max_in_flight=1,
                           progress=lambda *a: progress.append(a))  # fmt: skip
    assert [o.index for o in run.outcomes] == [0, 1, 2]
    assert [o.ok for o in run.outcomes] == [True, False, True]
    assert run.outcomes[1].http_status == 429 and run.outcomes[1].error == "over budget"
    assert all(body["policy"] == "baseline" for body in seen)
    assert progress[0] == ("baseline", 0, 3) and progress[-1] == ("baseline", 3, 3)
    assert all(o.images == () for o in run.outcomes)  # not kept unless asked


async def test_run_live_reports_every_phase_the_factors_and_what_they_rest_on():
    seen: list[dict] = []
    trace = Trace(mixed_trace(3, 1.0).header, (request(seed=1), request(seed=13), request(seed=1)))
    report = await run_live("http://ws", trace, speed=1000.0, salt=100,
                            transport=fake_service(seen))  # fmt: skip
    assert [body["seed"] for body in seen] == [101, 113, 101] * 3  # salted, every phase
    assert [body.get("policy", "default") for body in seen[::3]] == [
        "default", "baseline", "competent"]  # fmt: skip
    achieved, baseline = report.achieved.summary, report.baseline.summary
    competent = report.competent.summary
    assert (achieved.outputs, achieved.outputs_failed) == (2, 1)
    assert baseline.by_variant["large"].outputs == 2 and baseline.batch_sizes == {1: 2}
    assert report.factor == 20.0 and report.competent_factor == 5.0
    assert competent.by_variant["medium"].outputs == 2
    assert report.competent_name.startswith("competent baseline, measured: ")
    # all fleet energy: each phase's outputs' joules plus 50 J idle between its two readings
    assert (achieved.fleet.device_joules, achieved.fleet.idle_joules) == (90.0, 50.0)
    assert achieved.fleet.joules_per_output == 45.0 and baseline.fleet.joules_per_output == 425.0
    assert report.fleet_factor == pytest.approx(425 / 45, abs=1e-4)
    assert report.competent_fleet_factor == pytest.approx(125 / 45, abs=1e-4)
    assert achieved.fleet.energy_sources == ["simulated"]
    assert report.savings.reference == "large"  # the variant the baseline phase used
    assert "estimated" in report.savings.energy_sources  # no batch-1 large: priced from prior
    assert [(d.name, d.count) for d in report.hardware] == [("sim-H100", 2)]
    assert report.quality_floors == {"draft": 0.0, "standard": 0.5, "high": 0.8}
    assert report.trace.preset == "mixed" and report.salt.chosen == "given"
    assert [r.status for r in report.baseline.requests] == ["ok", "failed", "ok"]
    json.loads(report.model_dump_json())


async def test_without_the_books_the_factors_stand_and_no_fleet_figure_is_made_up():
    seen: list[dict] = []
    trace = Trace(mixed_trace(2, 1.0).header, (request(seed=1), request(seed=2)))
    report = await run_live("http://ws", trace, speed=1000.0, competent=False,
                            transport=fake_service(seen, books_readable=False))  # fmt: skip
    assert len(seen) == 4 and report.competent is None and report.competent_factor is None
    assert report.factor == 20.0 and report.fleet_factor is None
    assert report.achieved.summary.fleet is None and report.baseline.summary.fleet is None


async def test_run_live_refuses_a_size_before_generating_anything():
    seen: list[dict] = []
    trace = Trace(mixed_trace(1, 1.0).header, (request(size="1024x1024"),))
    with pytest.raises(ValueError, match="1024x1024"):
        await run_live("http://ws", trace, transport=fake_service(seen))
    assert seen == []


# --- the command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--trace", "mixed", "--salt", "3", "--no-salt"], "--salt and --no-salt"),
        (["--trace", "/nonexistent.jsonl"], "--trace: cannot read"),
        (["--trace", "mixed", "--requests", "0"], "--requests:"),
        (["--trace", "mixed", "--out", "/nonexistent/r.json"], "--out:"),
    ],
)
def test_bench_refuses_bad_input_in_one_line_before_sending(args, says):
    result = CliRunner().invoke(app, ["bench", "--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {says}") and result.stderr.count("\n") == 1


def test_preset_options_do_not_apply_to_a_trace_file(tmp_path):
    trace_file = tmp_path / "t.jsonl"
    trace_file.write_text("")
    result = CliRunner().invoke(app, ["bench", "--trace", str(trace_file), "--requests", "5"])
    assert result.exit_code == 2 and "--requests: applies to a preset" in result.stderr


# --- against the live service -----------------------------------------------------------


@pytest.mark.ray
async def test_bench_against_the_live_service_measures_its_baseline(url):
    trace = mixed_trace(10, 50.0)
    report = await run_live(url, trace, speed=10.0, max_in_flight=16)
    achieved, baseline = report.achieved.summary, report.baseline.summary
    competent = report.competent.summary
    assert report.factor is not None and report.factor > 0
    assert report.competent_factor is not None and report.competent_factor > 0
    assert list(baseline.by_variant) == [report.savings.reference]
    assert baseline.batch_sizes == {1: baseline.generated} and baseline.cache_hits == 0
    assert baseline.coalesced == 0
    assert competent.cache_hits == competent.coalesced == 0
    assert competent.generated == competent.outputs
    tiers = {"draft": "tiny-sd-turbo", "standard": "tiny-sd-medium", "high": "tiny-sd-large"}
    for r in report.competent.requests:  # each tier on its cheapest declared variant
        assert {rc.variant for rc in r.receipts} == {tiers[r.quality]}
    for summary in (achieved, baseline, competent):  # the device books, idle included
        assert summary.fleet is not None and summary.fleet.device_joules > 0
        assert summary.fleet.joules_per_output >= summary.fleet.idle_joules / summary.outputs
    for phase in (report.achieved, report.baseline, report.competent):
        assert [r.index for r in phase.requests] == list(range(10))
        assert all(r.status == "ok" for r in phase.requests)
        assert all(rc.energy_source for r in phase.requests for rc in r.receipts)
    assert achieved.outputs == baseline.outputs == sum(r.n for r in trace.requests)
    assert report.hardware and all(d.source for d in report.hardware)
    assert report.salt.chosen == "random"


@pytest.mark.ray
def test_bench_command_prints_the_factor_and_draws_both_latency_curves(url, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, [
        "bench", "--url", url, "--trace", "draft-heavy", "--requests", "6", "--rate-per-s",
        "50", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "vs its in-run conventional baseline" in said
    assert "vs its in-run competent baseline" in said
    figure = tmp_path / "b-latency.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and str(figure) in result.output.replace("\n", "")
    assert json.loads(out.read_text())["factor"] > 0


@pytest.mark.ray
async def test_bench_with_approximate_reuse_runs_it_first_and_splits_its_saving(url):
    """One unseeded prompt, re-asked after each answer: the approximate phase resumes.

    Its size is one no other test asks for, so its latent space starts empty.
    """
    spaced = [TraceRequest(arrival_s=0.1 * i, prompt="an approximate harbour at noon",
                           seed=None if i < 3 else 9, size="88x56", quality="high")
              for i in range(4)]  # fmt: skip
    trace = Trace(mixed_trace(4, 1.0).header, tuple(spaced))
    # one at a time: each request is sent once the one before it has its answer
    report = await run_live(url, trace, max_in_flight=1, reuse="approximate")
    phase, exact = report.approximate.summary, report.achieved.summary
    assert (phase.reuse, exact.reuse) == ("approximate", "exact")
    assert phase.approximate >= 2 and phase.steps_skipped > 0 and exact.approximate == 0
    seeded = report.approximate.requests[3]
    assert seeded.seed is not None and seeded.receipts[0].cache == "miss"  # a seed stays exact
    assert report.approximate_savings.by_cause_joules["approximate_cache"] > 0
    assert report.approximate_factor > 0 and report.approximate_vs_exact > 0
    large = report.resumed_vs_full["tiny-sd-large"]
    assert large.resumed == phase.approximate and large.full >= 2  # the first and the seeded one
