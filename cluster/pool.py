"""The scheduler's worker pool over Ray Serve: one application per variant, placement-aware.

Serve does not fail a call whose deployment no alive node can host: the call waits in
Serve's queue until a node of the right type joins (``../shared/RAY-FACTS.md``). A
batch must not wait for that, and routing should not pick such a variant at all, so the
pool watches which alive nodes each variant can be placed on (``variant_nodes``, the
admission service's rule) and

* leaves unplaceable variants out of ``available()``: routing then takes the next
  cheapest capable variant, or answers 503 ``unavailable`` for a named one;
* fails a call in flight with ``NoPlacement`` (503, Retry-After) within about
  ``PLACEMENT_CHECK_S`` of its variant's last node leaving, and cancels the Serve
  request so it cannot run later, for nobody, when a node joins.
"""

from __future__ import annotations

import asyncio

import ray
import structlog
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from wattserve.cluster.admission import variant_nodes
from wattserve.cluster.names import WORKER_DEPLOYMENT, variant_app_name
from wattserve.policies.catalog import Catalog
from wattserve.policies.plans import BatchOutput, BatchPlan
from wattserve.scheduler.batcher import NO_REPLICA_RETRY_AFTER_S, NoPlacement, WorkerDied

log = structlog.get_logger(__name__)

PLACEMENT_CHECK_S = 0.5  # how often a call in flight looks whether its variant lost its nodes


class ServeWorkerPool:
    """``WorkerPool`` over the Serve application of each routable variant."""

    def __init__(self) -> None:
        self._handles: dict[str, DeploymentHandle] = {}
        self._routable: frozenset[str] = frozenset()
        self._catalog: Catalog | None = None
        self._placed: dict[str, frozenset[str]] | None = None  # None: not looked yet

    def set_variants(self, catalog: Catalog) -> None:
        """Route to exactly ``catalog``'s variants from now on (blocking: handle lookups)."""
        for name in catalog.names:
            if name not in self._handles:
                self._handles[name] = serve.get_deployment_handle(
                    WORKER_DEPLOYMENT, app_name=variant_app_name(name)
                )
        self._catalog = catalog
        self._routable = frozenset(catalog.names)
        self.watch_nodes()

    def watch_nodes(self) -> None:
        """Look again which alive nodes can host each variant (blocking: a GCS call)."""
        if self._catalog is None:
            return
        placed = variant_nodes(self._catalog, ray.nodes())
        lost = sorted(n for n, ids in placed.items() if not ids and self._placeable(n))
        if lost:
            log.warning("variants_without_nodes", variants=lost)
        self._placed = placed

    def _placeable(self, name: str) -> bool:
        return self._placed is None or bool(self._placed.get(name, True))

    def available(self) -> frozenset[str]:
        """Variants routing may choose: routable and hostable by an alive node now.

        Serve itself routes around unhealthy replicas of a variant.
        """
        return frozenset(n for n in self._routable if self._placeable(n))

    async def run(self, plan: BatchPlan) -> BatchOutput:
        """Run ``plan`` on a replica of its variant, waiting in Serve's queue if all are busy.

        A retiring variant is no longer available but keeps its handle, so work already
        queued for it still runs: that is the drain.
        """
        self._check_placeable(plan)
        response = self._handles[plan.variant].run.remote(plan)
        call = asyncio.ensure_future(_result(response))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=PLACEMENT_CHECK_S)
                if done:
                    return call.result()
                self._check_placeable(plan)
        except RayActorError as exc:  # the replica's process is gone (killed, OOM, node lost)
            raise WorkerDied(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        except BaseException:  # no placement, the batch's deadline, a shutdown
            if not call.done():  # else Serve may run it when a replica comes up, for nobody
                response.cancel()
                call.cancel()
            raise

    def _check_placeable(self, plan: BatchPlan) -> None:
        if not self._placeable(plan.variant):
            raise NoPlacement(
                f"no alive node can host {plan.variant} (batch {plan.batch_id}); "
                "it is served again once a node of its type joins",
                retry_after_s=NO_REPLICA_RETRY_AFTER_S,
            )


async def _result(response: DeploymentResponse) -> BatchOutput:
    result: BatchOutput = await response
    return result
