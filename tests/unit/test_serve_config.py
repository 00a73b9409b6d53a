"""`serving serve-config`: a Ray Serve config generated from the validated config file, checked with
Ray's own schema, whose builder takes its args the way Ray Serve calls it. Nothing here starts Ray."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from serving.config import Config, ConfigError
from serving.deploy.serve_config import BUILDER, serve_config
from serving.ops import cli, launch

REPO = Path(__file__).resolve().parents[2]

SCALED = """
model: m
variants:
  fp16: {path: models/fp16, precision: fp16, gpu: false, replicas: 2}
  awq: {hub: org/model-awq, precision: awq, gpu: true, autoscaling: {min_replicas: 1, max_replicas: 3}}
tiers:
  t: {baseline: fp16, candidate: awq, weight: 10}
keys:
  - {sha256: 6472c4c1697ef39ff5c61da2c84c91b38244a3cb5e79b15f1110bf7f6bd574ae, tenant: t, tier: t}
router: {replicas: 3}
"""


@pytest.mark.parametrize("file", ["demo.yaml", "tiny.yaml", "gpu.yaml"])
def test_the_generated_file_is_a_valid_ray_serve_config(file: str, tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    assert cli.main(["serve-config", str(REPO / "deploy" / file), "--http-host", "0.0.0.0", "-o", str(out)]) == 0
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == ("serving", "/", "serving.deploy.app:build_from_args")
    assert schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == 8000
    assert app.args["base_dir"] == str(REPO / "deploy")


def test_the_args_are_the_file_as_validated_with_relative_paths_kept(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(SCALED)
    generated = serve_config(tmp_path / "c.yaml", base_dir=Path("/srv/deploy"))
    args = generated["applications"][0]["args"]
    assert args["base_dir"] == "/srv/deploy"
    fp16 = {"path": "models/fp16", "precision": "fp16", "gpu": False, "replicas": 2}
    assert args["config"]["variants"]["fp16"] == fp16
    assert args["config"]["router"] == {"replicas": 3}
    assert "limits" not in args["config"]  # defaults stay defaults: the cluster's validation fills them in
    assert Config.model_validate(args["config"]).limits.max_n == 4
    assert generated["http_options"] == {"host": "127.0.0.1", "port": 8000}


def test_a_bad_config_generates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(SCALED.replace("replicas: 3", "replicas: 0"))
    assert cli.main(["serve-config", str(tmp_path / "c.yaml")]) == 2
    captured = capsys.readouterr()
    assert "router.replicas: Input should be greater than or equal to 1" in captured.err
    assert captured.out == ""


def test_ray_serve_calls_the_builder_with_the_args_and_it_validates_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the engines' deployments needs a running Ray (Ray Serve LLM reads the runtime context), so
    build_app itself is replaced here; what is checked is the path from Ray's call to the resolved config."""
    module_name, _, function_name = BUILDER.partition(":")
    app_module = importlib.import_module(module_name)
    built: list[tuple[Config, bool]] = []

    @serve.deployment
    class Stub:
        pass

    def fake_build_app(config: Config, *, gpu_default: bool) -> Any:
        built.append((config, gpu_default))
        return Stub.bind()  # type: ignore[attr-defined]

    monkeypatch.setattr(app_module, "build_app", fake_build_app)
    monkeypatch.setattr(app_module, "cluster_has_gpus", lambda: False)
    (tmp_path / "c.yaml").write_text(SCALED)
    args = serve_config(tmp_path / "c.yaml", base_dir=Path("/srv/deploy"))["applications"][0]["args"]

    call_user_app_builder_with_args_if_necessary(getattr(app_module, function_name), args)
    ((config, gpu_default),) = built
    assert config.variants["fp16"].path == Path("/srv/deploy/models/fp16")
    assert config.variants["awq"].source == "org/model-awq"
    assert config.rollback.state_file == Path("/srv/deploy/rollout-state.json")
    assert gpu_default is False

    bad = {**args, "config": {**args["config"], "modle": "typo"}}
    with pytest.raises(ConfigError, match="modle: unknown key"):
        call_user_app_builder_with_args_if_necessary(getattr(app_module, function_name), bad)
    with pytest.raises(ConfigError, match="unknown application args: extra"):
        call_user_app_builder_with_args_if_necessary(getattr(app_module, function_name), {**args, "extra": 1})
    assert not ray.is_initialized()  # a unit test must not start Ray (2 shared cores)


