"""The checked-in Serve config and KubeRay RayService, and the builder they name.

No Ray cluster: the config is validated with Serve's own schema, the builder is called
the way Serve's build task calls it, and nothing may start Ray while doing so.
"""

import os
import stat
from pathlib import Path

import pydantic
import pytest
import ray
import yaml
from ray._common.utils import import_attr
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from wattserve.cluster.app import BuildArgs, build

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG = DEPLOY / "serve-config.yaml"
MANIFEST = DEPLOY / "kuberay-rayservice.yaml"


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No WATTSERVE_* settings from the caller's environment, and Ray must not start."""
    for name in list(os.environ):
        if name.startswith("WATTSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WATTSERVE_HOME", str(tmp_path / "env-home"))

    def no_ray(*args, **kwargs):
        raise AssertionError("building the application must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray._private.worker, "init", no_ray)
    # In the full suite the `ray` tests' shared cluster may already be connected; what
    # matters is that building never connects, which the patched init would catch.
    connected = ray.is_initialized()
    yield monkeypatch
    assert ray.is_initialized() == connected


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def the_app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def test_config_is_a_valid_serve_deploy_config():
    schema = ServeDeploySchema.model_validate(load(CONFIG))
    (app,) = schema.applications
    assert (app.name, app.route_prefix) == ("wattserve", "/")
    assert app.import_path == "wattserve.cluster.app:build"
    assert app.runtime_env["env_vars"] == {
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)


def test_import_path_is_the_builder_and_its_args_validate():
    app = the_app(load(CONFIG))
    assert import_attr(app["import_path"]) is build
    assert BuildArgs.model_validate(app["args"]).scheduler_replicas == 2


def test_serve_builds_the_config_app_as_its_build_task_would(env):
    app = the_app(load(CONFIG))
    built = call_user_app_builder_with_args_if_necessary(
        import_attr(app["import_path"]), app["args"]
    )
    assert isinstance(built, Application)
    ingress = built._bound_deployment  # private, but the only view of the bound arguments
    assert ingress.num_replicas == 2
    assert ingress.init_args[1].replicas == 2


def test_build_with_a_home_returns_the_ingress_without_starting_ray(env, tmp_path):
    home = tmp_path / "home"
    built = build(BuildArgs(home=home, db_url="sqlite:///x.db", scheduler_replicas=3))
    assert isinstance(built, Application)
    db_url, config = built._bound_deployment.init_args
    assert db_url == "sqlite:///x.db"
    assert (config.replicas, config.cache_dir) == (3, str(home / "cache"))
    token = home / "admin-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert config.admin_token_sha256 is not None


def test_args_override_the_environment_and_unset_args_keep_it(env, tmp_path):
    env.setenv("WATTSERVE_DB_URL", "postgresql+psycopg://db/from-env")
    env.setenv("WATTSERVE_SIM_DEVICES", "2")
    env.setenv("WATTSERVE_SCHEDULER_REPLICAS", "2")
    settings = BuildArgs(
        home=tmp_path, db_url="sqlite:///arg.db", power_source="simulated"
    ).settings()
    assert settings.home == tmp_path.resolve()
    assert settings.db_url == "sqlite:///arg.db"
    assert settings.power_source == "simulated"
    assert (settings.sim_devices, settings.scheduler_replicas) == (2, 2)
    defaults = BuildArgs(home=tmp_path).settings()
    assert defaults.db_url == "postgresql+psycopg://db/from-env"
    assert BuildArgs().settings().home == (tmp_path / "env-home").resolve()


def test_serve_run_style_string_args_are_converted(env, tmp_path):
    args = {"home": str(tmp_path), "scheduler_replicas": "2", "power_cap_w": "500"}
    settings = BuildArgs.model_validate(args).settings()
    assert (settings.scheduler_replicas, settings.power_cap_w) == (2, 500.0)


@pytest.mark.parametrize(
    "args",
    [{"scheduler_replica": 2}, {"scheduler_replicas": 0}, {"power_source": "gpu"}],
    ids=["misspelt key", "no replicas", "unknown power source"],
)
def test_bad_args_fail_the_build(env, args):
    with pytest.raises(pydantic.ValidationError):
        call_user_app_builder_with_args_if_necessary(build, args)


def test_manifest_serve_config_is_the_config_file():
    manifest = load(MANIFEST)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = manifest["spec"]["serveConfigV2"]
    assert yaml.safe_load(serve_config) == load(CONFIG)
    assert serve_config == CONFIG.read_text(encoding="utf-8"), "copy serve-config.yaml verbatim"


def test_manifest_has_a_cpu_free_head_and_two_gpu_groups_of_different_device_types():
    cluster = load(MANIFEST)["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert len(groups) == 2
    selectors = [tuple(g["template"]["spec"]["nodeSelector"].items()) for g in groups]
    assert len({g["groupName"] for g in groups}) == len(set(selectors)) == 2
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        labels = group["rayStartParams"].get("labels", "")
        # Ray sets ray.io/accelerator-type itself and `ray start` refuses ray.io/ keys.
        assert "ray.io/" not in labels
        env = {e["name"]: e for e in container["env"]}
        assert env["WATTSERVE_DB_URL"]["valueFrom"]["secretKeyRef"]["key"] == "db-url"


def test_build_args_cover_the_settings_a_deployment_overrides():
    assert set(BuildArgs.model_fields) >= {
        "home",
        "db_url",
        "catalog",
        "scheduler_replicas",
        "power_cap_w",
        "power_source",
        "sim_devices",
    }
