"""The fleet simulator: the live decision code under a simulated clock, on measured costs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wattserve import InvalidRequest
from wattserve.bench.fleet import VariantCost, fleet_catalog, parse_fleet, place
from wattserve.bench.profiles import DEFAULT_DATA_DIR
from wattserve.bench.sim_report import oracle_joules, summarize
from wattserve.bench.simulate import FleetSimulation
from wattserve.bench.trace import load_prompts, make_trace, preset_spec
from wattserve.cli.main import app
from wattserve.policies.catalog import load_catalog
from wattserve.policies.policy import Policy
from wattserve.policies.routing import reference_variant

DATA = DEFAULT_DATA_DIR
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"no ML.ENERGY data at {DATA}")
CATALOG = load_catalog(Path(__file__).resolve().parents[1] / "policies" / "real_catalog.toml")
H100_8 = {"H100": 8}
BUILTIN = load_catalog()


@pytest.fixture(scope="module")
def costs():
    return fleet_catalog(CATALOG, H100_8, DATA)[1]


def trace(preset: str, requests: int = 600, **overrides):
    spec = preset_spec(preset, requests=requests, sizes={"1024x1024": 1}, rate_per_s=4.0,
                       seed=3, **overrides)  # fmt: skip
    return make_trace(spec, load_prompts(DATA / "PartiPrompts.tsv").prompts)


def test_fleet_specs_and_placement():
    assert parse_fleet("8xH100, 2xh100") == {"H100": 10}
    with pytest.raises(InvalidRequest, match="COUNTxGPU"):
        parse_fleet("eight H100s")
    assert place(10, {"a": 3.0, "b": 1.0, "c": 0.0}) == {"a": 7, "b": 3}
    assert place(1, {"a": 1.0, "b": 2.0}) == {"b": 1}


def test_every_output_gets_one_receipt_and_the_run_is_deterministic(costs):
    requests = trace("mixed")
    sim = FleetSimulation(CATALOG, costs, H100_8)
    first, again = sim.run(requests), sim.run(requests)
    assert len(first.receipts) == sum(r.n for r in requests)
    assert summarize(first) == {**summarize(again), "wall_s": summarize(first)["wall_s"]}
    got = summarize(first)
    assert got["cache_hits"] + got["coalesced"] > 0 and got["refused"] == 0


def test_baseline_is_the_reference_at_batch_one_without_reuse(costs):
    requests = trace("mixed")
    sim = FleetSimulation(CATALOG, costs, H100_8)
    base = summarize(sim.run(requests, policy="baseline"))
    assert set(base["by_variant"]) == {reference_variant(sim.catalog).name}
    assert base["batch_sizes"] == {1: len(requests)}
    assert base["cache_hits"] == base["coalesced"] == 0


def tiny_costs() -> dict[str, VariantCost]:
    """The built-in variants at their declared prices, a batch of b costing 1 + 0.6 (b - 1)."""
    costs = {}
    for spec in BUILTIN.variants:
        price, sizes = spec.energy_prior.at_batch_size(1), range(spec.max_batch_size + 1)
        costs[spec.name] = VariantCost(
            spec.name, "CPU", tuple(price * (1 + 0.6 * (b - 1)) if b else 0.0 for b in sizes),
            tuple(0.05 * spec.steps * (1 + 0.6 * (b - 1)) if b else 0.0 for b in sizes),
            spec.max_batch_size,
        )  # fmt: skip
    return costs


def test_competent_is_each_tier_on_its_cheapest_declared_variant_batched_without_reuse():
    spec = preset_spec("mixed", requests=600, sizes={"64x64": 1}, rate_per_s=20.0, seed=3)
    requests = make_trace(spec, load_prompts(DATA / "PartiPrompts.tsv").prompts)
    sim = FleetSimulation(BUILTIN, tiny_costs(), {"CPU": 6})
    run = sim.run(requests, policy="competent")
    competent = summarize(run)
    got, base = summarize(sim.run(requests)), summarize(sim.run(requests, policy="baseline"))
    assert competent["policy"] == "competent" and competent["refused"] == 0
    assert competent["cache_hits"] == competent["coalesced"] == 0 < got["cache_hits"]
    assert competent["generated"] == competent["outputs"] and competent["mean_batch_size"] > 1
    tiers = {"draft": "tiny-sd-turbo", "standard": "tiny-sd-medium", "high": "tiny-sd-large"}
    assert all(r.variant == tiers[requests[r.request_index].quality] for r in run.receipts)
    # wattserve adds reuse to it; it adds batching and the tier mapping to the conventional one
    assert got["joules_per_output"] < competent["joules_per_output"] < base["joules_per_output"]
    assert got["fleet_joules_per_output"] < competent["fleet_joules_per_output"]
    assert competent["fleet_joules_per_output"] < base["fleet_joules_per_output"]


def test_the_competent_baseline_is_not_power_aware(costs):
    requests = trace("unique-high", requests=300, repeat_rate=0.0)
    cap_w = 8 * 70.0 + 2 * 560.0
    capped = FleetSimulation(CATALOG, costs, H100_8, cap_w=cap_w, target_j=1.0)
    free = FleetSimulation(CATALOG, costs, H100_8)
    run = capped.run(requests, policy="competent")
    assert max(w for _, w in run.power_w) > cap_w and run.moved == 0
    assert summarize(run) == {**summarize(free.run(requests, policy="competent")),
                              "wall_s": summarize(run)["wall_s"]}  # fmt: skip


def test_fleet_energy_is_active_plus_idle_gpu_time_and_the_power_trace_integrates_to_it(costs):
    requests = trace("mixed", requests=200)
    for gpus in (1, 8):
        sim = FleetSimulation(CATALOG, costs, {"H100": gpus})
        for policy in ("default", "baseline", "competent"):
            run = sim.run(requests, policy=policy)
            got = summarize(run)
            points = [*run.power_w, (run.duration_s, 0.0)]
            integral = sum(
                w * (t1 - t0) for (t0, w), (t1, _) in zip(points, points[1:], strict=False)
            )
            assert got["fleet_joules"] == pytest.approx(integral, rel=1e-9)
            assert got["fleet_joules"] == pytest.approx(got["joules"] + run.idle_j)
            assert got["fleet_joules_per_output"] >= got["joules_per_output"]
            if gpus == 1:  # one GPU: idle is its idle draw whenever no batch ran
                busy_s = sum(t1 - t0 for (t0, w), (t1, _) in zip(points, points[1:], strict=False)
                             if w > sim.idle_w)  # fmt: skip
                idle_j = sim.idle_w * (run.duration_s - busy_s)
                assert got["fleet_joules_per_output"] == pytest.approx(
                    (got["joules"] + idle_j) / got["outputs"]
                )


def test_achieved_never_beats_the_oracle_and_repeats_pay_off(costs):
    sim = FleetSimulation(CATALOG, costs, H100_8)
    for preset, better in (("mixed", True), ("draft-heavy", True), ("unique-high", False)):
        requests = trace(preset)
        got = summarize(sim.run(requests))
        base = summarize(sim.run(requests, policy="baseline"))
        oracle = oracle_joules(requests, sim.catalog, costs, sim.policy)
        assert got["joules"] >= oracle.joules * (1 - 1e-9), preset
        assert oracle.outputs == len(requests) and oracle.over(got) >= 1 - 1e-9
        assert (base["joules"] / got["joules"] > 1.2) is better, preset


def test_on_unique_high_work_batching_costs_nothing_over_the_baseline(costs):
    """SANA 1.6B pays 1.7 % more per image at batch 2: the batcher learns to avoid it."""
    requests = trace("unique-high", requests=400)
    sim = FleetSimulation(CATALOG, costs, H100_8)
    got, base = summarize(sim.run(requests)), summarize(sim.run(requests, policy="baseline"))
    assert got["joules"] <= base["joules"] * 1.001
    assert got["batch_sizes"][1] > 0.9 * len(requests)


def test_a_power_cap_holds_the_simulated_fleet_under_it(costs):
    requests = trace("unique-high", requests=300, repeat_rate=0.0)
    cap_w = 8 * 70.0 + 2 * 560.0  # idle fleet plus room for about two busy GPUs
    run = FleetSimulation(CATALOG, costs, H100_8, cap_w=cap_w).run(requests)
    assert max(w for _, w in run.power_w) <= cap_w
    assert len(run.receipts) == len(requests)  # served, moved or refused: none lost


def test_simulate_command_prints_the_factor_and_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    runner = CliRunner()
    args = ["simulate", "--trace", "draft-heavy", "--fleet", "8xH100", "--requests", "300",
            "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "achieved/oracle" in result.stdout
    report = json.loads(out.read_text())
    assert report["factor_vs_baseline"] > 1 and "ML.ENERGY" in report["energy_source"]
    said = " ".join(result.stdout.split())  # rich wraps lines
    assert f"factor vs conventional baseline {report['factor_vs_baseline']:.2f}x" in said
    assert f"vs competent baseline {report['factor_vs_competent']:.2f}x (active energy)" in said
    assert report["factor_vs_competent"] > 1 and report["competent_run"]["coalesced"] == 0
    assert report["competent"].startswith("competent baseline:") and "draft -> " in report[
        "competent"]  # fmt: skip
    assert report["waterfall_basis"].startswith("active energy")
    for run in ("achieved", "baseline_run", "competent_run"):  # active beside all fleet energy
        got = report[run]
        assert got["fleet_joules"] == pytest.approx(got["joules"] + got["idle_joules"])
        assert got["fleet_joules_per_output"] > got["joules_per_output"]
    assert report["fleet_factor_vs_baseline"] < report["factor_vs_baseline"]  # idle dilutes it
    assert report["trace"]["preset"] == "draft-heavy" and report["quality_floors"]["high"] == 0.8
    assert [Path(p).name for p in report["plots"]] == ["r-waterfall.png", "r-power.png",
                                                       "r-latency.png"]  # fmt: skip
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in report["plots"])
    bad = runner.invoke(app, ["simulate", "--trace", "mixed", "--fleet", "8xTPU"])
    assert bad.exit_code == 2 and "no catalog variant was measured on TPU" in bad.output
    bad = runner.invoke(app, ["simulate", "--trace", "mixed", "--fleet", "8xH100",
                              "--deadline-s", "0"])  # fmt: skip
    assert bad.exit_code == 2 and "--deadline-s: must be positive" in bad.output


def test_outputs_a_fleet_cannot_make_at_their_floor_are_refused_and_said_so(tmp_path):
    out = tmp_path / "r.json"
    args = ["simulate", "--trace", "mixed", "--fleet", "4xA100", "--requests", "200",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    high = report["quality_floors"]["high"]  # no model measured on A100 scores that high
    assert report["achieved"]["refused"] > 0 and report["baseline_run"]["refused"] == 0
    assert f"achieved refused {report['achieved']['refused']} of 200 outputs" in result.stdout
    base, got = report["baseline_run"], report["achieved"]
    assert report["factor_vs_baseline"] == pytest.approx(
        base["joules_per_output"] / got["joules_per_output"]
    )
    assert high == 0.8


def test_the_sweep_shows_reuse_paying_off_more_as_repeats_rise(costs):
    from wattserve.bench.sim_report import SWEEP_REPEAT_RATES, sweep

    sim = FleetSimulation(CATALOG, costs, H100_8)
    spec = preset_spec("mixed", requests=300, sizes={"1024x1024": 1}, rate_per_s=4.0, seed=3)
    points = sweep(sim, spec, load_prompts(DATA / "PartiPrompts.tsv").prompts)
    assert len(points) == 3 * len(SWEEP_REPEAT_RATES)
    for mix in {p["tiers"] for p in points}:
        factors = [p["factor_vs_baseline"] for p in points if p["tiers"] == mix]
        assert factors[-1] > factors[0] and factors[-1] > 3  # 90 % repeats vs none


def test_a_live_services_overhead_outside_batches_is_added_to_each_output(costs):
    """Measured time in the scheduler outside batches lands on latency, not on decisions."""
    requests = trace("mixed", requests=200)
    plain = FleetSimulation(CATALOG, costs, H100_8).run(requests)
    timed = FleetSimulation(CATALOG, costs, H100_8, overhead_s={"hit": 0.5, "miss": 0.25}).run(
        requests
    )
    added = {"hit": 0.5, "miss": 0.25, "coalesced": 0.25}
    assert [(r.request_index, r.batch_id) for r in plain.receipts] == [
        (r.request_index, r.batch_id) for r in timed.receipts
    ]
    for a, b in zip(plain.receipts, timed.receipts, strict=True):
        assert b.latency_s - a.latency_s == pytest.approx(added[a.cache])
    assert {r.cache for r in plain.receipts} >= {"hit", "miss"}


def test_a_fleet_of_two_gpu_types_runs_each_model_where_it_was_measured():
    catalog, costs = fleet_catalog(CATALOG, {"H100": 8, "B200": 4}, DATA)
    natives = {v.name for v in CATALOG.variants}
    derived = {v.name: v for v in catalog.variants if v.name not in natives}
    # v3 models were measured on B200 too; the v2 ones (SD 2.1, SDXL, SD3) only up to H100
    assert set(derived) == {"sana15-1.6b-b200", "sana15-4.8b-b200", "pixart-sigma-b200",
                            "flux1-dev-b200"}  # fmt: skip
    sana = derived["sana15-1.6b-b200"]
    assert sana.resources.accelerator_types == ("B200",) and costs[sana.name].gpu == "B200"
    assert sana.quality_score == CATALOG.get("sana15-1.6b-h100").quality_score
    assert sana.energy_prior.joules_per_image[1] == pytest.approx(342.0, abs=0.1)  # measured
    assert "B200" in sana.energy_prior.provenance
    assert all(catalog.get(n) == CATALOG.get(n) for n in natives)  # natives untouched
    a100, _ = fleet_catalog(CATALOG, {"A100": 4}, DATA)
    assert "sdxl-a100" in a100.names and not any(n.startswith("sana") for n in a100.names)


def test_on_a_mixed_fleet_routing_picks_the_cheaper_gpu_and_the_baseline_uses_both():
    catalog, costs = fleet_catalog(CATALOG, {"H100": 8, "B200": 4}, DATA)
    sim = FleetSimulation(catalog, costs, {"H100": 8, "B200": 4})
    requests = trace("unique-high", requests=300)
    got, base = summarize(sim.run(requests)), summarize(sim.run(requests, policy="baseline"))
    assert got["outputs"] == base["outputs"] == len(requests)
    assert set(got["by_variant"]) == {"sana15-1.6b-b200"}  # 342 J on B200 vs 417 on H100
    assert set(base["by_variant"]) == {"sana15-1.6b-h100", "sana15-1.6b-b200"}
    assert sum(got["placement_gpus"].values()) == 12
    assert got["joules_per_output"] < 0.95 * base["joules_per_output"]  # base: both types


def test_over_its_joules_target_the_simulated_fleet_batches_harder_as_live(costs):
    requests = trace("unique-high", requests=300)
    free = summarize(FleetSimulation(CATALOG, costs, H100_8).run(requests))
    held = summarize(FleetSimulation(CATALOG, costs, H100_8, target_j=1.0).run(requests))
    wait_s = Policy().max_wait_s * (Policy().over_target_wait_factor - 1)
    assert held["latency_s"]["p50"] == pytest.approx(free["latency_s"]["p50"] + wait_s)
    assert held["mean_batch_size"] >= free["mean_batch_size"]


def test_the_base_install_runs_the_cli_and_simulates_without_ray_torch_or_matplotlib(tmp_path):
    """`pip install wattserve` has none of them: the CLI must start, simulate must run."""
    out = tmp_path / "r.json"
    code = (
        "import sys\n"
        "for name in ('ray', 'torch', 'diffusers', 'matplotlib'):\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "from typer.testing import CliRunner\n"
        "from wattserve.cli.main import app\n"
        f"r = CliRunner().invoke(app, ['simulate', '--trace', 'mixed', '--fleet', '8xH100',"
        f" '--requests', '100', '--out', {str(out)!r}])\n"
        "print(r.output)\n"
        "sys.exit(r.exit_code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no figures: matplotlib is not installed" in done.stdout
    assert json.loads(out.read_text())["plots"] == []


def test_a_live_profile_replays_batches_with_the_round_trips_it_measured():
    from wattserve._admin import ProfileList, ProfilePoint
    from wattserve.bench.fleet import costs_from_profile
    from wattserve.policies.catalog import load_catalog as load_builtin

    builtin = load_builtin()
    point = ProfilePoint(variant="tiny-sd-turbo", batch_size=1, joules_per_output=20.0,
                         batch_latency_s=0.25, batches=3, mean_joules_per_output=18.0,
                         median_batch_latency_s=0.2,
                         recent_batch_latencies_s=[0.1, 0.2, 0.9])  # fmt: skip
    costs = costs_from_profile(builtin, ProfileList(replica="r", energy_sources=["simulated"],
                                                    data=[point]), "CPU")  # fmt: skip
    turbo = costs["tiny-sd-turbo"]
    assert turbo.batch_energy_j[1] == 18.0  # the mean, not the EWMA: totals add up
    assert turbo.batch_latency_s[1] == 0.2  # the median, where one number is needed
    rng = random.Random(0)
    assert {turbo.latency_s(1, rng) for _ in range(200)} == {0.1, 0.2, 0.9}
    assert turbo.latency_s(2, rng) == turbo.batch_latency_s[2]  # unmeasured: the model's
