r"""One prepared GPU check: NVML readings, SD 2.1-sized batches, two energy methods.

What it does, in one run (expected 2-4 minutes on an H100/H200, not yet timed there;
it must stay under 8):

1. lists the GPUs through wattserve's NVML source (``open_power_sources("nvml")``): id,
   name, power, energy counter, whether the counter works, the power limit. It only
   *reads*: this script never changes a power limit, clock or any other GPU setting;
2. builds a pipeline with the architecture of Stable Diffusion 2.1 and random weights
   (``scripts/gpu_catalog.toml``, variant ``sd21-arch-random``: 0.87 B UNet, 0.34 B
   text encoder, 84 M VAE parameters) into a temporary models directory, loads it in
   float16 through the real ``workers.worker.VariantWorker`` and runs batches of 1, 2
   and 4 images at 512x512, 25 steps, guidance 7.5 (one warm-up batch first, then each
   size ``--repeats`` times). The worker's meter is a ``telemetry.agent.LocalMeter`` over
   an in-process ``TelemetryAgent`` sampling NVML at 10 Hz, so each batch's joules are
   what wattserve itself would record (``nvml-counter`` on Volta and newer);
3. independently polls ``power_mw()`` of the same GPU at ~100 Hz in its own thread and
   integrates it (trapezoids) over exactly the meter's begin..end window of each batch;
4. prints per batch size: J/image from the agent (with its energy_source), J/image from
   integrated power, batch latency, and agent/integrated ratio;
5. runs ``pytest -q -m gpu tests/test_gpu.py`` and records its exit code and summary.

Everything is printed as one JSON document on stdout (logs go to stderr) and, when
``OUT`` is set, also written to ``$OUT/gpu-check.json``. The exit code is 0 only when
every stage worked (the pytest exit code included).

``--cpu-smoke`` runs the same code path without a GPU: simulated power source, the
tiny built-in variant ``tiny-sd-turbo``, 64x64, batch sizes 1 and 2, no pytest. That is
what ``tests/test_gpu_check.py`` runs.

Running it with the ``device`` tool (a lent H100/H200; nothing outside that machine can
be reached, so nothing can be pip-installed there from a registry)
-----------------------------------------------------------------------------------
The machine's image has its own ``python3`` (3.12, /opt/torch/.venv) with torch (CUDA),
transformers, accelerate, huggingface-hub, safetensors, tokenizers, numpy, pillow,
httpx, regex, requests, filelock, nvidia-ml-py (pynvml) and pytest, but, per
/work/.library/device/KINDS.md's package list, NOT diffusers, pydantic (with
pydantic-core, annotated-types, typing-inspection) or structlog, and pydantic 2.14
needs typing-extensions>=4.16 (the image's version is not listed). Our ``.venv`` cannot
travel (a CPU-only torch for Python 3.11, far over the 64 MiB ``carry`` limit), so
carry those few wheels, for the image's Python 3.12, and use the image's torch. Once,
here, in the repository root (these pins resolved on 2026-11-26: 8.9 MB together,
pydantic-core the only compiled one)::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 structlog==26.1.0

Then one ``run`` call with ``carry: [".whl"]`` and ``timeout_s`` about 540::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py

``$OUT/gpu-check.json`` comes back. Limits to know: the session has 15 minutes of
device time in all (the machine's start counts), so run this once, prepared; the image's
transformers (5.17 when last listed) is older than ours (5.24) and diffusers' own
requirements (huggingface-hub>=1.32) are only listed as met there, not checked; ``ray``
is not on the image (carrying it and its dependencies was not tried), so the
``tests/test_gpu.py`` case that builds a ``VariantWorker`` without a meter (it then
looks up a Ray telemetry agent) is expected to fail there; this script gives its worker
a ``LocalMeter`` and never imports Ray (``cuda_device_uuid`` is recomputed below if
``workers.meter`` cannot be imported). ``make gpu-check`` runs this script with
``.venv/bin/python`` for a machine where the project's own venv has a CUDA torch.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing wattserve
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GPU_CATALOG = REPO / "scripts" / "gpu_catalog.toml"
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red cube on a glass table, studio light",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, top view, photograph",
)


class PowerPoller:
    """Polls one device's ``power_mw()`` in a thread; integrates any window afterwards."""

    def __init__(self, device: Any, hz: float) -> None:
        self._device = device
        self._period_s = 1.0 / hz
        self._times: list[float] = []
        self._watts: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="power-poller", daemon=True)
        self.errors = 0

    def _loop(self) -> None:
        next_s = time.monotonic()
        while not self._stop.is_set():
            try:
                watts = self._device.power_mw() / 1000
            except Exception:  # a failed read leaves a gap; the trapezoids bridge it
                self.errors += 1
            else:
                with self._lock:
                    self._times.append(time.monotonic())
                    self._watts.append(watts)
            next_s += self._period_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (samples are kept)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _at(self, t: float) -> float:
        """Power at ``t``, linearly interpolated (nearest sample outside the range)."""
        i = bisect.bisect_left(self._times, t)
        if i == 0:
            return self._watts[0]
        if i == len(self._times):
            return self._watts[-1]
        t0, t1 = self._times[i - 1], self._times[i]
        w0, w1 = self._watts[i - 1], self._watts[i]
        return w0 + (w1 - w0) * (t - t0) / (t1 - t0) if t1 > t0 else w1

    def integrate(self, start_s: float, end_s: float) -> tuple[float, int]:
        """(joules over [start_s, end_s] by trapezoids, samples inside the window)."""
        with self._lock:
            if not self._times:
                raise RuntimeError("no power samples were taken")
            lo = bisect.bisect_right(self._times, start_s)
            hi = bisect.bisect_left(self._times, end_s)
            points = [(start_s, self._at(start_s))]
            points += list(zip(self._times[lo:hi], self._watts[lo:hi], strict=True))
            points.append((end_s, self._at(end_s)))
        joules = sum(
            (t1 - t0) * (w0 + w1) / 2
            for (t0, w0), (t1, w1) in zip(points, points[1:], strict=False)
        )
        return joules, hi - lo


