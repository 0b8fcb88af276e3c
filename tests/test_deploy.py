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
    # a shared file system instead of an object store: a PVC mounted at storage.uri on every Ray pod
    "pvc-storage": {"storage": {"uri": "/mnt/dynamix", "pvcName": "dynamix-data", "credentialsSecret": ""}},
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
    ({"storage": {"uri": "/mnt/dynamix"}}, r"storage.uri /mnt/dynamix is a path: set storage.pvcName"),
    ({"storage": {"uri": "/data/reid", "pvcName": "dynamix-data"}}, r"storage.uri /data/reid .* storage.mountPath"),
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

    docs = render(VARIANTS[variant])
    commands = sorted({s.strip() for s in _strings(docs) if s.strip().startswith("dynamix ")})
    assert {shlex.split(c)[1] for c in commands} == {"train", "retrain"}
    monkeypatch.chdir(REPO_ROOT)  # the image's working directory holds recipes/
    for name, value in _literal_env(_all_ray_containers(docs)[0]).items():  # the recipes read DYNAMIX_STORAGE_URI
        monkeypatch.setenv(name, value)
    for command in commands:
        assert main([*shlex.split(command)[1:], "--print-config"]) == 0, command
        printed = capsys.readouterr().out
        if variant == "production" and " train " in f" {command} ":
            assert "max_steps: 120000" in printed and "loss_mode: sharded" in printed
        if " train " in f" {command} ":  # the chart's training run registers its encoder
            assert "registered_model: dynamix-reid" in printed


# ------------------------------------------------------- the jobs the chart submits, against the pods it asks for


