"""Start and stop wattserve: on a Ray cluster it starts itself, or on one that already runs.

``LocalService`` without an address owns the Ray instance it starts (the embedded
default): ``stop()`` shuts down Serve and then Ray, which ends every process ``start()``
created. With ``address`` (``--address``, ``WATTSERVE_RAY_ADDRESS``; ``auto`` as Ray
means it) it attaches to a running cluster, deploys the service into it, and ``stop()``
removes only what it deployed: the Serve applications, and the control actors if it was
the one that started them. Everything the service needs at run time lives in the
cluster (``cluster.control``), so the driver can go away without taking it along.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import structlog

from wattserve import WattserveError
from wattserve.cluster.names import CONTROL_NAMESPACE
from wattserve.cluster.settings import Settings, ensure_admin_token
from wattserve.policies.catalog import Catalog, load_catalog


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

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 8000,
        address: str | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.address = address  # None: start (and own) a local Ray instance
        self.catalog: Catalog | None = None
        self.admin_token: str | None = None
        self._ray_started = False
        self._connected_here = True  # whether stop() disconnects this process from Ray
        self._created_control = False

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, ready_timeout_s: float = 600) -> str:
        """Start (or attach to) Ray, then Serve and the app; the URL once ``/healthz`` answers."""
        # Validate the catalog before anything heavy starts: a bad file fails in a second.
        self.catalog = load_catalog(self.settings.catalog_path)
        self.admin_token = ensure_admin_token(self.settings.home)
        for key, value in _PROCESS_ENV.items():
            os.environ.setdefault(key, value)
        from ray import serve

        from wattserve.cluster.app import ingress_app
        from wattserve.cluster.control import ensure_control_plane

        self._init_ray()
        serve.start(http_options={"host": self.host, "port": self.port})
        self._adopt_running_http_port()
        _, self._created_control = ensure_control_plane(self.settings)
        serve.run(ingress_app(self.settings, self.admin_token), name=APP_NAME, route_prefix="/")
        self._wait_ready(ready_timeout_s)
        log.info("service_ready", url=self.url, address=self.address or "local")
        return self.url

    def _adopt_running_http_port(self) -> None:
        """Attached to a cluster whose Serve already listens: its port is the service's."""
        from ray.serve.context import _get_global_client

        port = int(_get_global_client().http_config.port)
        if port != self.port:
            log.warning("serve_http_port_in_use", asked=self.port, serving=port)
            self.port = port

    def _init_ray(self) -> None:
        import ray

        self.settings.ray_tmpdir.mkdir(parents=True, exist_ok=True)
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigterm_handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
        if self.address is not None:
            self._connected_here = not ray.is_initialized()  # else: this process's driver
            if self._connected_here:
                ray.init(address=self.address, namespace=APP_NAME, log_to_driver=False,
                         configure_logging=False)  # fmt: skip
        else:
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
            # must get the chance to remove what it deployed, so restore ours.
            signal.signal(signal.SIGTERM, sigterm_handler)

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
        """Embedded: shut down Serve and Ray. Attached: remove only what this run deployed."""
        if not self._ray_started:
            return
        import ray
        from ray import serve

        try:
            if self.address is None:
                serve.shutdown()
            else:
                self._remove_deployed()
        finally:
            if self._connected_here:
                ray.shutdown()  # attached: disconnects this driver; the cluster keeps running
            self._ray_started = False
            log.info("service_stopped", address=self.address or "local")

    def _remove_deployed(self) -> None:
        """Delete this service's Serve apps; its control actors too if it started them."""
        import ray
        from ray import serve

        from wattserve.cluster.names import CONTROL_NAME, VARIANT_APP_PREFIX, control_actor_names

        if self._created_control:
            control = ray.get_actor(CONTROL_NAME, namespace=CONTROL_NAMESPACE)
            ray.get(control.stop.remote())
        for name in serve.status().applications:
            if name == APP_NAME or name.startswith(VARIANT_APP_PREFIX):
                serve.delete(name)
        if self._created_control:
            for name in control_actor_names():
                try:
                    ray.kill(ray.get_actor(name, namespace=CONTROL_NAMESPACE), no_restart=True)
                except ValueError:
                    pass  # already gone

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
