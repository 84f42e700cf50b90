"""The variant reconciler: makes the deployed variants match the control plane's.

It runs inside the cluster's control plane actor (``cluster.control``), polling the
variant table every ``POLL_S``:

* ``deploying`` → deploy the variant's application; ``active`` once it runs, ``failed``
  (with the reason) if it cannot start;
* ``retiring`` → once every scheduler replica has recorded that it has nothing queued
  or running on the variant (or ``DRAIN_TIMEOUT_S`` has passed), delete the application
  (Serve lets requests already on a worker finish) and mark it ``retired``.

Scheduler replicas stop routing to a retiring variant at their next refresh, before
the drain is even counted, so no new work can reach it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from ray import serve

from wattserve.cluster.app import worker_app
from wattserve.cluster.names import variant_app_name
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import VariantSpec
from wattserve.scheduler.control_store import ControlStore

log = structlog.get_logger(__name__)

POLL_S = 0.5
DRAIN_TIMEOUT_S = 120.0


def deploy_variants(specs: list[VariantSpec], settings: Settings) -> None:
    """Deploy several variants' applications at once and wait until all run."""
    if specs:
        targets = [
            serve.RunTarget(worker_app(s, settings), variant_app_name(s.name), route_prefix=None)
            for s in specs
        ]
        serve.run_many(targets)


class VariantReconciler:
    """A daemon thread that carries out variant lifecycle changes."""

    def __init__(
        self,
        control: ControlStore,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control = control
        self._settings = settings
        self._clock = clock
        self._retiring_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wattserve-variants", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for a step in progress to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.step()
            except Exception as exc:  # keep reconciling; the next poll retries
                log.warning("variant_reconcile_failed", error=repr(exc))

    def step(self) -> None:
        """One pass: deploy what is deploying, remove what has drained."""
        snapshot = self._control.snapshot()
        for spec, state in snapshot.variants:
            if state == "deploying":
                self._deploy(spec)
            elif state == "retiring":
                self._maybe_remove(spec.name)

    def _deploy(self, spec: VariantSpec) -> None:
        log.info("variant_deploying", variant=spec.name)
        try:
            deploy_variants([spec], self._settings)
        except Exception as exc:
            detail = f"deploy failed: {exc}"[:1000]
            self._control.set_variant_state(spec.name, "failed", detail)
            log.warning("variant_failed", variant=spec.name, error=repr(exc))
            try:
                serve.delete(variant_app_name(spec.name))
            except Exception:  # nothing deployed to clean up
                pass
            return
        self._control.set_variant_state(spec.name, "active")
        log.info("variant_active", variant=spec.name)

    def _maybe_remove(self, name: str) -> None:
        since = self._retiring_since.setdefault(name, self._clock())
        drained = self._control.drains(name) >= self._settings.scheduler_replicas
        timed_out = self._clock() - since >= DRAIN_TIMEOUT_S
        if not (drained or timed_out):
            return
        if timed_out and not drained:
            log.warning("variant_drain_timeout", variant=name, waited_s=DRAIN_TIMEOUT_S)
        serve.delete(variant_app_name(name))
        self._control.set_variant_state(name, "retired")
        self._retiring_since.pop(name, None)
        log.info("variant_retired", variant=name)