def _ray_jobs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, RayJob spec) of every job the chart submits: the training RayJob, the retraining RayJob
    (the CronJob's template) or the RayCronJob's job template."""
    jobs = []
    for d in docs:
        name = d["metadata"].get("name") or d["metadata"].get("generateName")
        if d["kind"] == "RayJob":
            jobs.append((name, d["spec"]))
        elif d["kind"] == "RayCronJob":
            jobs.append((name, d["spec"]["jobTemplate"]))
    return jobs


def _ray_containers(cluster_spec: dict) -> list[tuple[dict, dict]]:
    """(pod spec, container) of the head and every worker group of a RayCluster spec."""
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return [(pod, c) for pod in pods for c in pod["containers"]]


def _literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _resolve_job(entrypoint: str, env: dict[str, str], monkeypatch):
    """The training config (and for `dynamix retrain` the retraining config) that the job's
    entrypoint builds, through the CLI's own parser and config loading, with the pods' environment."""
    import shlex

    from dynamix_core.config import load_config
    from pipelines.cli import build_parser

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO_ROOT)  # the image's working directory holds recipes/
    argv = shlex.split(entrypoint)
    assert argv[0] == "dynamix", entrypoint
    args = build_parser(argv[1]).parse_args(argv[1:])
    if argv[1] == "train":
        from pipelines.commands.train import resolve

        return resolve(args), None
    assert argv[1] == "retrain", entrypoint
    from pipelines.retrain import RetrainConfig, recipe_config

    cfg = load_config(RetrainConfig, args.config, args.overrides)
    if args.storage:  # as pipelines/commands/retrain.py does
        cfg.train.overrides.append(f"run.storage={args.storage.rstrip('/')}/runs")
    return recipe_config(cfg), cfg


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_job_fits_the_worker_group_it_runs_on(variant, monkeypatch):
    """The GPUs and per-pod CPUs that the rendered job's recipe asks for (trainers: scaling.num_workers
    x (1 GPU + scaling.cpus_per_worker CPUs, one pod each); the labeling pool of DynaMix/ReMix:
    labeling.pool_size actors of 1 GPU, or labeling.cpus_per_actor CPUs without GPUs) fit the worker
    group the chart gives it, so the job cannot stay pending until its deadline. KubeRay gives Ray
    the container's limits (num-cpus, num-gpus); the head runs with num-cpus 0."""
    jobs = _ray_jobs(render(VARIANTS[variant]))
    assert len(jobs) == 2  # training + retraining
    for name, spec in jobs:
        cluster = spec["rayClusterSpec"]
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        env = _literal_env(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
        cfg, _ = _resolve_job(spec["entrypoint"], env, monkeypatch)
        trainers, sc = cfg.scaling.num_workers, cfg.scaling
        labelers = cfg.labeling.pool_size if cfg.uses_labeling_pool else 0
        gpus_needed = (trainers + labelers) if sc.use_gpu else 0
        cpus_needed = trainers * sc.cpus_per_worker + (0 if sc.use_gpu else labelers * cfg.labeling.cpus_per_actor)
        groups = []
        for g in cluster["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            groups.append((g["replicas"], int(limits.get("nvidia.com/gpu", 0)), _cpus(limits["cpu"])))
        gpus = sum(n * per_pod for n, per_pod, _ in groups)
        cpus = sum(n * per_pod for n, _, per_pod in groups)
        where = f"{variant}: {name} ({spec['entrypoint'].split(' --')[0]} ...)"
        assert gpus_needed <= gpus, f"{where}: needs {trainers} trainer + {labelers} labeling GPUs, the workers have {gpus}"
        # the trainers' placement group packs them: a pod may get as many trainers as it has GPUs
        for n, gpus_per_pod, cpus_per_pod in groups:
            per_pod = min(gpus_per_pod, trainers) if sc.use_gpu else 1
            assert per_pod * sc.cpus_per_worker <= cpus_per_pod, (
                f"{where}: {per_pod} trainers x {sc.cpus_per_worker} CPUs do not fit a pod's CPU limit {cpus_per_pod}")
        # and one CPU stays free for Ray Data's CPU tasks (ingest, decoding)
        assert cpus_needed + 1 <= cpus, f"{where}: needs {cpus_needed} + 1 CPUs, the workers have {cpus}"


def _job_paths(cfg, retrain) -> dict[str, str]:
    """Every path a job reads or writes, by its config key."""
    paths = {"run.storage": cfg.run.storage, "data.target": cfg.data.target, "model.weights": cfg.model.weights}
    for key in ("multi", "single"):
        paths.update({f"data.{key}[{i}]": p for i, p in enumerate(getattr(cfg.data, key))})
    paths.update({f"labeling.ground_truth[{i}]": p for i, p in enumerate(cfg.labeling.ground_truth)})
    if retrain is not None:
        paths.update({"state_dir": retrain.state_dir, "suite": retrain.suite})
        for i, source in enumerate(retrain.sources):
            paths.update({f"sources[{i}].root": source.root, f"sources[{i}].out": source.out})
    return {key: str(p) for key, p in paths.items() if p is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_path_of_every_job_is_on_the_storage_or_a_mounted_volume(variant, monkeypatch):
    """Nothing node-local: each path of a job's config (recipe + overrides, with the environment the
    chart sets on the Ray pods) lies under the rendered storage.uri when that is an object-store URI,
    or under the mountPath of a volume the chart mounts on every Ray pod (not an emptyDir)."""
    for name, spec in _ray_jobs(render(VARIANTS[variant])):
        roots = None
        for pod, container in _ray_containers(spec["rayClusterSpec"]):
            shared = {v["name"] for v in pod.get("volumes", []) if "emptyDir" not in v}
            mounted = {m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", []) if m["name"] in shared}
            uri = _literal_env(container)["DYNAMIX_STORAGE_URI"]
            pod_roots = mounted | ({uri.rstrip("/") + "/"} if "://" in uri else set())
            roots = pod_roots if roots is None else roots & pod_roots  # on every Ray pod
        assert roots, f"{variant}: {name}: neither an object store nor a mounted volume"
        env = _literal_env(spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
        paths = _job_paths(*_resolve_job(spec["entrypoint"], env, monkeypatch))
        assert {"run.storage", "data.multi[0]", "data.target"} <= set(paths)
        stray = {key: p for key, p in paths.items() if not any(p.startswith(root) for root in roots)}
        assert not stray, f"{variant}: {name}: not under {sorted(roots)}: {stray}"


def _all_ray_containers(docs: list[dict]) -> list[dict]:
    specs = [spec["rayClusterSpec"] for _, spec in _ray_jobs(docs)]
    specs += [d["spec"] for d in docs if d["kind"] == "RayCluster"]
    return [c for spec in specs for _, c in _ray_containers(spec)]


def test_cloud_identity_region_and_endpoint_without_static_keys():
    values = {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/reid"}},
              "storage": {"credentialsSecret": "", "region": "eu-central-1", "endpointUrl": "https://minio.reid:9000"},
              "rayCluster": {"enabled": True}}
    docs = render(values)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "reid-dynamix-ray")
    assert sa["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    containers = _all_ray_containers(docs)
    assert len(containers) >= 6  # head + workers of the training job, the retraining job and the standing cluster
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-central-1"
        assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "https://minio.reid:9000"}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), c["name"]
    pods = [p for d in docs for p in _pod_specs(d) if any(c["name"] in ("ray-head", "ray-worker", "mlflow")
                                                          for c in p["containers"])]
    assert pods and all(p["serviceAccountName"] == "reid-dynamix-ray" for p in pods)  # MLflow's artifacts too
    mlflow = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["AWS_REGION"]["value"] == "eu-central-1" and env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://minio.reid:9000"
    assert "AWS_ACCESS_KEY_ID" not in env


def test_static_keys_and_no_region_by_default():
    docs = render()
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "reid-dynamix-ray")
    assert not sa["metadata"].get("annotations")
    for c in _all_ray_containers(docs):
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "dynamix-object-store"
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert "AWS_REGION" not in env


def test_the_production_example_uses_cloud_identity():
    docs = render(PROD_VALUES)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "reid-dynamix-ray")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    for c in _all_ray_containers(docs):
        names = {e["name"] for e in c["env"]}
        assert "AWS_REGION" in names and not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_container_sets_a_variable_twice(variant):
    for d in render(VARIANTS[variant]):
        for pod in _pod_specs(d):
            for c in pod["containers"]:
                names = [e["name"] for e in c.get("env", [])]
                assert len(names) == len(set(names)), f"{variant}: {c['name']}: {names}"


def test_kubectl_is_within_one_minor_version_of_the_validated_kubernetes():
    """kubectl supports one minor version of skew against the API server (the retraining CronJob's image)."""
    major, minor = (int(x) for x in KUBE_VERSION.split(".")[:2])
    cron = next(d for d in render() if d["kind"] == "CronJob")
    image = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    tag = re.fullmatch(r".*/kubectl:v(\d+)\.(\d+)\.(\d+)", image)
    assert tag, image
    assert int(tag.group(1)) == major and abs(int(tag.group(2)) - minor) <= 1, f"{image} vs Kubernetes {KUBE_VERSION}"
