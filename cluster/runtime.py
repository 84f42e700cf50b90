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
from wattserve.cluster.settings import Settings, ensure_admin_token
from wattserve.policies.catalog import Catalog, load_catalog

from wattserve import WattserveError
from wattserve._admin import PolicyUpdate


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
        self.admin_token: str | None = None
        self._ray_started = False
        self._actors: list[Any] = []
        self._reconciler: Any = None

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
        self.admin_token = ensure_admin_token(self.settings.home)
        for key, value in _PROCESS_ENV.items():
            os.environ.setdefault(key, value)
        import ray
        from ray import serve
        from wattserve.cluster.agents import start_agents
        from wattserve.cluster.app import ingress_app
        from wattserve.cluster.coalescers import start_coalescers
        from wattserve.cluster.variants import VariantReconciler, deploy_variants

        control = self._prepare_database()
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
        snapshot = control.snapshot()
        deploy_variants(
            [spec for spec, state in snapshot.variants if state in ("active", "deploying")],
            self.settings,
        )
        for name in snapshot.in_state("deploying"):
            control.set_variant_state(name, "active")
        serve.run(ingress_app(self.settings, self.admin_token), name=APP_NAME, route_prefix="/")
        self._reconciler = VariantReconciler(control, self.settings)
        self._reconciler.start()
        self._wait_ready(ready_timeout_s)
        log.info("service_ready", url=self.url, variants=control.snapshot().catalog().names)
        return self.url

    def _prepare_database(self) -> Any:
        """Migrate the database and seed it from the settings where it is still empty."""
        from wattserve.scheduler.control_store import ControlStore
        from wattserve.telemetry.ledger import LedgerStore

        assert self.catalog is not None
        ledger = LedgerStore(self.settings.db_url)  # migrates to the current schema
        control = ControlStore(ledger.engine)
        seeded = control.seed_variants(self.catalog)
        control.seed_budget(self.settings.power_cap_w, self.settings.joules_per_output_target)
        control.seed_policy(
            PolicyUpdate(
                cache_max_bytes=self.settings.cache_max_bytes,
                cache_ttl_s=self.settings.cache_ttl_s,
            )
        )
        # Nothing is in flight across a restart: a variant that was draining is done.
        for name in control.snapshot().in_state("retiring"):
            control.set_variant_state(name, "retired")
        log.info("database_ready", seeded_variants=seeded)
        return control

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
            if self._reconciler is not None:
                self._reconciler.stop()
                self._reconciler = None
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
