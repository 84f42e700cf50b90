#!/usr/bin/env bash
# One short GPU check for a session that is lent a GPU machine (the `device` tool):
#   bash scripts/gpu_check.sh            # or: make gpu-check
# Prints the GPU and NVML readings, runs the gpu-marked tests, and measures each
# built-in variant's busy time on the GPU. Writes $OUT/gpu-check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { make install >/dev/null; }
nvidia-smi --query-gpu=name,power.draw,power.limit,memory.total --format=csv || true
$PY - <<'PY'
import json, os, pynvml
pynvml.nvmlInit()
out = []
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    try:
        energy_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except pynvml.NVMLError as exc:
        energy_mj = f"unsupported: {exc}"
    out.append({"index": i, "name": pynvml.nvmlDeviceGetName(h), "uuid": pynvml.nvmlDeviceGetUUID(h),
                "power_mw": pynvml.nvmlDeviceGetPowerUsage(h), "energy_mj": energy_mj,
                "limit_mw": pynvml.nvmlDeviceGetPowerManagementLimit(h)})
print(json.dumps(out, indent=2))
if os.environ.get("OUT"):
    open(os.path.join(os.environ["OUT"], "gpu-check.json"), "w").write(json.dumps(out, indent=2))
PY
.venv/bin/pytest -q -m gpu tests/test_gpu.py
