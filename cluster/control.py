"""The in-cluster control plane: everything the service needs at run time, owned by the cluster.

``ControlPlane`` is one named, detached actor (``CONTROL_NAME``), created get-if-exists by
whoever comes first — ``wattserve serve`` (embedded or ``--address``) or a scheduler
replica started by ``serve deploy`` / a KubeRay RayService, where no driver of ours lives.
Starting it is idempotent and does what used to happen in the CLI process:

* migrate the database and seed it from the settings where it is still empty;
* start (or find) the admission service, the coalescers and one telemetry agent per node
  — all named and detached, so they survive the driver that asked for them;
* deploy the active variants' Serve applications, then run the variant reconciler;
* watch for nodes that join later and start their agents (a worker replica placed there
  needs its node's agent before it can meter a batch);
* be the ledger's janitor: fail the pending rows of scheduler replicas that stopped
  heartbeating (``LedgerStore.fail_orphans``) and drop expired idempotency keys.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
import structlog

from wattserve._admin import PolicyUpdate
from wattserve.cluster.admission import start_admission
from wattserve.cluster.agents import start_agents
from wattserve.cluster.coalescers import start_coalescers
from wattserve.cluster.names import CONTROL_NAME, CONTROL_NAMESPACE
from wattserve.cluster.settings import Settings
from wattserve.cluster.variants import VariantReconciler, deploy_variants
from wattserve.policies.catalog import load_catalog
from wattserve.scheduler.control_store import ControlStore
from wattserve.scheduler.idempotency import IdempotencyStore
from wattserve.telemetry.ledger import HOLDER_STALE_AFTER_S, LedgerStore
from wattserve.telemetry.logs import configure_logging

log = structlog.get_logger(__name__)

NODE_WATCH_S = 1.0


def prepare_database(settings: Settings) -> ControlStore:
    """Migrate the database and seed it from the settings where it is still empty."""
    catalog = load_catalog(settings.catalog_path)
    ledger = LedgerStore(settings.db_url)  # migrates to the current schema
    control = ControlStore(ledger.engine)
    seeded = control.seed_variants(catalog)
    control.seed_budget(settings.power_cap_w, settings.joules_per_output_target)
    control.seed_policy(
        PolicyUpdate(cache_max_bytes=settings.cache_max_bytes, cache_ttl_s=settings.cache_ttl_s)
    )
    # Nothing is in flight across a restart: a variant that was draining is done.
    for name in control.snapshot().in_state("retiring"):
        control.set_variant_state(name, "retired")
    log.info("database_ready", seeded_variants=seeded)
    return control


@ray.remote(num_cpus=0, max_restarts=-1)
class ControlPlane:
    """Starts the cluster-side pieces once, then reconciles variants and watches nodes."""

    def __init__(self, settings: Settings) -> None:
        configure_logging(json=True)
        self._settings = settings
        self._control = prepare_database(settings)
        self._ledger = LedgerStore(settings.db_url)
        self._keys = IdempotencyStore(self._ledger.engine, CONTROL_NAME,
                                      stale_after_s=HOLDER_STALE_AFTER_S)  # fmt: skip
        self._admission = start_admission(settings.db_url, 1.0 / settings.sample_hz)
        self._coalescers = start_coalescers(settings.coalescers)
        self._agents = self._start_agents()
        snapshot = self._control.snapshot()
        deploy_variants(
            [spec for spec, state in snapshot.variants if state in ("active", "deploying")],
            settings,
        )
        for name in snapshot.in_state("deploying"):
            self._control.set_variant_state(name, "active")
        self._reconciler = VariantReconciler(self._control, settings)
        self._reconciler.start()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_nodes, daemon=True,
                                         name="wattserve-nodes")  # fmt: skip
        self._watcher.start()
        log.info("control_plane_ready", agents=len(self._agents))

    def _start_agents(self) -> list[Any]:
        s = self._settings
        return start_agents(s.power_source, s.sample_hz, s.sim_devices)

    def _watch_nodes(self) -> None:
        """Start an agent on every node that joins; sweep the ledger's orphans too.

        ``start_agents`` finds the agents that exist already.
        """
        known = len(self._agents)
        while not self._stop.wait(NODE_WATCH_S):
            self._sweep()
            try:
                alive = sum(1 for n in ray.nodes() if n.get("Alive"))
                if alive != known:
                    self._agents = self._start_agents()
                    known = len(self._agents)
                    log.info("agents_reconciled", agents=known)
            except Exception as exc:  # keep watching; the next pass retries
                log.warning("node_watch_failed", error=repr(exc))

    def _sweep(self) -> None:
        try:
            failed = self._ledger.fail_orphans(HOLDER_STALE_AFTER_S)
            purged = self._keys.purge_expired()
            if failed or purged:
                log.info("ledger_janitor", orphans_failed=failed, keys_expired=purged)
        except Exception as exc:  # the database may blip: the next pass retries
            log.warning("ledger_janitor_failed", error=repr(exc))

    def ready(self) -> dict[str, int]:
        """What is running: agents, coalescers (the constructor has finished by now)."""
        return {"agents": len(self._agents), "coalescers": len(self._coalescers)}

    def stop(self) -> None:
        """Stop reconciling and watching (before the actor is killed)."""
        self._stop.set()
        self._reconciler.stop()


def ensure_control_plane(settings: Settings) -> tuple[Any, bool]:
    """Start (or find) the control plane and wait until it is up; (handle, created here)."""
    try:
        handle = ray.get_actor(CONTROL_NAME, namespace=CONTROL_NAMESPACE)
        created = False
    except ValueError:
        handle = ControlPlane.options(
            name=CONTROL_NAME, namespace=CONTROL_NAMESPACE, lifetime="detached",
            get_if_exists=True,
        ).remote(settings)  # fmt: skip
        created = True
    ray.get(handle.ready.remote())
    return handle, created
