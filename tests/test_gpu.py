"""GPU path checks: skipped without an NVIDIA GPU; run by scripts/gpu_check.py on one."""

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
    from wattserve.policies.plans import BatchPlan, WorkItem
    from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
    from wattserve.telemetry.devices import open_power_sources
    from wattserve.workers.meter import cuda_device_uuid
    from wattserve.workers.worker import VariantWorker

    spec = catalog.get("tiny-sd-medium")
    gpu_resources = spec.resources.model_copy(update={"num_gpus": 1})
    on_gpu = spec.model_copy(update={"resources": gpu_resources})
    agent = TelemetryAgent(open_power_sources("nvml"))
    meter = LocalMeter(agent, cuda_device_uuid(torch.device("cuda:0")))
    worker = VariantWorker(on_gpu, str(models_dir), meter)
    assert worker._device.type == "cuda"
    plan = BatchPlan("b", spec.name, 64, 64, (WorkItem("a red cube", None, 7),))
    outputs = [worker.run(plan) for _ in range(2)]
    assert len({hashlib.sha256(o.png_images[0]).hexdigest() for o in outputs}) == 1
    assert all(o.energy_source.startswith("nvml") and o.joules > 0 for o in outputs)
