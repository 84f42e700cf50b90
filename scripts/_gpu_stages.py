"""The measuring parts of ``scripts/gpu_check.py``: power poller, meter, batch stage, pytest.

Imported by the script from its own folder (``sys.path[0]`` when run as
``python3 scripts/gpu_check.py``). Only the standard library is imported at module level;
``wattserve`` is imported inside the functions, after ``gpu_check._use_checkout_packages``
has mapped the checkout (a bare GPU image does not install the package).
"""

from __future__ import annotations

import bisect
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red cube on a glass table, studio light",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, top view, photograph",
)


@dataclass
class Recorder:
    """The report being built, with the stage-failure and checkpoint hooks around it."""

    report: dict[str, Any]
    checkpoint: Callable[[dict[str, Any]], None] | None = None

    def fail(self, stage: str) -> None:
        """Record the exception being handled as ``stage``'s error."""
        self.report["errors"].append({"stage": stage, "error": traceback.format_exc(limit=8)})

    def save(self) -> None:
        """Hand the report so far to the checkpoint, when there is one."""
        if self.checkpoint is not None:
            self.checkpoint(self.report)


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


@dataclass
class Probe:
    """Both energy readings of a batch: the meter's (agent's) and the poller's integral."""

    meter: WindowMeter
    poller: PowerPoller
    power_label: str  # what the poller's figures are: "nvml-power" or "simulated"

    def measure(self, worker: Any, plan: Any) -> dict[str, Any]:
        """Run one plan through the worker; the agent's joules and the poller's, labelled."""
        out = worker.run(plan)
        time.sleep(0.25)  # let the poller take samples past the window's end
        window_start, window_end = self.meter.windows[plan.batch_id]
        joules, samples = self.poller.integrate(window_start, window_end)
        window_s = window_end - window_start
        return {
            "batch_id": plan.batch_id,
            "batch_size": len(plan.items),
            "images": len(out.png_images),
            "busy_s": round(out.busy_s, 4),
            "window_s": round(window_s, 4),
            "agent_joules": round(out.joules, 3),
            "energy_source": out.energy_source,
            "integrated_joules": round(joules, 3),
            "integrated_source": self.power_label,
            "power_samples_in_window": samples,
            "mean_power_w": round(joules / window_s, 1) if window_s > 0 else None,
        }


def device_info(device: Any) -> dict[str, Any]:
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


def versions() -> dict[str, Any]:
    """Python, torch, diffusers and transformers versions; the CUDA device when there is one."""
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


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
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


def timed_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary`` of the runs that are not warm-ups ({} when there are none)."""
    timed = [r for r in runs if not r["warmup"]]
    return summary(timed) if timed else {}


def open_devices(rec: Recorder, source_mode: str) -> Any:
    """Open the power source and list its devices into the report (None: it failed)."""
    from wattserve.telemetry.devices import open_power_sources

    try:
        device_set = open_power_sources(source_mode)
        rec.report["power_source"] = {"kind": device_set.kind, "reason": device_set.reason}
        rec.report["devices"] = [device_info(d) for d in device_set.devices]
    except Exception:
        rec.fail("devices")
        return None
    return device_set


def build_variant(rec: Recorder, variant: Any, models_dir: Path) -> bool:
    """Build (or find) the variant's weights under ``models_dir``; False when it failed."""
    from wattserve.workers.pipelines import resolve_source

    try:
        started = time.monotonic()
        resolve_source(variant, models_dir)
        rec.report["build_s"] = round(time.monotonic() - started, 2)
    except Exception:
        rec.fail("build")
        return False
    return True


def start_worker(
    rec: Recorder, agent: Any, variant: Any, models_dir: Path
) -> tuple[Any, WindowMeter, int]:
    """Load the variant's worker metered by the agent: (worker, meter, agent device index).

    The agent samples its own devices; the poller (started by the caller) reads the same
    device object (one simulated device only exists once; NVML handles are thread-safe).
    """
    from wattserve.telemetry.agent import LocalMeter
    from wattserve.telemetry.devices import TelemetryError
    from wattserve.workers.worker import VariantWorker

    inner = LocalMeter(agent, None)
    meter = WindowMeter(inner)
    started = time.monotonic()
    worker = VariantWorker(variant, str(models_dir), meter)
    rec.report["load_s"] = round(time.monotonic() - started, 2)
    inner.device_uuid = _device_uuid(worker._device)
    try:
        index = agent.device_index(inner.device_uuid)
    except TelemetryError:  # torch's UUID not among NVML's: say so, measure device 0
        rec.fail("device_uuid")
        inner.device_uuid, index = None, 0
    rec.report["worker"] = {
        "torch_device": str(worker._device),
        "device_uuid": inner.device_uuid,
        "agent_device_index": index,
        "agent_device_id": agent.devices[index].uuid,
    }
    return worker, meter, index


def batch_stage(
    worker: Any,
    variant: Any,
    probe: Probe,
    side_px: int,
    sizes: tuple[int, ...],
    repeats: int,
    runs: list[dict[str, Any]],
) -> None:
    """One warm-up batch of 1, then each batch size ``repeats`` times; rows into ``runs``."""
    from wattserve.policies.plans import BatchPlan, WorkItem

    schedule = [(1, "warmup")] + [(s, f"r{r}") for r in range(repeats) for s in sizes]
    for number, (size, tag) in enumerate(schedule):
        items = tuple(
            WorkItem(PROMPTS[(number + i) % len(PROMPTS)], None, 1000 * number + i)
            for i in range(size)
        )
        batch_id = f"check-{number}-bs{size}-{tag}"
        plan = BatchPlan(batch_id, variant.name, side_px, side_px, items)
        row = probe.measure(worker, plan)
        row["warmup"] = tag == "warmup"
        runs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def stop_measuring(report: dict[str, Any], agent: Any, poller: PowerPoller | None) -> None:
    """Stop the poller (when started) and the agent; record what each did."""
    if poller is not None:
        poller.stop()
        report["poller"] = {"hz": 100, "read_errors": poller.errors}
    agent.stop()
    report["agent"] = {
        "sample_hz": agent.sample_hz,
        "sampling_cpu_pct": round(agent.sampling_cpu_pct, 3),
        "reconciliation": asdict(agent.reconciliation()),
    }


# ``python -m pytest`` with ``_use_checkout_packages`` first (conftest imports
# wattserve.policies, which an uninstalled checkout does not map by itself)
_PYTEST_BOOT = (
    "import sys; sys.path.insert(0, {repo!r}); import importlib.util, wattserve; "
    "importlib.util.find_spec('wattserve.policies') or wattserve.__path__.append({repo!r}); "
    "import pytest; sys.exit(pytest.main(['-q', '-m', 'gpu', 'tests/test_gpu.py']))"
)


def run_pytest() -> dict[str, Any]:
    """``pytest -q -m gpu tests/test_gpu.py`` in a subprocess: exit code, summary, tail."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PYTEST_BOOT.format(repo=str(REPO))],
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
