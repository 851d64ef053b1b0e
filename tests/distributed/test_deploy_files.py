"""deploy/ray: the Serve config and the KubeRay RayService example describe one valid application
that the front door's flags agree with (no cluster needed: Serve's own config schema and our
application builder are checked, not a deployment)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from engine.core.settings import Settings
from engine.distributed.ray_serve import APP_NAME, app_builder, worker_deployment_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"


def serve_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text(encoding="utf-8"))


def ray_service() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text(encoding="utf-8"))


def test_serve_config_is_valid_for_serve_and_names_our_application() -> None:
    config = ServeDeploySchema.parse_obj(serve_config())
    (app,) = config.applications
    assert app.name == APP_NAME
    assert app.import_path == "engine.distributed.ray_serve:app_builder"


def test_the_applications_args_build_valid_settings_and_the_application() -> None:
    args = serve_config()["applications"][0]["args"]
    settings = Settings.model_validate({"backend": "ray", **{k: v for k, v in args.items() if k != "model"}})
    options = worker_deployment_options(settings)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert isinstance(app_builder(args), serve.Application)


def test_the_ray_service_deploys_the_same_application() -> None:
    spec = ray_service()["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == serve_config()


def test_the_ray_service_front_door_is_told_the_applications_replica_numbers() -> None:
    args = serve_config()["applications"][0]["args"]
    head = ray_service()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    words = shlex.split(head["args"][0].split("exec ", 1)[1])
    flags = dict(zip(words[::1], words[1::1], strict=False))
    assert words[:4] == ["python", "-m", "hooocus", "serve"]
    assert "--no-ray-deploy" in words and flags["--backend"] == "ray"
    for name in ("ray_min_replicas", "ray_max_replicas", "ray_max_ongoing_requests"):
        assert int(flags["--" + name.replace("_", "-")]) == args[name], name
    workers = ray_service()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] * int(workers["rayStartParams"]["num-gpus"]) >= args["ray_max_replicas"]
