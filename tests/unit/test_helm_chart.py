"""The Helm chart in helm/serving, rendered for real by Helm's own engine (helm-python-sdk bundles Helm
as a library; there is no helm binary or cluster here), every rendered object validated: core
Kubernetes objects with kubernetes-validate, the RayService against KubeRay's CRD schema."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.deploy.serve_config import render, serve_config
from serving.ops.launch import FAST_PATH_ENV

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "serving"
EXAMPLE = CHART / "examples" / "values-gpu-a100.yaml"
CRD = REPO / "tests" / "data" / "kuberay-v1.7.0-ray.io_rayservices.yaml"
K8S_VERSION = "1.30.0"
# How files/serve-config.yaml is made; the chart's README gives the same command.
GENERATE = ("deploy/gpu.yaml", Path("/home/ray/deploy"), "0.0.0.0")
CORE_KINDS = {"Secret", "ConfigMap"}


def default_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def example_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return values


def rendered(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    with helm.Chart.load(str(chart)) as loaded:
        manifests = loaded.render(values, name="serving", namespace="llm")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def containers(rayservice: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def test_the_committed_serve_config_is_what_the_generator_makes_now() -> None:
    config, base_dir, host = GENERATE
    command = f"serving serve-config {config} --base-dir {base_dir} --http-host {host}"
    fresh = render(serve_config(REPO / config, base_dir=base_dir, http_host=host), command=command)
    committed = (CHART / "files" / "serve-config.yaml").read_text()
    assert committed == fresh, f"helm/serving/files/serve-config.yaml is stale: run `{command} -o <that file>`"


def test_the_values_schema_accepts_the_defaults_and_the_example() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(default_values())
        chart.validate_schema(chart.merge_values(example_values()))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda v: v.update(colour="red"), "colour"),
        (lambda v: v["image"].update(repository=""), "repository"),
        (lambda v: v["image"].update(pullPolicy="Sometimes"), "pullPolicy"),
        (lambda v: v["workerGroups"][1].update(gpus=-1), "gpus"),
        (lambda v: v["workerGroups"][0].update(name="CPU_group"), "name"),
        (lambda v: v["workerGroups"].clear(), "workerGroups"),
        (lambda v: v["head"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"}), "rayStartParams"),
        (lambda v: v["head"]["resources"]["limits"].update(memory="lots"), "memory"),
        (lambda v: v.update(rayVersion="3.0.0"), "rayVersion"),
        (lambda v: v["monitoring"]["podMonitor"].update(enabled="yes"), "enabled"),
    ],
)
def test_the_values_schema_refuses_bad_values(change: Any, named: str) -> None:
    values = default_values()
    change(values)
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError) as refused:
        chart.validate_schema(values)
    assert named in str(refused.value)


@pytest.mark.parametrize(("values", "secrets"), [(default_values, 1), (example_values, 0)], ids=["default", "example"])
def test_every_rendered_object_is_valid(values: Any, secrets: int) -> None:
    objects = rendered(values())
    dashboards = len(list((REPO / "deploy" / "grafana").glob("*.json")))
    expected = ["ConfigMap"] * dashboards + ["PodMonitor"] * 2 + ["PrometheusRule", "RayService"] + ["Secret"] * secrets
    assert sorted(o["kind"] for o in objects) == expected
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        elif obj["kind"] == "RayService":
            assert obj["apiVersion"] == "ray.io/v1"
            jsonschema.validate(obj, v1["schema"]["openAPIV3Schema"])
        else:
            # prometheus-operator's CRDs are not here: check the shape KubeRay's own files use.
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["kind"]
            assert obj["kind"] in ("PodMonitor", "PrometheusRule")


def test_the_rayservice_schema_check_can_fail() -> None:
    (rayservice,) = of_kind(rendered(default_values()), "RayService")
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "three"
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rayservice, v1["schema"]["openAPIV3Schema"])


def test_the_rayservice_serves_the_generated_config_with_token_auth_and_internal_ray_ports() -> None:
    objects = rendered(default_values())
    (rayservice,) = of_kind(objects, "RayService")
    spec = rayservice["spec"]
    assert spec["serveConfigV2"] == (CHART / "files" / "serve-config.yaml").read_text()
    ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    (secret,) = of_kind(objects, "Secret")
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    assert len(secret["data"]["auth_token"]) >= 48
    for container in containers(rayservice):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "auth_token",
        }
        fast_path = {name: e["value"] for name, e in env.items() if name in FAST_PATH_ENV}
        assert fast_path == FAST_PATH_ENV  # as `serving serve` runs Ray Serve
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    gpu_container = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_example_uses_its_existing_secrets_and_creates_none() -> None:
    objects = rendered(example_values())
    assert of_kind(objects, "Secret") == []
    (rayservice,) = of_kind(objects, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "ray-auth-token"
    for container in containers(rayservice):
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("a100", 3, 8)


def test_monitoring_objects_follow_kuberay_and_the_shipped_alert_rules() -> None:
    objects = rendered(default_values())
    monitors = {m["spec"]["jobLabel"]: m for m in of_kind(objects, "PodMonitor")}
    assert set(monitors) == {"ray-head", "ray-workers"}
    assert [e["port"] for e in monitors["ray-head"]["spec"]["podMetricsEndpoints"]] == [
        "metrics",
        "as-metrics",
        "dash-metrics",
    ]
    assert monitors["ray-workers"]["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
    (rule,) = of_kind(objects, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    dashboards = sorted((REPO / "deploy" / "grafana").glob("*.json")) if (REPO / "deploy" / "grafana").is_dir() else []
    configmaps = of_kind(objects, "ConfigMap")
    assert len(configmaps) == len(dashboards)
    off = default_values()
    for part in ("podMonitor", "prometheusRule", "dashboards"):
        off["monitoring"][part]["enabled"] = False
    assert sorted(o["kind"] for o in rendered(off)) == ["RayService", "Secret"]


def test_every_dashboard_json_becomes_a_configmap_for_grafanas_sidecar(tmp_path: Path) -> None:
    """deploy/grafana/ may hold no dashboard yet: a copy of the chart with one shows that any file there is taken."""
    copy = tmp_path / "serving"
    shutil.copytree(CHART, copy, symlinks=False)  # the files/deploy link becomes a real folder
    grafana = copy / "files" / "deploy" / "grafana"
    grafana.mkdir(exist_ok=True)
    dashboard = {"title": "Serving overview", "panels": [{"targets": [{"expr": "sum(rate(x_total[5m]))"}]}]}
    (grafana / "Serving_Overview.json").write_text(json.dumps(dashboard))
    configmaps = of_kind(rendered(default_values(), copy), "ConfigMap")
    named = [c for c in configmaps if c["metadata"]["name"] == "serving-dashboard-serving-overview"]
    assert len(named) == 1
    assert named[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(named[0]["data"]["Serving_Overview.json"]) == dashboard
    for configmap in configmaps:
        kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
