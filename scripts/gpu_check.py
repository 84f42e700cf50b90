r"""One prepared GPU check: NVML readings, SD 2.1-sized batches, two energy methods.

What it does, in one run (expected 4-6 minutes on an H100/H200 with the step sweep,
2-4 without it; none of it timed there yet; it must stay under 8):

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
5. the step sweep (``step_sweep`` in the report; ``--no-step-sweep`` skips it): J/image
   at batch 1 at 1, 2, 4, 8 and 25 denoising steps (``--sweep-steps``), one warm-up at
   the variant's own steps, then ``--sweep-repeats`` (3) interleaved rounds, for
   (a) the SD 2.1 worker above, 512x512, guidance 7.5, and (b) a random-weight SDXL
   base 1.0 architecture (``SDXL_LAYOUTS["sdxl"]``: 2.57 B UNet, 0.12 B + 0.69 B text
   encoders, 84 M VAE; ``StableDiffusionXLPipeline``, which ``workers.pipelines`` cannot
   build) created on the GPU, saved in float16, loaded by its own ``VariantWorker``,
   1024x1024, guidance 5.0, default 25 steps (as ``sdxl-h100`` in
   ``policies/real_catalog.toml``). Each figure is labelled: the agent's
   ``energy_source`` (``nvml-counter``) and the poller's ``nvml-power``. Fitted by least
   squares (``bench.step_energy.fit_step_energy``): ``J(steps) = fixed_j + per_step_j *
   steps``, with R² and ``fixed_fraction_at_default = fixed_j / J(default steps)``, the
   number ``bench.profiles`` assumes to be 0; latency gets the same line. The SDXL part
   starts only while ``SDXL_RESERVE_S`` (180 s) of ``--time-budget-s`` (480 s) remain,
   else it is listed under ``skipped``;
6. runs ``pytest -q -m gpu tests/test_gpu.py`` and records its exit code and summary.

Everything is printed as one JSON document on stdout (logs go to stderr) and, when
``OUT`` is set, also written to ``$OUT/gpu-check.json``: after every stage with
``"complete": false`` (a run cut short still leaves its numbers), and at the end with
``"complete": true``. The exit code is 0 only when every stage worked (the pytest exit
code included).

``--cpu-smoke`` runs the same code path without a GPU: simulated power source, the
tiny built-in variant ``tiny-sd-turbo``, 64x64, batch sizes 1 and 2, no pytest; its
step sweep runs 1, 2 and 4 steps on ``tiny-sd-turbo`` and on a toy SDXL layout
(``SDXL_LAYOUTS["tiny"]``), labelled ``simulated`` (power x busy time, not energy).
That is what ``tests/test_gpu_check.py`` runs.

The code is in three files in this folder: this entry point (arguments, the order of the
stages, the report), ``_gpu_stages.py`` (power poller, meter, devices, batches, pytest)
and ``_gpu_sweep.py`` (the step sweep and the random SDXL builder). The script's own
folder is ``sys.path[0]`` when it runs as ``python3 scripts/gpu_check.py``, so the two
import without an installed package; they are copied to the device with the checkout.

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

``$OUT/gpu-check.json`` comes back. Nothing installs wattserve there: the script adds
the checkout's root to ``wattserve.__path__`` (``_use_checkout_packages``) so that
``wattserve.policies``, ``wattserve.bench``, ... resolve to the folders as an editable
install maps them, and runs the pytest stage the same way.
With the sweep the run is expected to take 4-6 minutes; ``--no-step-sweep`` or
``--sweep-archs sd21`` shorten it. Limits to know: the session has 15 minutes of
device time in all (the machine's start counts), so run this once, prepared; the image's
transformers (5.17 when last listed) is older than ours (5.24) and diffusers' own
requirements (huggingface-hub>=1.32) are only listed as met there, not checked; ``ray``
is not on the image (carrying it and its dependencies was not tried), so the
``tests/test_gpu.py`` case that builds a ``VariantWorker`` without a meter (it then
looks up a Ray telemetry agent) is expected to fail there; this script gives its worker
a ``LocalMeter`` and never imports Ray (``cuda_device_uuid`` is recomputed in
``_gpu_stages`` if ``workers.meter`` cannot be imported). ``make gpu-check`` runs this script with
``.venv/bin/python`` for a machine where the project's own venv has a CUDA torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _gpu_stages as stages  # this script's folder, sys.path[0] when it runs
from _gpu_sweep import CPU_SWEEP_STEPS, GPU_SWEEP_STEPS, SDXL_RESERVE_S, SWEEP_ARCHS, sweep_stage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing wattserve
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _use_checkout_packages() -> None:
    """Make ``wattserve.<folder>`` importable from a checkout that is not installed.

    The folders install as ``wattserve.policies``, ``wattserve.bench``, ... (pyproject's
    package-dir). An editable install maps them; the bare GPU image has none, so the
    repository root joins ``wattserve.__path__`` and ``wattserve.policies`` resolves to
    ``REPO/policies``. A no-op where the mapping already works.
    """
    import importlib.util

    import wattserve

    if importlib.util.find_spec("wattserve.policies") is None:
        wattserve.__path__.append(str(REPO))


GPU_CATALOG = REPO / "scripts" / "gpu_catalog.toml"


def _sweep_options(cpu_smoke: bool, args: argparse.Namespace) -> dict[str, Any] | None:
    """The step sweep's settings from the command line (None: no sweep)."""
    if args.no_step_sweep:
        return None
    if args.sweep_steps:
        try:
            steps = tuple(sorted({int(s) for s in args.sweep_steps.split(",") if s.strip()}))
        except ValueError:
            raise SystemExit(f"--sweep-steps takes integers: {args.sweep_steps!r}") from None
    else:
        steps = CPU_SWEEP_STEPS if cpu_smoke else GPU_SWEEP_STEPS
    archs = tuple(a.strip() for a in args.sweep_archs.split(",") if a.strip())
    unknown = sorted(set(archs) - set(SWEEP_ARCHS))
    if unknown or not archs:
        raise SystemExit(f"--sweep-archs takes {','.join(SWEEP_ARCHS)}; got {args.sweep_archs!r}")
    if len(steps) < 2 or steps[0] < 1:
        raise SystemExit(f"--sweep-steps needs 2 or more step counts >= 1; got {steps}")
    return {"steps": steps, "archs": archs, "repeats": max(1, args.sweep_repeats)}