class WindowMeter:
    """A ``BatchMeter`` that passes through to a ``LocalMeter`` and records its window."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.windows: dict[str, tuple[float, float]] = {}
        self._begun: dict[str, float] = {}

    def begin(self, batch_id: str, power_w: float) -> None:
        """Report a batch start, then note the time."""
        self._inner.begin(batch_id, power_w)
        self._begun[batch_id] = time.monotonic()

    def end(self, batch_id: str) -> Any:
        """Note the time, then report the batch end and return the agent's measurement."""
        ended = time.monotonic()
        self.windows[batch_id] = (self._begun.pop(batch_id), ended)
        return self._inner.end(batch_id)


def _device_info(device: Any) -> dict[str, Any]:
    """Everything the NVML (or simulated) source reports for one device, read-only."""
    from wattserve.telemetry.devices import TelemetryError

    def read(name: str) -> Any:
        try:
            return getattr(device, name)()
        except TelemetryError as exc:
            return f"unsupported: {exc}"

    return {
        "index": device.index,
        "id": device.uuid,
        "name": device.name,
        "kind": device.kind,
        "power_mw": read("power_mw"),
        "energy_mj": read("energy_mj"),
        "supports_energy_counter": device.supports_energy_counter(),
        "power_limit_mw": device.power_limit_mw(),
        "power_limit_constraints_mw": device.power_limit_constraints_mw(),
        "utilization_pct": device.utilization_pct(),
    }


def _device_uuid(torch_device: Any) -> str | None:
    """NVML UUID of the worker's device (``workers.meter.cuda_device_uuid`` without Ray)."""
    try:
        from wattserve.workers.meter import cuda_device_uuid
    except ImportError:  # workers.meter imports ray, which a bare GPU image may lack
        if getattr(torch_device, "type", "cpu") != "cuda":
            return None
        import torch

        return f"GPU-{torch.cuda.get_device_properties(torch_device).uuid}"
    return cuda_device_uuid(torch_device)


