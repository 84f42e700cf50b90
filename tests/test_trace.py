"""Workload traces (bench.trace) and ``wattserve trace``: pure, fast, no Ray."""

import json
import statistics
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from wattserve.bench.profiles import DEFAULT_DATA_DIR
from wattserve.bench.trace import (
    PRESETS,
    TraceHeader,
    TraceRequest,
    TraceSpec,
    load_prompts,
    make_trace,
    make_trace_file,
    preset_spec,
    read_trace,
    trace_stats,
    write_trace,
)
from wattserve.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = ROOT / "cli" / "demo_prompts.txt"
PARTI_PROMPTS = DEFAULT_DATA_DIR / "PartiPrompts.tsv"
N = 20_000
runner = CliRunner()


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(DEMO_PROMPTS)


@pytest.fixture(scope="module")
def traces(prompts):
    """Each preset at 20,000 requests (seed 7), made once for the module."""
    return {
        name: make_trace(preset_spec(name, requests=N, seed=7), prompts.prompts) for name in PRESETS
    }


def output(request):
    return (request.prompt, request.seed, request.size, request.quality)


def header_for(spec, prompts, preset=None):
    return TraceHeader(**spec.model_dump(), preset=preset, prompts=prompts.source)


# --- generation -------------------------------------------------------------------------


