"""`serve deploy deploy/serve-config.yaml` for real, on a local cluster with its dashboard.

    python scripts/serve_deploy_check.py

Starts a one-node Ray cluster (dashboard on: ``serve deploy`` talks to it), runs the
``serve deploy`` CLI on the checked-in config (its args pointed at a temporary state dir,
simulated power, one scheduler replica), waits for ``/healthz`` to list the variants,
sends one generation, prints what it saw, and stops exactly the cluster it started.
The test suite covers the same path through Serve's controller without the dashboard.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from ray.cluster_utils import Cluster

from wattserve.cluster.runtime import _PROCESS_ENV, free_port

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve-config.yaml"

root = Path(tempfile.mkdtemp(prefix="wsd", dir="/tmp"))
os.environ.update({**_PROCESS_ENV, "RAY_TMPDIR": str(root)})
dash = free_port()
cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": 2,
        "include_dashboard": True,
        "dashboard_port": dash,
        "temp_dir": str(root / "ray"),
    },
)
try:
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    app = config["applications"][0]
    app["args"] = {
        **app["args"],
        "home": str(root / "home"),
        "scheduler_replicas": 1,
        "power_source": "simulated",
        "sim_devices": 1,
    }
    config["http_options"]["port"] = port
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable.replace("python", "serve"),
            "deploy",
            "-a",
            f"http://127.0.0.1:{dash}",
            str(cfg),
        ],
        capture_output=True,
        text=True,
    )
    print("serve deploy rc", out.returncode, out.stdout[-300:], out.stderr[-500:])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200 and r.json()["variants"]:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    print("healthz", r.status_code, r.json(), f"after {time.monotonic() - t0:.1f}s")
    g = httpx.post(
        f"{url}/v1/images/generations",
        json={"prompt": "deployed", "size": "64x64", "seed": 5, "quality": "draft"},
        timeout=120,
    )
    print("generation", g.status_code, json.dumps(g.json()["wattserve"]["receipts"][0])[:300])
finally:
    cluster.shutdown()
