"""The deployment graph: one Serve application per variant, and the scheduler ingress.

Each variant runs as its own application (``variant_app_name``) holding one ``worker``
deployment, so the control plane can add or retire a variant by deploying or deleting
that application alone; the ingress finds workers by name and is never redeployed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from wattserve.cluster.ingress import SchedulerIngress, ServingConfig
from wattserve.cluster.names import WORKER_DEPLOYMENT
from wattserve.cluster.settings import Settings, ensure_admin_token
from wattserve.policies.catalog import VariantSpec
from wattserve.policies.tenancy import hash_key
from wattserve.workers.worker import VariantWorker


def worker_app(variant: VariantSpec, settings: Settings) -> Application:
    """The application serving ``variant``: its worker deployment, bound to its spec.

    Replicas of a variant with ``accelerator_types`` are placed only on nodes labelled
    with one of those types.
    """
    from wattserve.cluster.agents import ACCELERATOR_TYPE_LABEL

    actor_options: dict = {
        "num_cpus": variant.resources.num_cpus,
        "num_gpus": variant.resources.num_gpus,
    }
    if variant.resources.accelerator_types:
        # Ray's label selector: "in(A,B)" matches either (no spaces: Ray 2.60's matcher
        # compares " B" literally). Real GPU nodes carry this label automatically.
        types = ",".join(variant.resources.accelerator_types)
        actor_options["label_selector"] = {ACCELERATOR_TYPE_LABEL: f"in({types})"}
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
        power_hold_s=settings.power_hold_s,
        models_dir=str(settings.models_dir),
        audit_clip_model=settings.audit_clip_model,
        settings=settings,
    )
    ingress = SchedulerIngress.options(num_replicas=settings.scheduler_replicas)
    return ingress.bind(settings.db_url, config)


class BuildArgs(BaseModel):
    """The ``args`` of ``build``: each field that is set overrides its environment setting.

    A field left unset (``None``) keeps what ``Settings.from_env`` reads from the
    ``WATTSERVE_*`` variable named beside it. Unknown keys are refused, so a misspelt key
    in a Serve config fails the deploy instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path | None = None  # WATTSERVE_HOME; the default db_url and ray_tmpdir follow it
    db_url: str | None = None  # WATTSERVE_DB_URL
    catalog: Path | None = None  # WATTSERVE_CATALOG
    cache_dir: Path | None = None  # WATTSERVE_CACHE_DIR
    scheduler_replicas: int | None = Field(default=None, ge=1)  # WATTSERVE_SCHEDULER_REPLICAS
    power_cap_w: float | None = Field(default=None, gt=0)  # WATTSERVE_POWER_CAP_W
    power_source: Literal["auto", "nvml", "simulated"] | None = None  # WATTSERVE_POWER_SOURCE
    sim_devices: int | None = Field(default=None, ge=1)  # WATTSERVE_SIM_DEVICES

    def settings(self) -> Settings:
        """The environment's settings (``home`` first), then the fields that are set."""
        changes = {
            "db_url": self.db_url,
            "catalog_path": self.catalog.expanduser() if self.catalog else None,
            "cache_dir": self.cache_dir.expanduser() if self.cache_dir else None,
            "scheduler_replicas": self.scheduler_replicas,
            "power_cap_w": self.power_cap_w,
            "power_source": self.power_source,
            "sim_devices": self.sim_devices,
        }
        overrides = {name: value for name, value in changes.items() if value is not None}
        return dataclasses.replace(Settings.from_env(self.home), **overrides)


def build(args: BuildArgs | dict[str, Any]) -> Application:
    """The scheduler ingress application: the builder behind ``import_path`` in a Serve config.

    Used by ``serve deploy`` (Serve calls it in a build task on the cluster, with the
    config's ``args``) and by ``serve run wattserve.cluster.app:build key=value ...``.
    Serve converts the args to a pydantic model only when the parameter's annotation is a
    class at run time; this module's annotations are strings (postponed evaluation), so
    Serve passes the dict and it is validated here, with the same errors.

    It starts nothing (no ``ray.init``, no deployment): it reads the settings and makes
    sure the admin token exists, whose hash the ingress is bound with.
    """
    settings = BuildArgs.model_validate(args).settings()
    return ingress_app(settings, ensure_admin_token(settings.home))
