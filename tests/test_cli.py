"""The admin CLI against the shared live service, through Typer's CliRunner."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


@pytest.mark.ray
def test_generate_json_twice_gives_identical_bytes_and_receipts(url, tmp_path):
    args = ["generate", "a red cube", "--seed", "7", "--json", "--url", url, "--out", str(tmp_path)]
    first, again = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    one, two = json.loads(first.stdout), json.loads(again.stdout)
    assert one["images"][0]["sha256"] == two["images"][0]["sha256"]
    receipt = one["images"][0]["receipt"]
    assert receipt["energy_source"] == "simulated" and receipt["seed"] == 7
    assert set(receipt) >= {
        "request_id",
        "variant",
        "batch_id",
        "batch_size",
        "joules",
        "cache",
        "latency_ms",
    }
    saved = tmp_path / f"{one['request_id']}-0.png"
    assert saved.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_variants_and_ledger_print_tables_and_json(url, catalog):
    table = runner.invoke(app, ["variants", "--url", url])
    assert table.exit_code == 0 and "tiny-sd-turbo" in table.stdout
    listed = json.loads(runner.invoke(app, ["variants", "--url", url, "--json"]).stdout)
    assert [v["id"] for v in listed] == catalog.names
    runner.invoke(app, ["generate", "ledger check", "--seed", "1", "--url", url])
    rows = json.loads(runner.invoke(app, ["ledger", "--url", url, "--limit", "3", "--json"]).stdout)
    assert 1 <= len(rows) <= 3 and all(r["energy_source"] for r in rows)
    assert runner.invoke(app, ["ledger", "--url", url]).exit_code == 0


@pytest.mark.ray
def test_server_side_rejection_is_one_line_on_stderr(url):
    result = runner.invoke(app, ["generate", "x", "--size", "7x7", "--url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: size:") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_bad_flags_and_unreachable_service_exit_non_zero():
    bad_tier = runner.invoke(app, ["generate", "x", "--quality", "ultra"])
    assert bad_tier.exit_code == 2 and "draft, standard or high" in bad_tier.stderr
    down = runner.invoke(app, ["variants", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot reach wattserve" in down.stderr
    bad_limit = runner.invoke(app, ["ledger", "--limit", "0"])
    assert bad_limit.exit_code == 2


def test_serve_with_invalid_catalog_fails_fast_naming_file_and_field(tmp_path):
    catalog = tmp_path / "bad.toml"
    catalog.write_text('[[variant]]\nname = "v"\nsource = "/x"\nsteps = 0\n')
    env = {**os.environ, "WATTSERVE_CATALOG": str(catalog), "WATTSERVE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert str(catalog) in done.stderr and "field 'steps'" in done.stderr
    assert "Traceback" not in done.stderr