def test_same_spec_writes_the_same_bytes_and_another_seed_does_not(prompts, tmp_path):
    spec = preset_spec("mixed", requests=2000, seed=11)
    make_trace_file(tmp_path / "a.jsonl", spec, prompts, preset="mixed")
    make_trace_file(tmp_path / "b.jsonl", spec, prompts, preset="mixed")
    write_trace(tmp_path / "c.jsonl", header_for(spec, prompts, "mixed"),
                make_trace(spec, prompts.prompts))  # fmt: skip
    first = (tmp_path / "a.jsonl").read_bytes()
    assert first == (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    other = spec.model_copy(update={"seed": 12})
    make_trace_file(tmp_path / "d.jsonl", other, prompts, preset="mixed")
    assert (tmp_path / "d.jsonl").read_bytes().splitlines()[1:] != first.splitlines()[1:]


@pytest.mark.parametrize("name", list(PRESETS))
def test_realised_repeat_rate_and_mixes_match_the_preset(traces, name):
    stats = trace_stats(traces[name])
    spec = preset_spec(name)
    assert stats["requests"] == N
    assert stats["repeat_rate"] == pytest.approx(spec.repeat_rate, abs=0.015)
    assert stats["distinct_outputs"] == N - stats["repeats"]
    total = sum(spec.tiers.values())
    for tier, share in stats["tiers"].items():
        assert share == pytest.approx(spec.tiers.get(tier, 0) / total, abs=0.02), tier
    assert stats["sizes"] == {"64x64": 1.0}
    assert stats["seeded_fraction"] == spec.seeded_fraction


def test_unique_high_is_all_new_and_all_high(traces):
    requests = traces["unique-high"]
    assert {r.quality for r in requests} == {"high"}
    assert len({output(r) for r in requests}) == N
    assert trace_stats(requests)["repeats"] == 0


def test_repeats_copy_an_earlier_request_exactly_and_new_requests_are_new(prompts):
    # Three prompts over 6,000 requests: prompts are reused, outputs must not be.
    spec = preset_spec("mixed", requests=6000, seed=3, tenants={"a": 1, "b": 1})
    requests = make_trace(spec, prompts.prompts[:3])
    seen: dict[tuple, TraceRequest] = {}
    repeats = 0
    for request in requests:
        original = seen.setdefault(output(request), request)
        if original is not request:
            repeats += 1
            assert (original.n, original.seed is not None) == (request.n, True)
            assert original.arrival_s <= request.arrival_s
    assert repeats / len(requests) == pytest.approx(0.3, abs=0.02)
    assert {r.tenant for r in requests} == {"a", "b"}
    no_repeats = make_trace(spec.model_copy(update={"repeat_rate": 0.0}), prompts.prompts[:3])
    assert len({output(r) for r in no_repeats}) == len(no_repeats)


def test_only_seeded_requests_are_repeated(prompts):
    spec = preset_spec("draft-heavy", requests=N, seed=5, seeded_fraction=0.5)
    stats = trace_stats(make_trace(spec, prompts.prompts))
    # Repeats copy seeded requests only, so seeded share = repeats + half of the new ones.
    assert stats["repeat_rate"] == pytest.approx(0.5, abs=0.015)
    assert stats["seeded_fraction"] == pytest.approx(0.5 + 0.5 * 0.5, abs=0.015)
    with pytest.raises(ValidationError, match="seeded_fraction > 0"):
        preset_spec("mixed", seeded_fraction=0)


def test_new_requests_draw_prompts_without_replacement_first(prompts):
    spec = preset_spec("unique-high", requests=len(prompts.prompts) * 2, seed=1)
    used = [r.prompt for r in make_trace(spec, prompts.prompts)]
    count = len(prompts.prompts)
    assert sorted(used[:count]) == sorted(used[count:]) == sorted(prompts.prompts)


def test_zipf_makes_the_first_request_of_a_class_the_hottest(traces):
    requests = traces["mixed"]
    counts: dict[tuple, int] = {}
    for request in requests:
        counts[output(request)] = counts.get(output(request), 0) + 1
    hottest = max(counts, key=counts.__getitem__)
    first_of_class = next(r for r in requests if r.quality == hottest[3])
    assert hottest == output(first_of_class)
    uniform = make_trace(preset_spec("mixed", requests=N, seed=7, popularity="uniform"),
                         [f"p{i}" for i in range(50)])  # fmt: skip
    zipf = trace_stats(requests)["hottest_output_share"]
    assert trace_stats(uniform)["hottest_output_share"] < zipf / 10


def test_poisson_inter_arrival_mean_is_one_over_the_rate(prompts):
    spec = preset_spec("mixed", requests=N, seed=2, rate_per_s=5.0)
    arrivals = [r.arrival_s for r in make_trace(spec, prompts.prompts)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.03)


def test_bursty_arrives_only_in_on_windows(prompts):
    spec = preset_spec("mixed", requests=N, seed=2, arrival="bursty", rate_per_s=4.0,
                       on_s=3.0, off_s=7.0)  # fmt: skip
    requests = make_trace(spec, prompts.prompts)
    phases = [r.arrival_s % 10.0 for r in requests]
    assert max(phases) <= 3.0 + 1e-6
    assert trace_stats(requests)["mean_rate_per_s"] == pytest.approx(4.0 * 3 / 10, rel=0.05)


def test_arrivals_and_tenants_do_not_change_the_requests(prompts):
    spec = preset_spec("mixed", requests=3000, seed=9)
    base = [output(r) for r in make_trace(spec, prompts.prompts)]
    changed = spec.model_copy(update={"rate_per_s": 50.0, "tenants": {"x": 1.0, "y": 2.0}})
    assert [output(r) for r in make_trace(changed, prompts.prompts)] == base


def test_mixes_are_canonical_so_their_order_does_not_matter(prompts):
    one = preset_spec("mixed", requests=500, tiers={"high": 2, "draft": 5, "standard": 3},
                      sizes={"128X128": 1, "64x64": 1})  # fmt: skip
    two = preset_spec("mixed", requests=500, tiers={"draft": 5, "standard": 3, "high": 2},
                      sizes={"64x64": 1, "128x128": 1})  # fmt: skip
    assert one == two and list(one.tiers) == ["draft", "standard", "high"]
    assert make_trace(one, prompts.prompts) == make_trace(two, prompts.prompts)


# --- files --------------------------------------------------------------------------------


def test_header_and_requests_round_trip(prompts, tmp_path):
    spec = preset_spec("draft-heavy", requests=1000, seed=4, tenants={"acme": 1})
    path = tmp_path / "t.jsonl"
    header, stats = make_trace_file(path, spec, prompts, preset="draft-heavy")
    trace = read_trace(path)
    assert trace.header == header
    assert trace.header.prompts.name == "demo_prompts.txt"
    assert len(trace.header.prompts.sha256) == 16
    assert (trace.header.preset, trace.header.version) == ("draft-heavy", 1)
    assert list(trace.requests) == make_trace(spec, prompts.prompts)
    assert trace_stats(trace.requests) == stats
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"trace"} and first["trace"]["requests"] == 1000


