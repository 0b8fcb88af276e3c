"""Jobs run the way users run them: on a two-node cluster started with ``ray start`` (head + worker
node, :mod:`cluster_box`), whose only shared storage is an S3 API on loopback (moto's server), with a
real ``mlflow server`` whose artifacts go to that bucket. Jobs are submitted with Ray's own job
client and CLI (and ``dynamix submit``), with the entrypoints and runtime environment the Helm chart
renders for values pointing at the loopback bucket. The job commands (``dynamix submit / status /
logs / stop``) are tested against the same cluster.

What a job stored is read back with boto3 and MLflow's client (independent of the code under test).
The nodes start in an empty folder, the jobs' working directory: it must stay empty (no ``mlruns``,
no ``runs/``). The test process itself never joins the cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster_box import (VENV_BIN, start_head, start_mlflow_server, start_worker_node, stop_all, wait_for_job,
                         wait_for_nodes, wait_until_runs_a_job)
from conftest import REPO_ROOT, TINY_SYNTH, s3_test_env

pytestmark = pytest.mark.ray
helm = pytest.importorskip("helm_python")

CHART = REPO_ROOT / "helm" / "dynamix"
MODEL_NAME = "box-reid"
#: `ray start --address` attempts for the box's second node (each gets Ray's fixed 30 s to register)
WORKER_NODE_ATTEMPTS = 5
SETS = {"synth_m0": "multi", "synth_m1": "multi", "synth_video": "single", "synth_target": "target"}


def _tiny_recipe_overrides(shards: str, truth: str, max_steps: int) -> list[str]:
    """`--set` values turning the demo recipe into a minute-long run on the tiny SynthReID in ``shards``."""
    return [
        f"run.max_steps={max_steps}", "run.log_every=4", f"run.checkpoint_every={max_steps}", f"run.eval_every={max_steps}",
        f"data.multi=[{shards}/synth_m0,{shards}/synth_m1]", f"data.single=[{shards}/synth_video]",
        f"data.target={shards}/synth_target", "data.transform.height=32", "data.transform.width=16",
        "data.decode_threads=1", "data.prefetch_batches=1",
        "model.backbone=test_resnet", "model.img_size=[32,16]",
        "sampler.num_multi_ids=4", "sampler.multi_images_per_id=4", "sampler.num_videos=2", "sampler.ids_per_video=2",
        "sampler.single_images_per_id=2", "sampler.video_buffer_size=3",
        "labeling.publish_every=4", "labeling.max_staleness=1000", "labeling.relabel.warmup_fraction=0.0",
        "labeling.embed_batch_size=64", f"labeling.ground_truth=[{truth}]", "eval.max_rank=10",
        "scaling.max_failures=0",
    ]


def _boto(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def _keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in _boto(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    return keys


def _render(values: dict) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="box", namespace="box", is_install=True)
    docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
    for d in list(docs):  # the retraining RayJob template travels inside a ConfigMap
        if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}):
            docs.append(yaml.safe_load(d["data"]["rayjob.yaml"]))
    return docs


def _rayjob(docs: list[dict], component: str) -> dict:
    for d in docs:
        if d["kind"] == "RayJob" and d["metadata"].get("name", d["metadata"].get("generateName", "")).find(component) >= 0:
            return d
    raise AssertionError(f"no {component} RayJob rendered: {[d['metadata'] for d in docs if d['kind'] == 'RayJob']}")


def _pod_env(rayjob: dict) -> dict[str, str]:
    """The plain (non-secret) variables the chart sets on the Ray worker pods."""
    spec = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}


@pytest.fixture(autouse=True)
def _quiet_moto(caplog):
    caplog.set_level("WARNING", logger="werkzeug")  # moto's server logs every request


@pytest.fixture(scope="module")
def box(tmp_path_factory, s3_server):
    """The data (tiny SynthReID ingested into the bucket, raw sets uploaded for the retraining), the
    MLflow server, and the two-node cluster whose nodes carry the chart's pod environment."""
    import pyarrow.fs as pafs

    from dynamix_core.config import load_config
    from dynamix_core.data.synth import SynthConfig, generate
    from pipelines.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("cluster_box")
    saved = {k: os.environ.get(k) for k in s3_test_env(s3_server)}
    os.environ.update(s3_test_env(s3_server))
    bucket = f"box-{os.getpid()}"
    fs = pafs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(bucket)
    prod = f"s3://{bucket}/prod"
    generate(load_config(SynthConfig, None, TINY_SYNTH + ["num_videos=8"]), root / "data", progress=False)
    for name, kind in SETS.items():
        run_ingest(IngestConfig(root=str(root / "data" / kind / name), out=f"{prod}/shards/{name}", dataset=name,
                   workers=0), progress=False)
    for local, key in ((root / "data" / "single" / "synth_video", "incoming/synth_video"),
                       (root / "data" / "target" / "synth_target", "raw/synth_target")):
        pafs.copy_files(str(local), f"{bucket}/prod/{key}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    truth = f"{prod}/truth/ground_truth.parquet"
    pafs.copy_files(str(root / "data" / "single" / "synth_video" / "ground_truth.parquet"), truth.removeprefix("s3://"),
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    mlflow_env = {**os.environ, **s3_test_env(s3_server), "MLFLOW_S3_ENDPOINT_URL": s3_server}
    (root / "mlflow").mkdir()
    mlflow_server, tracking_uri = start_mlflow_server(root / "mlflow", mlflow_env, f"s3://{bucket}/mlflow-artifacts")

    values = {"storage": {"uri": prod, "credentialsSecret": ""},
              "mlflow": {"enabled": False, "externalTrackingUri": tracking_uri},
              "train": {"recipe": "recipes/dynamix_demo.yaml", "runName": "box-train", "registeredModel": MODEL_NAME,
                        "overrides": ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.use_gpu=false",
                                      "labeling.pool_size=1", "scaling.precision=fp32", "scaling.compile=false",
                                      *_tiny_recipe_overrides(f"{prod}/shards", truth, 8)]},
              "retrain": {"config": f"{prod}/config/retrain.yaml"}}
    docs = _render(values)
    pod_env = _pod_env(_rayjob(docs, "train"))
    home = root / "home"  # the pods' writable HOME (the chart mounts an emptyDir at /tmp and sets HOME=/tmp)
    home.mkdir()
    cwd = root / "job_cwd"  # where the nodes start: the jobs' working directory
    cwd.mkdir()
    node_env = {**os.environ, **s3_test_env(s3_server), **pod_env, "HOME": str(home), "XDG_CACHE_HOME": "",
                "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600"}
    node_env.pop("XDG_CACHE_HOME")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # nothing of the test process leaks into the nodes
        if key not in pod_env:
            node_env.pop(key, None)
    started = [mlflow_server]
    try:
        for attempt in range(3):  # a head whose raylet died during startup is started again
            head, gcs, address = start_head(Path(f"/tmp/rbh{os.getpid()}/ray"), node_env, cwd, 2, root / f"head{attempt}.log")
            if wait_until_runs_a_job(address):
                break
            head.stop()
        else:
            pytest.fail(f"three Ray heads in a row could not run a job; the last one's log:\n{head.log_tail()}")
        started.append(head)
        for attempt in range(WORKER_NODE_ATTEMPTS):  # `ray start` gives a raylet 30 s to register: a loaded box can miss it
            worker = start_worker_node(gcs, Path(f"/tmp/rbw{os.getpid()}"), node_env, cwd, 2, root / f"worker{attempt}.log")
            started.append(worker)
            if wait_for_nodes(gcs, 2, node_env, node=worker):
                break
            time.sleep(15)  # a load spike (another job's start) passes before the next try
        else:
            pytest.fail(f"{WORKER_NODE_ATTEMPTS} Ray worker nodes in a row did not join; the last one's log:\n"
                        f"{worker.log_tail()}")
        yield {"address": address, "ray_tmpdir": f"/tmp/rbh{os.getpid()}", "gcs": gcs, "bucket": bucket, "prod": prod, "endpoint": s3_server,
               "tracking_uri": tracking_uri, "docs": docs, "values": values, "cwd": cwd, "root": root,
               "truth": truth, "env": node_env}
    finally:
        stop_all(list(reversed(started)))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def train_job(box):
    """The chart's training RayJob entrypoint and runtime environment, submitted with Ray's job client."""
    from ray.job_submission import JobSubmissionClient

    rayjob = _rayjob(box["docs"], "train")
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    client = JobSubmissionClient(box["address"])
    job_id = client.submit_job(entrypoint=rayjob["spec"]["entrypoint"], runtime_env=runtime_env)
    status = wait_for_job(client, job_id, timeout=900)
    return {"status": status, "logs": client.get_job_logs(job_id), "entrypoint": rayjob["spec"]["entrypoint"]}


def test_chart_training_job_succeeds_with_its_run_on_s3_and_a_registered_model(box, train_job):
    from mlflow.tracking import MlflowClient

    assert train_job["status"] == "SUCCEEDED", train_job["logs"][-5000:]
    run = "prod/runs/box-train/"
    keys = _keys(box["endpoint"], box["bucket"], run)
    for name in ("config.yaml", "history.jsonl", "result.json", "momentum_encoder.safetensors",
                 "labels/index.parquet"):
        assert run + name in keys, sorted(keys)[:40]
    assert any(k.startswith(run + "checkpoint_") for k in keys)
    client = MlflowClient(box["tracking_uri"])
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == "1"
    # the server proxies artifacts into the bucket: the registered model's files are there
    artifacts = _keys(box["endpoint"], box["bucket"], "mlflow-artifacts/")
    assert any(k.endswith("weights.safetensors") for k in artifacts), sorted(artifacts)[:20]
    history = [json.loads(line) for line in _boto(box["endpoint"]).get_object(
        Bucket=box["bucket"], Key=run + "history.jsonl")["Body"].read().decode().splitlines() if line.strip()]
    assert [h["step"] for h in history if "loss/total" in h] == [4, 8]
    # the console and the job log carry the project's progress, not the raylet's worker-pool advice
    assert "[train] step" in train_job["logs"]
    assert "worker processes have been started" not in train_job["logs"]


def test_jobs_leave_their_working_directory_unchanged(box, train_job):
    assert train_job["status"] == "SUCCEEDED"
    assert sorted(p.name for p in box["cwd"].iterdir()) == []


@pytest.mark.slow
def test_chart_retraining_job_continues_from_the_champion_and_registers_a_version(box, train_job):
    """`ray job submit` (Ray's CLI) with the chart's retraining entrypoint; its config is an object in
    the bucket, its state, sources and suite are all under the storage URI."""
    from mlflow.tracking import MlflowClient

    assert train_job["status"] == "SUCCEEDED", "the retraining continues from the training job's champion"
    prod, shards = box["prod"], f"{box['prod']}/shards"
    config = {
        "name": MODEL_NAME, "state_dir": f"{prod}/retrain", "cycle_format": "%Y%m%d",
        "sources": [{"format": "luperson_nl", "root": f"{prod}/incoming/synth_video",
                     "out": f"{shards}/video_incoming", "dataset": "video_incoming", "workers": 0}],
        "train": {"recipe": "recipes/dynamix_demo.yaml",
                  "overrides": ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "labeling.pool_size=1",
                                *_tiny_recipe_overrides(shards, box["truth"], 4),
                                "labeling.ground_truth=[]"]},  # the incoming videos have none
        "suite": f"{prod}/raw/synth_target", "export_onnx": False,
    }
    _boto(box["endpoint"]).put_object(Bucket=box["bucket"], Key="prod/config/retrain.yaml",
                                      Body=yaml.safe_dump(config).encode())
    rayjob = _rayjob(box["docs"], "retrain")
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", box["address"],
           "--runtime-env-json", json.dumps(runtime_env), "--", *shlex.split(rayjob["spec"]["entrypoint"])]
    out = subprocess.run(cmd, env={**box["env"], "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=1200,
                         cwd=box["root"])
    if out.returncode != 0 or "succeeded" not in out.stdout.lower():
        pytest.fail(f"retraining job failed:\n{out.stdout[-5000:]}\n{out.stderr[-2000:]}")
    assert "[retrain] cycle" in out.stdout and "promote: done" in out.stdout
    assert "View run" not in out.stdout  # the console shows the project's progress, not MLflow's links
    journals = [k for k in _keys(box["endpoint"], box["bucket"], "prod/retrain/") if k.endswith("journal.json")]
    assert len(journals) == 1
    journal = json.loads(_boto(box["endpoint"]).get_object(Bucket=box["bucket"], Key=journals[0])["Body"].read())
    assert journal["finished"] and journal["steps"]["base"]["outputs"]["champion_version"] == "1"
    assert journal["steps"]["base"]["outputs"]["weights"].startswith(prod)  # read by the workers from the bucket
    assert journal["steps"]["register"]["outputs"]["version"] == "2"
    client = MlflowClient(box["tracking_uri"])
    assert client.get_model_version(MODEL_NAME, "2").tags.get("dynamix.retrain_cycle")
    assert sorted(p.name for p in box["cwd"].iterdir()) == []


@pytest.mark.slow
def test_dynamix_submit_wait_pretraining_keeps_its_run_on_s3(box):
    prod, shards = box["prod"], f"{box['prod']}/shards"
    view = [f"data.view{i}.{k}={v}" for i in (1, 2) for k, v in (("height", 32), ("width", 16))]
    args = ["pretrain", "--config", "pretrain_demo", "--run-name", "box-pretrain", "--storage", f"{prod}/runs",
            "--set", "run.max_steps=8", "--set", "run.log_every=4", "--set", "run.checkpoint_every=8",
            "--set", "run.monitor_every=8", "--set", f"data.single=[{shards}/synth_video]",
            "--set", f"data.monitor=[{shards}/synth_target]", "--set", "data.batch_size=8",
            "--set", "data.buffer_videos=4", "--set", "data.max_images_per_video=2",
            *[a for v in view for a in ("--set", v)], "--set", "data.prefetch_batches=1",
            "--set", "model.backbone=test_resnet", "--set", "model.img_size=[32,16]",
            "--set", "objective.dim=16", "--set", "objective.mlp_dim=32", "--set", "eval.max_rank=10",
            "--set", "scaling.max_failures=0"]
    out = subprocess.run([str(VENV_BIN / "dynamix"), "submit", "--address", box["address"], "--wait", "--", *args],
                         env={**box["env"], "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=900,
                         cwd=box["root"])
    if out.returncode != 0:
        pytest.fail(f"pre-training job failed:\n{out.stdout[-5000:]}\n{out.stderr[-2000:]}")
    keys = _keys(box["endpoint"], box["bucket"], "prod/runs/box-pretrain/")
    for name in ("config.yaml", "history.jsonl", "result.json", "backbone.safetensors", "report.html"):
        assert f"prod/runs/box-pretrain/{name}" in keys, sorted(keys)[:40]
    assert sorted(p.name for p in box["cwd"].iterdir()) == []


def test_a_job_the_cluster_cannot_hold_says_so_in_one_line(box):
    """8 trainers of 1 CPU on a cluster of 2 nodes x 2 CPUs: the job says what it asked for and what the
    cluster has at once, then fails after scaling.resources_timeout_s, instead of waiting silently."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(box["address"])
    shards = f"{box['prod']}/shards"
    sets = ["scaling.num_workers=8", "scaling.cpus_per_worker=1", "scaling.resources_timeout_s=5",
            *_tiny_recipe_overrides(shards, box["truth"], 4)]
    entrypoint = ("dynamix train --config dynamix_demo --run-name box-too-big --storage " + f"{box['prod']}/runs "
                  + " ".join(f"--set {shlex.quote(s)}" for s in sets))
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": box["tracking_uri"]}})
    status = wait_for_job(client, job_id, timeout=300)
    logs = client.get_job_logs(job_id)
    assert status == "FAILED", logs[-3000:]
    asked = [ln for ln in logs.splitlines() if "waiting up to 5 s for resources" in ln]
    assert len(asked) == 1 and "8 trainers x 1 CPU" in asked[0] and "2 node(s), 4 CPU" in asked[0], logs[-3000:]
    error = [ln for ln in logs.splitlines() if ln.startswith("dynamix train: error:")]
    assert len(error) == 1 and "8 trainers x 1 CPU" in error[0] and "Traceback" not in logs, logs[-3000:]


def test_a_command_beside_a_ray_start_head_runs_locally_unless_it_is_told_to_join(box):
    """Without --address or RAY_ADDRESS a command starts its own local instance even on a machine where
    `ray start --head` runs (plain ray.init() would join that head and refuse the local CPU count);
    `--address auto` joins the head `ray start` started (both nodes of the cluster are then seen)."""
    code = ("import sys, ray; from pipelines.ray_cluster import connect; "
            "where = connect(sys.argv[1] or None, local_cpus=1); "
            "print(where.split()[0], sum(1 for n in ray.nodes() if n['Alive']))")
    env = {**box["env"], "RAY_TMPDIR": box["ray_tmpdir"]}  # where `ray start` recorded the head
    env.pop("RAY_ADDRESS", None)
    for address, expected in (("", "local 1"), ("auto", "cluster 2")):
        out = subprocess.run([str(VENV_BIN / "python"), "-c", code, address], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == expected, (address, out.stdout, out.stderr[-2000:])


# ---- the job commands (`dynamix submit / status / logs / stop`) against the same cluster ----


def _dynamix(box, args, timeout=300):
    return subprocess.run([str(VENV_BIN / "dynamix"), *args], env=box["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def test_submit_wait_status_logs(box):
    address = box["address"]
    out = _dynamix(box, ["submit", "--address", address, "--working-dir", str(REPO_ROOT), "--env", "DX_MARK=hello-job",
                         "--wait", "--", "status", "--help"])
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    assert "the id printed by dynamix submit" in out.stdout  # the job's own output, streamed back
    st = _dynamix(box, ["status", "--address", address, job_id])
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "dynamix status --help" in st.stdout
    logs = _dynamix(box, ["logs", "--address", address, job_id])
    assert "show the status of a submitted job" in logs.stdout.lower()


def test_failing_job_reports_failed(box):
    out = _dynamix(box, ["submit", "--address", box["address"], "--wait", "--", "status", "--address",
                         "http://127.0.0.1:9", "nojob"])
    assert out.returncode == 1
    assert "FAILED" in out.stderr


def test_stop_a_running_job(box):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(box["address"])
    # the box ran a job before any test (wait_until_runs_a_job): its job agent is up
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -c 'import time; print(\"started\", flush=True); time.sleep(600)'")
    deadline = time.monotonic() + 60
    while "started" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, client.get_job_info(job_id)
        time.sleep(0.5)
    out = _dynamix(box, ["stop", "--address", box["address"], job_id])
    assert out.returncode == 0 and "stop requested" in out.stdout
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id)) not in ("STOPPED", "JobStatus.STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_bad_input_is_a_clear_error(box, tmp_path):
    unpinned = tmp_path / "req.txt"
    unpinned.write_text("numpy\n")
    out = _dynamix(box, ["submit", "--address", box["address"], "--requirements", str(unpinned), "--", "status", "x"])
    assert out.returncode == 2 and "pin every package" in out.stderr
    out = _dynamix(box, ["submit", "--address", box["address"], "--", "rm", "-rf", "/"])
    assert out.returncode == 2 and "dynamix subcommand" in out.stderr
    out = _dynamix(box, ["status", "--address", "http://127.0.0.1:9", "raysubmit_x"])
    assert out.returncode == 2 and "127.0.0.1:9" in out.stderr


def test_follow_streams_only_new_output(box, monkeypatch):
    """`dynamix logs --follow` reads the log-tail stream: while following, the full log is never
    fetched again (job_logs is made to fail), and every line arrives once, in order."""
    import services.jobs as jobs
    from ray.job_submission import JobSubmissionClient

    script = "import time\nfor i in range(4):\n    print(f'line-{i}', flush=True); time.sleep(0.5)"
    job_id = JobSubmissionClient(box["address"]).submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(script)}")

    def no_full_fetch(*_):
        raise AssertionError("follow fetched the whole log again")

    monkeypatch.setattr(jobs, "job_logs", no_full_fetch)
    text = "".join(jobs.follow_logs(box["address"], job_id))
    assert [ln for ln in text.splitlines() if ln.startswith("line-")] == [f"line-{i}" for i in range(4)]
