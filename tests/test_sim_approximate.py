"""Approximate reuse in the fleet simulator: the proxy similarity, file-order traces,
resumed generations, their batching and their place in the savings split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wattserve.bench._latents import LatentStore, latent_bytes
from wattserve.bench.fleet import fleet_catalog
from wattserve.bench.profiles import DEFAULT_DATA_DIR
from wattserve.bench.sim_report import oracle_joules, resume_bound, split_by_cause, summarize
from wattserve.bench.similarity import PROXY_LABEL, PromptSimilarity
from wattserve.bench.simulate import FleetSimulation
from wattserve.bench.trace import TraceRequest, read_trace
from wattserve.cli.main import app
from wattserve.policies.catalog import load_catalog
from wattserve.policies.latent_reuse import capture_steps
from wattserve.policies.routing import reference_variant

DATA = DEFAULT_DATA_DIR
DIFFUSIONDB = DATA / "diffusiondb_prompts_5k.txt"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"no ML.ENERGY data at {DATA}")
CATALOG = load_catalog(Path(__file__).resolve().parents[1] / "policies" / "real_catalog.toml")
H100_8 = {"H100": 8}
runner = CliRunner()

BASE = "a lighthouse on a cliff at dusk, oil painting, dramatic clouds, by ivan aivazovsky"
EDITS = [
    BASE,
    BASE + ", highly detailed",
    BASE.replace("dusk", "dawn"),
    BASE + ", trending on artstation",
    BASE,
    "portrait of a cyberpunk samurai, neon rain, 8 k, octane render",
    "portrait of a cyberpunk samurai, neon rain, 8 k, octane render, cinematic",
]


def near_duplicates(seeded: bool = False, copies: int = 4) -> list[TraceRequest]:
    """Edits of two prompts, 2 s apart: each finds the last one's latent already kept."""
    prompts = EDITS * copies
    return [
        TraceRequest(arrival_s=2.0 * i, prompt=p, seed=1000 + i if seeded else None,
                     size="1024x1024", quality="draft")
        for i, p in enumerate(prompts)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fleet():
    return fleet_catalog(CATALOG, H100_8, DATA)


def simulate(fleet, trace, reuse, **kwargs):
    variants, costs = fleet
    return FleetSimulation(variants, costs, H100_8, reuse=reuse, **kwargs).run(trace)


# --- the proxy ----------------------------------------------------------------------------


def test_proxy_similarity_scores_identical_edited_and_unrelated_prompts():
    unrelated = "a bowl of ramen with chopsticks, food photography"
    proxy = PromptSimilarity([*EDITS, unrelated])
    assert proxy.label == PROXY_LABEL == "tfidf-proxy"
    assert proxy.similarity(BASE, BASE) == 1.0
    assert proxy.row(proxy.id(BASE))[proxy.id(BASE)] == 1.0
    assert proxy.similarity(BASE, EDITS[1]) > 0.75  # two (rare) words added to fourteen
    assert 0.65 <= proxy.similarity(BASE, EDITS[2]) < 1.0  # one word swapped
    assert proxy.similarity(BASE, unrelated) < 0.2
    assert proxy.similarity(EDITS[5], unrelated) < 0.2  # "a" and "of" in common
    assert PromptSimilarity(["red cube", "blue sphere"]).similarity("red cube", "blue sphere") == 0
    assert len(proxy) == len(EDITS) - 1 + 1  # BASE appears twice


# --- traces in file order -------------------------------------------------------------------


@pytest.mark.skipif(not DIFFUSIONDB.exists(), reason=f"no {DIFFUSIONDB}")
def test_trace_make_keeps_a_session_logs_order_and_says_so(tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["trace", "make", "--out", str(out), "--prompts", str(DIFFUSIONDB),
            "--requests", "300", "--repeat-rate", "0"]  # fmt: skip
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    trace = read_trace(out)
    lines = [line.strip() for line in DIFFUSIONDB.read_text(encoding="utf-8").splitlines()]
    in_file = [line for line in lines if line][:300]
    assert [r.prompt for r in trace.requests] == in_file
    assert trace.header.prompt_order == "file"
    assert trace.header.prompts.name == DIFFUSIONDB.name
    preset = tmp_path / "p.jsonl"
    done = runner.invoke(app, ["trace", "make", "--out", str(preset), "--preset", "diffusiondb",
                               "--requests", "50"])  # fmt: skip
    assert done.exit_code == 0, done.output
    header = read_trace(preset).header
    made_as = (header.preset, header.prompt_order, header.seeded_fraction)
    assert made_as == ("diffusiondb", "file", 0.0)
    assert [r.prompt for r in read_trace(preset).requests] == in_file[:50]


def test_file_order_is_an_option_for_any_file_and_shuffled_stays_the_default(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(40)), encoding="utf-8")
    for order, expect_file_order in ((None, False), ("file", True)):
        out = tmp_path / f"{order}.jsonl"
        args = ["trace", "make", "--out", str(out), "--prompts", str(prompts),
                "--preset", "unique-high", "--requests", "40"]  # fmt: skip
        result = runner.invoke(app, args + (["--prompt-order", order] if order else []))
        assert result.exit_code == 0, result.output
        got = [r.prompt for r in read_trace(out).requests]
        assert sorted(got) == sorted(f"prompt number {i}" for i in range(40))
        assert (got == [f"prompt number {i}" for i in range(40)]) is expect_file_order
        assert read_trace(out).header.prompt_order == ("file" if order else "shuffled")


# --- the simulator --------------------------------------------------------------------------


@needs_data
def test_near_duplicates_resume_from_kept_latents_and_cost_less(fleet):
    trace = near_duplicates()
    exact, approx = simulate(fleet, trace, "exact"), simulate(fleet, trace, "approximate")
    assert {r.cache for r in exact.receipts} == {"miss"}
    resumed = [r for r in approx.receipts if r.cache == "approximate"]
    assert len(resumed) >= len(trace) // 2
    steps = fleet[0].get(resumed[0].variant).steps
    for r in resumed:
        assert r.steps == steps and r.steps_skipped in capture_steps(steps)
        assert r.similarity is not None and r.similarity >= 0.65
        assert r.joules < exact.receipts[r.request_index].joules
    # an exact repeat of the prompt skips the deepest band: half the schedule
    repeat = next(r for r in resumed if trace[r.request_index].prompt == BASE)
    assert (repeat.similarity, repeat.steps_skipped) == (1.0, steps // 2)
    got, base = summarize(approx), summarize(exact)
    assert got["joules"] < base["joules"] and got["approximate"] == len(resumed)
    assert got["latent_store"]["hits"] == len(resumed)


@needs_data
def test_resumed_outputs_batch_only_with_outputs_resuming_at_the_same_step(fleet):
    # two prompts first; then edits of them, all at once: the queue holds outputs that
    # resume at several steps (their bands differ), and batches form from it
    first = [EDITS[0], EDITS[5]]
    then = [EDITS[1], EDITS[2], EDITS[3], EDITS[6]] * 4
    trace = [TraceRequest(arrival_s=0.0 if i < len(first) else 100.0, prompt=p,
                          size="1024x1024", quality="draft")
             for i, p in enumerate(first + then)]  # fmt: skip
    run = simulate(fleet, trace, "approximate")
    by_batch: dict[str, set[int]] = {}
    for r in run.receipts:
        by_batch.setdefault(r.batch_id, set()).add(r.steps_skipped)
    assert all(len(skips) == 1 for skips in by_batch.values())
    assert max(r.batch_size for r in run.receipts) > 1  # batches did form
    assert len({r.steps_skipped for r in run.receipts}) > 2  # at several start steps


@needs_data
def test_seeded_requests_are_never_served_approximately(fleet):
    run = simulate(fleet, near_duplicates(seeded=True), "approximate")
    assert {r.cache for r in run.receipts} == {"miss"}
    assert all(r.steps_skipped == 0 and r.similarity is None for r in run.receipts)
    assert resume_bound(near_duplicates(seeded=True), "approximate") == [0.0] * len(
        near_duplicates(seeded=True)
    )


@needs_data
def test_the_savings_split_names_approximate_cache_and_adds_up(fleet):
    trace = near_duplicates()
    variants, costs = fleet
    sim = FleetSimulation(variants, costs, H100_8, reuse="approximate")
    run, base = sim.run(trace), summarize(sim.run(trace, policy="baseline"))
    split = split_by_cause(run, reference_variant(sim.catalog).name, base["joules_per_output"])
    assert split.by_cause_joules["approximate_cache"] > 0
    assert sum(split.by_cause_joules.values()) == pytest.approx(split.saved_joules)
    # the oracle resumes too, so approximate reuse does not beat it
    oracle = oracle_joules(trace, sim.catalog, costs, sim.policy,
                           resume_bound(trace, "approximate"))  # fmt: skip
    assert oracle.joules <= summarize(run)["joules"] * (1 + 1e-9)
    assert oracle.joules < oracle_joules(trace, sim.catalog, costs, sim.policy).joules


def test_the_latent_store_stays_under_its_byte_cap_and_keeps_per_pool():
    prompts = [f"a red cube number {i} on a table" for i in range(6)]
    one = latent_bytes(64, 64, len(capture_steps(20)))
    store = LatentStore(PromptSimilarity(prompts), max_bytes=3 * one)
    for i, prompt in enumerate(prompts):
        store.keep(("tenant:a", "v", 64, 64), 20, prompt, float(i))
        assert store.bytes <= 3 * one
    assert store.stats["kept"] == 6 and store.stats["evicted"] == 3
    assert store.find(("tenant:a", "v", 64, 64), 20, prompts[5], 10.0) is not None
    assert store.find(("tenant:b", "v", 64, 64), 20, prompts[5], 10.0) is None  # other pool
    assert store.find(("tenant:a", "w", 64, 64), 20, prompts[5], 10.0) is None  # other variant
    # a generation resumed after 4 of 20 steps keeps only the later kept steps (6, 8, 10);
    # one resumed after 10 has none left to keep
    resumed = LatentStore(PromptSimilarity(prompts), max_bytes=10 * one)
    resumed.keep(("p", "v", 64, 64), 20, prompts[0], 0.0, start_step=10)
    assert resumed.stats["kept"] == 0
    resumed.keep(("p", "v", 64, 64), 20, prompts[0], 0.0, start_step=4)
    assert resumed.bytes == latent_bytes(64, 64, 3)
    assert resumed.find(("p", "v", 64, 64), 20, prompts[0], 1.0).skip == 10  # identical: 1/2
    assert resumed.find(("p", "v", 64, 64), 20, prompts[1], 1.0) is None  # 0.61: below every band


@needs_data
def test_cli_simulates_reuse_off_and_on_and_prints_the_split(tmp_path):
    path = tmp_path / "t.jsonl"
    header = {"trace": {"requests": len(near_duplicates()), "seed": 0, "repeat_rate": 0.0,
                        "tiers": {"draft": 1.0}, "sizes": {"1024x1024": 1.0},
                        "seeded_fraction": 0.0,
                        "prompts": {"name": "edits", "sha256": "0" * 16, "count": 7}}}  # fmt: skip
    lines = [json.dumps(header)] + [r.model_dump_json() for r in near_duplicates()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reports = {}
    for reuse in ("exact", "approximate"):
        out = tmp_path / f"{reuse}.json"
        result = runner.invoke(app, ["simulate", "--trace", str(path), "--fleet", "8xH100",
                                     "--reuse", reuse, "--out", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "approximate_cache" in result.stdout
        assert "factor vs conventional baseline" in result.stdout
        reports[reuse] = json.loads(out.read_text())
    exact, approx = reports["exact"], reports["approximate"]
    assert exact["savings_by_cause_joules"]["approximate_cache"] == 0
    assert approx["savings_by_cause_joules"]["approximate_cache"] > 0
    assert approx["factor_vs_baseline"] > exact["factor_vs_baseline"]
    assert "after approximate cache" in approx["waterfall_joules"]
    assert PROXY_LABEL in approx["reuse"]["similarity"]
    bad = runner.invoke(app, ["simulate", "--trace", str(path), "--fleet", "8xH100",
                              "--reuse", "fuzzy"])  # fmt: skip
    assert bad.exit_code == 2 and "--reuse: want exact or approximate" in bad.stderr
