"""The deployment graph: one worker deployment per variant, behind the scheduler ingress."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.settings import Settings
from policies.catalog import Catalog, VariantSpec
from scheduler.ingress import SchedulerIngress, ServingConfig
from workers.worker import VariantWorker

# Seconds Serve waits for a worker to load (first start also builds built-in models).
WORKER_INIT_TIMEOUT_S = 600


def worker_deployment_name(variant: VariantSpec) -> str:
    """Serve deployment name of ``variant``'s workers."""
    return f"worker-{variant.name}"


def build_app(catalog: Catalog, settings: Settings) -> Application:
    """Bind the whole app: workers first, then the ingress that holds their handles."""
    workers = {}
    for variant in catalog.variants:
        actor_options: dict = {
            "num_cpus": variant.resources.num_cpus,
            "num_gpus": variant.resources.num_gpus,
        }
        if variant.resources.accelerator_type:
            actor_options["accelerator_type"] = variant.resources.accelerator_type
        deployment = serve.deployment(
            VariantWorker,
            name=worker_deployment_name(variant),
            num_replicas=variant.resources.replicas,
            ray_actor_options=actor_options,
            # One batch at a time per replica; Serve queues the rest at the caller.
            max_ongoing_requests=1,
            max_queued_requests=-1,
            health_check_period_s=10,
        )
        workers[variant.name] = deployment.bind(variant, str(settings.models_dir))
    config = ServingConfig(
        cache_dir=str(settings.result_cache_dir),
        cache_max_bytes=settings.cache_max_bytes,
        cache_ttl_s=settings.cache_ttl_s,
        power_cap_w=settings.power_cap_w,
        joules_per_output_target=settings.joules_per_output_target,
        coalescers=settings.coalescers,
    )
    ingress = SchedulerIngress.options(num_replicas=settings.scheduler_replicas)
    return ingress.bind(workers, catalog, settings.db_url, config)