def _versions() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per batch size over the timed (non-warm-up) runs."""
    by_size: dict[str, Any] = {}
    for size in sorted({r["batch_size"] for r in runs}):
        rows = [r for r in runs if r["batch_size"] == size]
        agent = statistics.median(r["agent_joules"] / size for r in rows)
        integ = statistics.median(r["integrated_joules"] / size for r in rows)
        by_size[str(size)] = {
            "runs": len(rows),
            "agent_j_per_image": round(agent, 3),
            "energy_source": sorted({r["energy_source"] for r in rows}),
            "integrated_j_per_image": round(integ, 3),
            "batch_latency_s": round(statistics.median(r["busy_s"] for r in rows), 4),
            "mean_power_w": round(statistics.median(r["mean_power_w"] for r in rows), 1),
            "agent_over_integrated": round(agent / integ, 4) if integ > 0 else None,
        }
    return by_size


def _run_pytest() -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"returncode": None, "summary": "timed out after 300 s", "tail": str(tail)}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "tail": (proc.stdout + proc.stderr)[-3000:],
    }


def run_check(cpu_smoke: bool, repeats: int, models_dir: Path) -> dict[str, Any]:
    """Every stage of the check; failures are recorded in ``errors`` and later stages go on."""
    import structlog

    from wattserve.policies.catalog import load_catalog
    from wattserve.policies.plans import BatchPlan, WorkItem
    from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
    from wattserve.telemetry.devices import TelemetryError, open_power_sources
    from wattserve.workers.pipelines import resolve_source
    from wattserve.workers.worker import VariantWorker

    # Logs to stderr so stdout is the one JSON document (configure_logging keeps this).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    if cpu_smoke:
        source_mode, variant = "simulated", load_catalog().get("tiny-sd-turbo")
        side_px, sizes = 64, (1, 2)
    else:
        source_mode, variant = "nvml", load_catalog(GPU_CATALOG).get("sd21-arch-random")
        side_px, sizes = 512, (1, 2, 4)
    assert variant is not None
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variant": {
            "name": variant.name,
            "steps": variant.steps,
            "guidance_scale": variant.guidance_scale,
            "dtype": variant.dtype,
            "size_px": side_px,
            "batch_sizes": list(sizes),
            "repeats": repeats,
        },
        "errors": [],
    }

    def fail(stage: str) -> None:
        report["errors"].append({"stage": stage, "error": traceback.format_exc(limit=8)})

    try:
        report["versions"] = _versions()
    except Exception:
        fail("versions")

    try:
        device_set = open_power_sources(source_mode)
        report["power_source"] = {"kind": device_set.kind, "reason": device_set.reason}
        report["devices"] = [_device_info(d) for d in device_set.devices]
    except Exception:
        fail("devices")
        return report

    try:
        started = time.monotonic()
        resolve_source(variant, models_dir)
        report["build_s"] = round(time.monotonic() - started, 2)
    except Exception:
        fail("build")
        return report

    agent = TelemetryAgent(open_power_sources(source_mode), sample_hz=10)
    agent.start()
    poller: PowerPoller | None = None
    runs: list[dict[str, Any]] = []
    try:
        # The agent samples its own devices; the poller reads the same device object
        # (one simulated device only exists once; NVML handles are thread-safe).
        inner = LocalMeter(agent, None)
        meter = WindowMeter(inner)
        started = time.monotonic()
        worker = VariantWorker(variant, str(models_dir), meter)
        report["load_s"] = round(time.monotonic() - started, 2)
        inner.device_uuid = _device_uuid(worker._device)
        try:
            index = agent.device_index(inner.device_uuid)
        except TelemetryError:  # torch's UUID not among NVML's: say so, measure device 0
            fail("device_uuid")
            inner.device_uuid, index = None, 0
        report["worker"] = {
            "torch_device": str(worker._device),
            "device_uuid": inner.device_uuid,
            "agent_device_index": index,
            "agent_device_id": agent.devices[index].uuid,
        }
        poller = PowerPoller(agent.devices[index], hz=100)
        poller.start()
        time.sleep(0.3)
        schedule = [(1, "warmup")] + [(s, f"r{r}") for r in range(repeats) for s in sizes]
        for number, (size, tag) in enumerate(schedule):
            items = tuple(
                WorkItem(PROMPTS[(number + i) % len(PROMPTS)], None, 1000 * number + i)
                for i in range(size)
            )
            batch_id = f"check-{number}-bs{size}-{tag}"
            plan = BatchPlan(batch_id, variant.name, side_px, side_px, items)
            out = worker.run(plan)
            time.sleep(0.25)  # let the poller take samples past the window's end
            window_start, window_end = meter.windows[batch_id]
            joules, samples = poller.integrate(window_start, window_end)
            window_s = window_end - window_start
            row = {
                "batch_id": batch_id,
                "batch_size": size,
                "warmup": tag == "warmup",
                "images": len(out.png_images),
                "busy_s": round(out.busy_s, 4),
                "window_s": round(window_s, 4),
                "agent_joules": round(out.joules, 3),
                "energy_source": out.energy_source,
                "integrated_joules": round(joules, 3),
                "power_samples_in_window": samples,
                "mean_power_w": round(joules / window_s, 1) if window_s > 0 else None,
            }
            runs.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    except Exception:
        fail("batches")
    finally:
        if poller is not None:
            poller.stop()
            report["poller"] = {"hz": 100, "read_errors": poller.errors}
        agent.stop()
        report["agent"] = {
            "sample_hz": agent.sample_hz,
            "sampling_cpu_pct": round(agent.sampling_cpu_pct, 3),
            "reconciliation": asdict(agent.reconciliation()),
        }
    report["batches"] = runs
    timed = [r for r in runs if not r["warmup"]]
    report["by_batch_size"] = _summary(timed) if timed else {}
    try:
        report["devices_after"] = [_device_info(d) for d in agent.devices]
    except Exception:
        fail("devices_after")
    if not cpu_smoke:
        report["pytest"] = _run_pytest()
    return report


def _table(report: dict[str, Any]) -> str:
    lines = ["bs  agent J/img  source         integ J/img  latency s  ratio"]
    for size, row in report.get("by_batch_size", {}).items():
        lines.append(
            f"{size:>2}  {row['agent_j_per_image']:>11.2f}  {','.join(row['energy_source']):<13}"
            f"  {row['integrated_j_per_image']:>11.2f}  {row['batch_latency_s']:>9.3f}"
            f"  {row['agent_over_integrated']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check, print and write the report; 0 when every stage worked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="simulated power, tiny model, no GPU needed"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size")
    parser.add_argument("--models-dir", type=Path, help="reuse built models (default: temp)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="wattserve-gpu-check-") as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        report = run_check(args.cpu_smoke, max(1, args.repeats), models_dir)

    document = json.dumps(report, indent=2)
    print(document, flush=True)
    print(_table(report), file=sys.stderr)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu-check.json").write_text(document + "\n", encoding="utf-8")
    pytest_rc = report.get("pytest", {}).get("returncode", 0)
    ok = not report["errors"] and pytest_rc == 0 and report.get("by_batch_size")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