GOOD = '{"arrival_s": 1.0, "prompt": "a cat", "seed": 1, "size": "64x64", "quality": "draft"}'


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "line 3: line: Invalid JSON"),
        (GOOD.replace('"draft"', '"ultra"'), "line 3: quality: Input should be"),
        (GOOD.replace("1.0", "-1.0"), "line 3: arrival_s: Input should be greater"),
        (GOOD.replace("}", ', "colour": "red"}'), "line 3: colour: Extra inputs"),
        (GOOD.replace("64x64", "64 by 64"), "line 3: size: String should match"),
        (GOOD.replace("1.0", "0.5"), "line 3: arrival_s: 0.5 is before"),
        (GOOD.replace('"a cat"', '"   "'), "line 3: prompt: String should match"),
    ],
)
def test_read_trace_names_file_line_and_field(prompts, tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    spec = preset_spec("mixed", requests=2)
    lines = [json.dumps({"trace": header_for(spec, prompts).model_dump(mode="json")}), GOOD]
    path.write_text("\n".join([*lines, line]) + "\n")
    with pytest.raises(ValueError) as caught:
        read_trace(path)
    assert str(caught.value).startswith(f"trace {path} {why}")


def test_read_trace_checks_header_and_count(prompts, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n")
    with pytest.raises(ValueError, match=r"line 1: trace: Field required"):
        read_trace(path)
    header = {"trace": header_for(preset_spec("mixed", requests=2), prompts).model_dump()}
    path.write_text(json.dumps(header) + "\n" + GOOD + "\n")
    with pytest.raises(ValueError, match="the header says 2 requests, the file has 1"):
        read_trace(path)


def test_write_trace_leaves_no_file_when_requests_do_not_match(prompts, tmp_path):
    spec = preset_spec("mixed", requests=5)
    path = tmp_path / "t.jsonl"
    with pytest.raises(ValueError, match="header says 5 requests, got 4"):
        write_trace(path, header_for(spec, prompts), make_trace(spec, prompts.prompts)[:4])
    assert list(tmp_path.iterdir()) == []


# --- prompts ------------------------------------------------------------------------------


@pytest.mark.skipif(not PARTI_PROMPTS.exists(), reason=f"{PARTI_PROMPTS} is not present")
def test_partiprompts_load_from_the_shared_tsv():
    loaded = load_prompts(PARTI_PROMPTS)
    assert len(loaded.prompts) == loaded.source.count == 1632
    assert loaded.source.name == "PartiPrompts.tsv"
    assert all(p == p.strip() and p for p in loaded.prompts)


def test_text_prompts_skip_blank_lines_and_tsv_needs_a_prompt_column(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(text).prompts == ("a cat", "a dog")
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Text\tCategory\na cat\tAnimals\n")
    with pytest.raises(ValueError, match="'Prompt' column"):
        load_prompts(tsv)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_spec_rejects_out_of_range_values():
    with pytest.raises(ValidationError):
        TraceSpec(requests=0, seed=0, repeat_rate=0.1, tiers={"draft": 1})
    with pytest.raises(ValidationError, match="positive weight"):
        TraceSpec(requests=1, seed=0, repeat_rate=0.1, tiers={"draft": 0})
    with pytest.raises(ValidationError, match="Pareto alpha"):
        preset_spec("mixed", popularity="pareto", skew=0.05)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_make_writes_the_trace_and_show_prints_it(tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["trace", "make", "--preset", "draft-heavy", "--requests", "400", "--seed", "3",
            "--out", str(out), "--tiers", "draft=8,high=2", "--json"]  # fmt: skip
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    result = json.loads(made.stdout)
    assert result["header"]["tiers"] == {"draft": 8.0, "high": 2.0}
    assert result["header"]["prompts"]["name"] == "demo_prompts.txt"
    assert result["stats"] == trace_stats(read_trace(out).requests)
    shown = runner.invoke(app, ["trace", "show", str(out), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout) == result
    table = runner.invoke(app, ["trace", "show", str(out)])
    assert table.exit_code == 0 and "draft-heavy" in table.stdout and "repeats" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "ultra"], "--preset: unknown preset 'ultra'"),
        (["--rate-per-s", "-1"], "--rate-per-s: Input should be greater than 0"),
        (["--tiers", "draft:50"], "--tiers: want NAME=WEIGHT pairs"),
        (["--tiers", "draft=50,ultra=5"], "--tiers ultra: Input should be"),
        (["--tiers", "draft=x"], "--tiers: want NAME=WEIGHT pairs"),
        (["--tiers", "draft=1,draft=2"], "--tiers: 'draft' is listed twice"),
        (["--sizes", "big=1"], "--sizes: size must look like"),
        (["--prompts", "/nonexistent/prompts.txt"], "--prompts: cannot read"),
        (["--repeat-rate", "1.5"], "--repeat-rate: Input should be less than or equal to 1"),
        (["--requests", "0"], "--requests: Input should be greater than or equal to 1"),
        (["--arrival", "steady"], "--arrival: Input should be 'poisson' or 'bursty'"),
        (["--seeded-fraction", "0"], "repeat_rate > 0 needs seeded_fraction > 0"),
    ],
)
def test_cli_make_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "t.jsonl"
    result = runner.invoke(app, ["trace", "make", "--out", str(out), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_cli_show_refuses_a_bad_trace_in_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{}\n")
    result = runner.invoke(app, ["trace", "show", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: trace {path} line 1: trace: Field required")
    missing = runner.invoke(app, ["trace", "show", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