def test_replicas_placement_and_sources_reach_the_deployments(tmp_path: Path) -> None:
    from serving.config import load_config
    from serving.deploy.app import Router, llm_config

    (tmp_path / "c.yaml").write_text(SCALED)
    config = load_config(tmp_path / "c.yaml")
    assert Router.options(**config.router.deployment_options()).num_replicas == 3  # type: ignore[attr-defined]
    fp16 = llm_config("m", "fp16", config.variants["fp16"], gpu=False)
    assert fp16.deployment_config["name"] == "variant-fp16"
    assert fp16.deployment_config["num_replicas"] == 2
    assert fp16.deployment_config["max_queued_requests"] == config.variants["fp16"].max_queued_requests
    assert Router.options(**config.router.deployment_options()).max_ongoing_requests == 1000  # type: ignore[attr-defined]
    assert fp16.placement_group_config == {"bundles": [{"CPU": 1}]}
    awq = llm_config("m", "awq", config.variants["awq"], gpu=True)
    assert awq.deployment_config["autoscaling_config"]["max_replicas"] == 3
    assert awq.placement_group_config is None  # Ray Serve LLM's default: one GPU per replica
    assert awq.model_loading_config.model_source == "org/model-awq"


def test_serve_starts_ray_here_or_joins_a_cluster_given_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    local = launch.ray_init_options(None, 8080)
    assert local["num_cpus"] == launch.RAY_LOGICAL_CPUS
    assert "address" not in local
    # Every replica's metrics at one known port, exported soon enough for the demo and the tests to see.
    assert local["_metrics_export_port"] == 8080
    assert local["_system_config"] == {"metrics_report_interval_ms": launch.METRICS_REPORT_INTERVAL_MS}
    joined = launch.ray_init_options("ray://head:10001", 8080)
    assert joined["address"] == "ray://head:10001"
    assert "num_cpus" not in joined  # a cluster keeps the resources its operator gave it
    assert "_metrics_export_port" not in joined  # and its metrics settings
    assert joined["namespace"] == local["namespace"]  # the rollout controller is found by name in it

    called: list[tuple[Path, str | None]] = []

    def fake_serve(path: Path, address: str | None = None) -> int:
        called.append((path, address))
        return 0

    monkeypatch.setattr(launch, "serve", fake_serve)
    assert cli.main(["serve", "--config", "x.yaml", "--address", "auto"]) == 0
    assert called == [(Path("x.yaml"), "auto")]


def test_custom_resources_pin_a_variant_to_the_nodes_that_advertise_them(tmp_path: Path) -> None:
    from serving.config import load_config
    from serving.deploy.app import llm_config

    pinned = SCALED.replace("gpu: false, replicas: 2}", "gpu: false, replicas: 2, resources: {worker_b: 1}}")
    pinned = pinned.replace("gpu: true, autoscaling", "gpu: true, resources: {gpu_pool: 0.5}, autoscaling")
    (tmp_path / "c.yaml").write_text(pinned)
    config = load_config(tmp_path / "c.yaml")
    fp16 = llm_config("m", "fp16", config.variants["fp16"], gpu=False)
    assert fp16.placement_group_config == {"bundles": [{"CPU": 1, "worker_b": 1}]}
    awq = llm_config("m", "awq", config.variants["awq"], gpu=True)
    assert awq.placement_group_config == {"bundles": [{"GPU": 1, "gpu_pool": 0.5}]}
    for bad, message in [("{CPU: 2}", "CPU follow from gpu"), ("{worker_b: 0}", "must be above 0")]:
        (tmp_path / "c.yaml").write_text(SCALED.replace("replicas: 2}", f"replicas: 2, resources: {bad}}}"))
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "c.yaml")
