"""Start and stop wattserve on a local Ray cluster: the embedded default deployment.

``LocalService`` owns the Ray instance it starts: ``stop()`` shuts down Serve and then
Ray, which ends every process ``start()`` created.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import httpx
import structlog

from cluster.settings import Settings
from policies.catalog import Catalog, load_catalog
from wattserve import WattserveError


class SettingsError(WattserveError):
    """The settings contradict each other; the message says how."""


log = structlog.get_logger(__name__)

APP_NAME = "wattserve"

# Set before Ray starts so that every process it spawns inherits them: no token auth
# file in ~/.ray, no usage-stats upload, and Hugging Face never reaches for the network.
_PROCESS_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalService:
    """wattserve on a Ray cluster started (and owned) by this process."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.catalog: Catalog | None = None
        self._ray_started = False
        self._actors: list[Any] = []

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, ready_timeout_s: float = 600) -> str:
        """Start Ray, Serve and the app; return the URL once ``/healthz`` answers."""
        # Validate the catalog before anything heavy starts: a bad file fails in a second.
        self.catalog = load_catalog(self.settings.catalog_path)
        if self.settings.power_cap_w is not None and self.settings.scheduler_replicas > 1:
            raise SettingsError(
                "WATTSERVE_POWER_CAP_W needs a single scheduler replica: each replica admits "
                "against the same measured power, so several could overshoot the cap together"
            )
        for key, value in _PROCESS_ENV.items():
            os.environ.setdefault(key, value)
        import ray
        from ray import serve

        from cluster.agents import start_agents
        from cluster.app import build_app
        from cluster.coalescers import start_coalescers

        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.ray_tmpdir.mkdir(parents=True, exist_ok=True)
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigterm_handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            _temp_dir=str(self.settings.ray_tmpdir),
            namespace=APP_NAME,
            log_to_driver=False,
            configure_logging=False,
        )
        self._ray_started = True
        if in_main_thread:
            # ray.init replaces SIGTERM with a handler that aborts the driver; this process
            # owns the cluster and must get the chance to stop it cleanly, so restore ours.
            signal.signal(signal.SIGTERM, sigterm_handler)
        # Keep the handles: a non-detached actor dies when its last handle goes away.
        self._actors = start_agents(
            self.settings.power_source, self.settings.sample_hz, self.settings.sim_devices
        ) + start_coalescers(self.settings.coalescers)
        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(build_app(self.catalog, self.settings), name=APP_NAME, route_prefix="/")
        self._wait_ready(ready_timeout_s)
        log.info("service_ready", url=self.url, variants=self.catalog.names)
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
                last_error = "healthz not ready"
            except httpx.HTTPError as exc:
                last_error = str(exc)
            time.sleep(0.5)
        raise TimeoutError(f"wattserve at {self.url} not ready after {timeout_s}s: {last_error}")

    def stop(self) -> None:
        """Shut down Serve and the Ray processes this service started."""
        if not self._ray_started:
            return
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            self._actors = []
            ray.shutdown()
            self._ray_started = False
            log.info("service_stopped")

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
