"""Live telemetry on the shared cluster: agents, status, report, reconciliation."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner

from wattserve import Client
from wattserve.cli.main import app
from wattserve.telemetry.devices import SIM_IDLE_W

pytestmark = pytest.mark.ray


def test_status_shows_simulated_power_rising_while_busy_and_back_to_idle(url):
    with Client(url) as client:
        idle = client.status()
        assert idle.nodes and idle.devices
        assert {d.source for d in idle.devices} == {"simulated"}
        assert idle.cluster_power_w == pytest.approx(SIM_IDLE_W * len(idle.devices))
        assert all(d.power_limit_w and d.energy_j is not None for d in idle.devices)

        done = threading.Event()

        def busy():
            with Client(url) as c:
                c.generate("keep the device busy", seed=3, n=4, quality="high")
            done.set()

        threading.Thread(target=busy, daemon=True).start()
        peak = 0.0
        while not done.is_set():
            peak = max(peak, client.status().cluster_power_w)
            time.sleep(0.05)
        assert peak > SIM_IDLE_W + 100  # tiny-sd-large declares 450 W
        time.sleep(0.2)
        assert client.status().cluster_power_w == pytest.approx(SIM_IDLE_W * len(idle.devices))
        assert 0 <= client.status().nodes[0].sampling_cpu_pct < 5


def test_concurrent_requests_reconcile_within_one_percent(url):
    prompts = [(f"prompt {i % 7}", i, ("draft", "standard", "high")[i % 3]) for i in range(24)]

    def one(args):
        prompt, seed, quality = args
        with Client(url) as c:
            return c.generate(prompt, seed=seed, quality=quality).receipts[0]

    with ThreadPoolExecutor(8) as pool:
        receipts = list(pool.map(one, prompts))
    assert {r.energy_source for r in receipts} == {"simulated"}
    with Client(url) as client:
        report = client.report()
    rec = report.reconciliation
    assert rec.device_j > 0 and rec.attributed_j > 0 and rec.idle_j > 0
    assert rec.error_pct <= 1
    assert rec.attributed_j + rec.idle_j + rec.unattributed_j + rec.pending_j == pytest.approx(
        rec.device_j, rel=0.01
    )
    by_variant = {v.variant: v for v in report.variants}
    assert set(by_variant) >= {"tiny-sd-large", "tiny-sd-medium", "tiny-sd-turbo"}
    large = by_variant["tiny-sd-large"]
    assert large.joules_per_output == pytest.approx(large.joules / large.outputs)
    assert by_variant["tiny-sd-turbo"].joules_per_output < large.joules_per_output


def test_status_and_report_commands(url):
    runner = CliRunner()
    status = json.loads(runner.invoke(app, ["status", "--url", url, "--json"]).stdout)
    assert {"cluster_power_w", "nodes", "devices"} <= set(status)
    assert {"id", "name", "source", "power_w", "energy_j", "power_limit_w"} <= set(
        status["devices"][0]
    )
    report = json.loads(runner.invoke(app, ["report", "--books", "--url", url, "--json"]).stdout)
    assert set(report["reconciliation"]) >= {
        "device_j", "attributed_j", "idle_j", "unattributed_j", "error_pct",
    }  # fmt: skip
    assert all("joules_per_output" in v for v in report["variants"])
    assert report["target"]["joules_per_output_target"] is None  # none configured here
    assert report["target"]["rolling_joules_per_output"] > 0
    # With the admin token (found in the state dir), report is the ledger window report.
    window = json.loads(runner.invoke(app, ["report", "--url", url, "--json"]).stdout)
    assert window["outputs"] > 0 and "at batch size 1" in window["savings"]["baseline"]
    for command in ("status", "report"):
        assert runner.invoke(app, [command, "--url", url]).exit_code == 0


def test_prometheus_series_are_exported_by_ray(url):
    import httpx
    import ray

    with Client(url) as client:
        client.generate("metrics", seed=1, quality="draft")
        client.status()
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "ray_wattserve_device_power_watts", "ray_wattserve_device_energy_joules",
        "ray_wattserve_joules_total", "ray_wattserve_outputs_total",
        "ray_wattserve_joules_per_output",
    }  # fmt: skip
    found: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= found:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        found = {line.split("{")[0] for line in text.splitlines() if "wattserve_" in line}
        time.sleep(1)
    assert wanted <= found
