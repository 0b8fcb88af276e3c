"""The Helm chart lints strictly, renders, validates against Kubernetes and KubeRay schemas, and
passes the security policy (non-root, no privilege escalation, resources, pinned images, no literal
credentials)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate.utils")
jsonschema = pytest.importorskip("jsonschema")

CHART = REPO_ROOT / "helm" / "dynamix"
KUBE_VERSION = "1.34.0"  # the Kubernetes version manifests are validated for (pinned)
KUBERAY_SCHEMAS = REPO_ROOT / "tests" / "schemas" / "kuberay-v1.7.0"  # vendored, Apache-2.0
KUBERAY_KINDS = {"RayJob", "RayCluster", "RayCronJob"}
PROD_VALUES = yaml.safe_load((CHART / "values-production.example.yaml").read_text())


def render(values: dict | None = None) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="reid", namespace="reid", is_install=True)
    docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
    # the retraining RayJob template travels inside a ConfigMap: validate it too
    for d in list(docs):
        if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}):
            docs.append(yaml.safe_load(d["data"]["rayjob.yaml"]))
    return docs


VARIANTS = {
    "default": None,
    "production": PROD_VALUES,
    "cronjob+standing-cluster": {"rayCluster": {"enabled": True}, "ray": {"auth": {"enabled": False}}},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def docs(request):
    return render(VARIANTS[request.param])


def test_chart_lints_strictly():
    for values in VARIANTS.values():
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


def test_expected_kinds_render():
    kinds = sorted(d["kind"] for d in render())
    assert kinds.count("RayJob") == 2  # training run + retraining template
    assert {"CronJob", "Deployment", "Service", "NetworkPolicy", "Role", "RoleBinding"} <= set(kinds)
    prod = {d["kind"] for d in render(PROD_VALUES)}
    assert {"RayCronJob", "RayCluster", "RayJob"} <= prod and "Deployment" not in prod  # external MLflow


def test_core_kinds_validate_strictly(docs):
    for d in docs:
        if d["kind"] in KUBERAY_KINDS:
            continue
        kv.validate(d, KUBE_VERSION, strict=True)


def test_kuberay_kinds_validate_against_crd_schemas(docs):
    checked = 0
    for d in docs:
        if d["kind"] not in KUBERAY_KINDS:
            continue
        schema = json.loads((KUBERAY_SCHEMAS / f"{d['kind']}-v1.json").read_text())
        jsonschema.Draft7Validator(schema).validate(d)
        checked += 1
    assert checked >= 1


def _pod_specs(doc: dict):
    """Every pod spec inside a rendered document (Deployments, CronJobs, KubeRay kinds)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)


def test_security_policy(docs):
    pods = [p for d in docs for p in _pod_specs(d)]
    assert len(pods) >= 3
    for pod in pods:
        pod_nonroot = pod.get("securityContext", {}).get("runAsNonRoot") is True
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"container {c['name']}"
            assert pod_nonroot or sc.get("runAsNonRoot") is True, f"{where}: not forced non-root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root file system"
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{where}: requests/limits missing"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{where}: image {image} has no tag"
            assert not image.endswith(":latest"), f"{where}: image {image} uses latest"
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "valueFrom" in env and "value" not in env, f"{where}: {env['name']} is a literal"
            for arg in c.get("command", []) + c.get("args", []):
                assert not re.search(r"://[^/$\s]+:[^@$\s]+@", arg), f"{where}: credential literal in {arg!r}"


def test_ray_token_and_db_credentials_come_from_secrets():
    docs = render()
    rayjob = next(d for d in docs if d["kind"] == "RayJob" and "generateName" not in d["metadata"])
    auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "dynamix-ray-token"}
    mlflow = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dynamix-mlflow-db"


def test_network_policies_restrict_to_namespace():
    docs = render()
    pols = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    ray = pols["reid-dynamix-ray"]["spec"]
    assert ray["policyTypes"] == ["Ingress"]
    sources = [rule["from"] for rule in ray["ingress"]]
    assert [{"podSelector": {}}] in sources  # same namespace only
    outside = [r for r in ray["ingress"] if "namespaceSelector" in r["from"][0]]
    assert all(r["ports"] == [{"protocol": "TCP", "port": 8265}] for r in outside)  # operator: dashboard only
    ml = pols["reid-dynamix-mlflow"]["spec"]["ingress"]
    assert ml == [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 5000}]}]


def test_rbac_is_least_privilege():
    role = next(d for d in render() if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]


@pytest.mark.parametrize("values, message", [
    ({"image": {"tag": "latest"}}, "latest"),
    ({"mlflow": {"enabled": False, "externalTrackingUri": ""}}, "externalTrackingUri"),
    ({"retrain": {"mode": "hourly"}}, "retrain.mode"),
])
def test_bad_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pinned_nonroot_secret_free(name):
    text = (REPO_ROOT / "deploy" / name).read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.search(r":\d", base) and not base.endswith(":latest"), f"{name}: base image {base} not pinned"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: final USER must be non-root"
    assert "requirements.lock" in text, f"{name}: must install the pinned lock file"
    for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, re.M):
        assert not SECRETISH.search(line), f"{name}: secret-looking ENV/ARG {line!r}"
    lock = {l.split("==")[0].split("[")[0] for l in (REPO_ROOT / "requirements.lock").read_text().splitlines()
            if "==" in l and not l.startswith("#")}
    assert {"torch", "ray", "mlflow", "timm"} <= lock


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_dynamix_command_loads_its_config(variant, monkeypatch, capsys):
    """Each `dynamix ...` line the chart renders goes through the CLI's own config loading
    (`--print-config`), so a key that does not exist fails here instead of in the cluster."""
    import shlex

    from pipelines.cli import main

    commands = sorted({s.strip() for s in _strings(render(VARIANTS[variant])) if s.strip().startswith("dynamix ")})
    assert {shlex.split(c)[1] for c in commands} == {"train", "retrain"}
    monkeypatch.chdir(REPO_ROOT)  # the image's working directory holds recipes/
    for command in commands:
        assert main([*shlex.split(command)[1:], "--print-config"]) == 0, command
        printed = capsys.readouterr().out
        if variant == "production" and " train " in f" {command} ":
            assert "max_steps: 120000" in printed and "loss_mode: sharded" in printed
        if " train " in f" {command} ":  # the chart's training run registers its encoder
            assert "registered_model: dynamix-reid" in printed
