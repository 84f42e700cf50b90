import hashlib
import json

from wattserve.policies.plans import BatchPlan, WorkItem
from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
from wattserve.telemetry.devices import open_power_sources
from wattserve.workers.pipelines import resolve_source
from wattserve.workers.worker import VariantWorker


def meter():
    return LocalMeter(TelemetryAgent(open_power_sources("simulated")))


def digest(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def test_builtin_is_built_once_then_loaded_like_any_checkpoint(catalog, models_dir):
    turbo = catalog.get("tiny-sd-turbo")
    path = resolve_source(turbo, models_dir)
    index = json.loads((models_dir / "tiny-sd-turbo" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    mtime = (models_dir / "tiny-sd-turbo" / "model_index.json").stat().st_mtime_ns
    assert resolve_source(turbo, models_dir) == path
    assert (models_dir / "tiny-sd-turbo" / "model_index.json").stat().st_mtime_ns == mtime
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]  # no staging left


def test_same_seed_same_bytes_other_seed_other_bytes(catalog, models_dir):
    worker = VariantWorker(catalog.get("tiny-sd-turbo"), str(models_dir), meter())
    plan = BatchPlan(
        "b1",
        "tiny-sd-turbo",
        64,
        48,
        (WorkItem("a red cube", None, 7), WorkItem("a red cube", None, 8)),
    )
    first, again = worker.run(plan), worker.run(plan)
    assert [digest(p) for p in first.png_images] == [digest(p) for p in again.png_images]
    assert digest(first.png_images[0]) != digest(first.png_images[1])
    assert first.busy_s > 0 and first.png_images[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_refuses_another_variants_plan(catalog, models_dir):
    worker = VariantWorker(catalog.get("tiny-sd-turbo"), str(models_dir), meter())
    plan = BatchPlan("b", "tiny-sd-large", 64, 64, (WorkItem("x", None, 1),))
    try:
        worker.run(plan)
    except ValueError as exc:
        assert "tiny-sd-large" in str(exc)
    else:
        raise AssertionError("a misrouted plan must not run")
