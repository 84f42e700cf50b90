"""The deployment graph: one Serve application per variant, and the scheduler ingress.

Each variant runs as its own application (``variant_app_name``) holding one ``worker``
deployment, so the control plane can add or retire a variant by deploying or deleting
that application alone; the ingress finds workers by name and is never redeployed.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import VariantSpec
from wattserve.policies.tenancy import hash_key
from wattserve.scheduler.ingress import WORKER_DEPLOYMENT, SchedulerIngress, ServingConfig
from wattserve.workers.worker import VariantWorker


def worker_app(variant: VariantSpec, settings: Settings) -> Application:
    """The application serving ``variant``: its worker deployment, bound to its spec."""
    actor_options: dict = {
        "num_cpus": variant.resources.num_cpus,
        "num_gpus": variant.resources.num_gpus,
    }
    if variant.resources.accelerator_type:
        actor_options["accelerator_type"] = variant.resources.accelerator_type
    deployment = serve.deployment(
        VariantWorker,
        name=WORKER_DEPLOYMENT,
        num_replicas=variant.resources.replicas,
        ray_actor_options=actor_options,
        # One batch at a time per replica; Serve queues the rest at the caller.
        max_ongoing_requests=1,
        max_queued_requests=-1,
        health_check_period_s=10,
        # Retiring drains in the scheduler first; this bounds what is left after that.
        graceful_shutdown_timeout_s=120,
    )
    return deployment.bind(variant, str(settings.models_dir))


def ingress_app(settings: Settings, admin_token: str | None) -> Application:
    """The scheduler ingress application: HTTP API, scheduling, admin API."""
    config = ServingConfig(
        cache_dir=str(settings.result_cache_dir),
        # Only the hash travels (deployment arguments are stored by Serve's controller).
        admin_token_sha256=hash_key(admin_token) if admin_token else None,
        replicas=settings.scheduler_replicas,
        coalescers=settings.coalescers,
    )
    ingress = SchedulerIngress.options(num_replicas=settings.scheduler_replicas)
    return ingress.bind(settings.db_url, config)
