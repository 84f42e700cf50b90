"""GPU path checks: skipped without an NVIDIA GPU; run by scripts/gpu_check.sh on one."""

import hashlib

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_nvml_sees_the_device_and_its_energy_counter_advances():
    import time

    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        first_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        time.sleep(0.5)
        assert pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) >= first_mj
        assert pynvml.nvmlDeviceGetPowerUsage(handle) > 0
    finally:
        pynvml.nvmlShutdown()


def test_builtin_variant_runs_on_cuda_and_is_reproducible(catalog, models_dir):
    from policies.plans import BatchPlan, WorkItem
    from workers.worker import VariantWorker

    spec = catalog.get("tiny-sd-medium")
    gpu_resources = spec.resources.model_copy(update={"num_gpus": 1})
    on_gpu = spec.model_copy(update={"resources": gpu_resources})
    worker = VariantWorker(on_gpu, str(models_dir))
    assert worker._device.type == "cuda"
    plan = BatchPlan("b", spec.name, 64, 64, (WorkItem("a red cube", None, 7),))
    digests = {hashlib.sha256(worker.run(plan).png_images[0]).hexdigest() for _ in range(2)}
    assert len(digests) == 1