def _mode(cpu_smoke: bool) -> tuple[str, Any, int, tuple[int, ...], int]:
    """(power source mode, variant, side px, batch sizes, SDXL side px) of the run."""
    from wattserve.policies.catalog import load_catalog

    if cpu_smoke:
        source_mode, variant = "simulated", load_catalog().get("tiny-sd-turbo")
        side_px, sizes, sdxl_px = 64, (1, 2), 64
    else:
        source_mode, variant = "nvml", load_catalog(GPU_CATALOG).get("sd21-arch-random")
        side_px, sizes, sdxl_px = 512, (1, 2, 4), 1024
    assert variant is not None
    return source_mode, variant, side_px, sizes, sdxl_px


def _new_report(
    cpu_smoke: bool, variant: Any, side_px: int, sizes: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    """The report before any stage has run."""
    return {
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "complete": False,
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


def run_check(
    cpu_smoke: bool,
    repeats: int,
    models_dir: Path,
    sweep: dict[str, Any] | None = None,
    time_budget_s: float = 480.0,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """Every stage of the check; failures are recorded in ``errors`` and later stages go on.

    ``checkpoint(report)``, when given, is called after each stage with the report so
    far (``main`` writes it to ``$OUT`` so a run cut short still returns its numbers).
    """
    _use_checkout_packages()
    import structlog

    from wattserve.telemetry.agent import TelemetryAgent
    from wattserve.telemetry.devices import open_power_sources

    # Logs to stderr so stdout is the one JSON document (configure_logging keeps this).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    check_started = time.monotonic()
    source_mode, variant, side_px, sizes, sdxl_px = _mode(cpu_smoke)
    rec = stages.Recorder(_new_report(cpu_smoke, variant, side_px, sizes, repeats), checkpoint)
    report = rec.report
    try:
        report["versions"] = stages.versions()
    except Exception:
        rec.fail("versions")
    device_set = stages.open_devices(rec, source_mode)
    if device_set is None or not stages.build_variant(rec, variant, models_dir):
        return report
    rec.save()
    # what the poller's integrated figures are: NVML power readings, or the simulation
    power_label = "nvml-power" if device_set.kind == "nvml" else "simulated"

    agent = TelemetryAgent(open_power_sources(source_mode), sample_hz=10)
    agent.start()
    poller: stages.PowerPoller | None = None
    runs: list[dict[str, Any]] = []
    report["batches"] = runs
    try:
        worker, meter, index = stages.start_worker(rec, agent, variant, models_dir)
        poller = stages.PowerPoller(agent.devices[index], hz=100)
        poller.start()
        time.sleep(0.3)
        probe = stages.Probe(meter, poller, power_label)
        stages.batch_stage(worker, variant, probe, side_px, sizes, repeats, runs)
        report["by_batch_size"] = stages.timed_summary(runs)
        rec.save()
        if sweep is not None:
            sweep_stage(
                rec, sweep, cpu_smoke=cpu_smoke, models_dir=models_dir, worker=worker,
                variant=variant, probe=probe, sizes_px=(side_px, sdxl_px),
                power_kind=device_set.kind, time_budget_s=time_budget_s,
                check_started=check_started,
            )  # fmt: skip
    except Exception:
        rec.fail("batches")
    finally:
        stages.stop_measuring(report, agent, poller)
    if "by_batch_size" not in report:  # the batch stage failed part-way: what it measured
        report["by_batch_size"] = stages.timed_summary(runs)
    _finish(rec, agent, cpu_smoke, check_started)
    return report


def _finish(rec: stages.Recorder, agent: Any, cpu_smoke: bool, check_started: float) -> None:
    """The devices after the runs, the pytest stage (GPU only), elapsed time, complete."""
    report = rec.report
    try:
        report["devices_after"] = [stages.device_info(d) for d in agent.devices]
    except Exception:
        rec.fail("devices_after")
    rec.save()
    if not cpu_smoke:
        report["pytest"] = stages.run_pytest()
    report["elapsed_s"] = round(time.monotonic() - check_started, 1)
    report["complete"] = True


def _table(report: dict[str, Any]) -> str:
    """The batch and sweep figures as a text table (for stderr)."""
    lines = ["bs  agent J/img  source         integ J/img  latency s  ratio"]
    for size, row in report.get("by_batch_size", {}).items():
        lines.append(
            f"{size:>2}  {row['agent_j_per_image']:>11.2f}  {','.join(row['energy_source']):<13}"
            f"  {row['integrated_j_per_image']:>11.2f}  {row['batch_latency_s']:>9.3f}"
            f"  {row['agent_over_integrated']}"
        )
    archs = report.get("step_sweep", {}).get("architectures", {})
    if archs:
        lines.append("sweep  variant                 fit         source         fixed J"
                     "  J/step     R2      fixed_fraction@default")  # fmt: skip
    for arch, result in archs.items():
        for key in ("agent", "integrated") if "fits" in result else ():
            fit = result["fits"][key]
            source = ",".join(fit["energy_source"])
            if "error" in fit:
                lines.append(f"{arch:<5}  {result['variant']:<22}  {key:<10}  {source:<13}  "
                             f"{fit['error']}")  # fmt: skip
                continue
            r2 = "n/a" if fit["r_squared"] is None else f"{fit['r_squared']:.4f}"
            fraction = fit["fixed_fraction_at_default"]
            lines.append(
                f"{arch:<5}  {result['variant']:<22}  {key:<10}  {source:<13}  "
                f"{fit['fixed_j']:>7.2f}  {fit['per_step_j']:>7.3f}  {r2:>6}  "
                f"{'n/a' if fraction is None else f'{fraction:.4f}'} "
                f"(at {result['default_steps']} steps)"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="simulated power, tiny model, no GPU needed"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size")
    parser.add_argument("--models-dir", type=Path, help="reuse built models (default: temp)")
    parser.add_argument(
        "--no-step-sweep", action="store_true", help="skip the fixed vs per-step sweep"
    )
    parser.add_argument(
        "--sweep-steps",
        help=f"comma-separated step counts (default {','.join(map(str, GPU_SWEEP_STEPS))}; "
        f"--cpu-smoke: {','.join(map(str, CPU_SWEEP_STEPS))})",
    )
    parser.add_argument(
        "--sweep-archs", default=",".join(SWEEP_ARCHS), help="which architectures to sweep"
    )
    parser.add_argument(
        "--sweep-repeats", type=int, default=3, help="timed runs per step count (after 1 warm-up)"
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=480.0,
        help=f"the SDXL sweep starts only with {SDXL_RESERVE_S:.0f} s of this left",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the check, print and write the report; 0 when every stage worked."""
    args = _parser().parse_args(argv)
    sweep = _sweep_options(args.cpu_smoke, args)
    out_dir = os.environ.get("OUT")

    def checkpoint(report: dict[str, Any]) -> None:
        if out_dir:  # the report so far ("complete": false), replaced at the end
            text = json.dumps(report, indent=2) + "\n"
            Path(out_dir, "gpu-check.json").write_text(text, encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="wattserve-gpu-check-") as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        report = run_check(
            args.cpu_smoke, max(1, args.repeats), models_dir, sweep, args.time_budget_s, checkpoint
        )

    document = json.dumps(report, indent=2)
    print(document, flush=True)
    print(_table(report), file=sys.stderr)
    if out_dir:
        Path(out_dir, "gpu-check.json").write_text(document + "\n", encoding="utf-8")
    pytest_rc = report.get("pytest", {}).get("returncode", 0)
    ok = not report["errors"] and pytest_rc == 0 and report.get("by_batch_size")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
