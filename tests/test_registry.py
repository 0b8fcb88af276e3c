"""Model registry: a registered version reproduces the training code's embeddings (pyfunc in a fresh
process, ONNX under onnxruntime), carries its signature, weights and hash tags, and is registered once."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml

pytest.importorskip("mlflow")

from dynamix_core.model import ModelConfig, WeightsError, build_encoder, save_weights  # noqa: E402
from pipelines.commands import register as register_cmd  # noqa: E402
from services.registry import download_onnx, register_model, registry_client, tracking  # noqa: E402

NAME = "reid-test"
IMG = (32, 16)
CFG = ModelConfig(backbone="test_vit", img_size=IMG, drop_path_rate=0.0)  # timm's 300k-parameter test ViT, D = 64


def make_weights(path, seed: int):
    """A random-init encoder (BNNeck statistics perturbed so the neck is not the identity) saved to ``path``."""
    torch.manual_seed(seed)
    encoder = build_encoder(CFG)
    encoder.neck.bn.running_mean.normal_()
    encoder.neck.bn.running_var.uniform_(0.5, 2.0)
    save_weights(encoder, path)
    return encoder.eval()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One SQLite registry with version 1 (ONNX included) as ``champion``; its training-side encoder."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    encoder = make_weights(tmp / "v1.safetensors", seed=0)
    version = register_model(tmp / "v1.safetensors", CFG, NAME, uri, artifact_location=str(tmp / "artifacts"),
                             eval_metrics={"mAP": 0.25})
    registry_client(uri).set_registered_model_alias(NAME, "champion", version.version)
    return {"tmp": tmp, "uri": uri, "encoder": encoder, "version": version}


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, *IMG), dtype=np.float32)


def test_champion_loads_in_a_fresh_process_and_matches_the_training_encoder(registry):
    tmp, x_BCHW = registry["tmp"], images(5, seed=1)
    np.save(tmp / "x.npy", x_BCHW)
    script = textwrap.dedent(f"""
        import sys, numpy as np, mlflow
        mlflow.set_tracking_uri({registry["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        np.save({str(tmp / "y.npy")!r}, model.predict(np.load({str(tmp / "x.npy")!r})))
        print(sys.modules["dynamix_core"].__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=tmp, env={"MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the bundled copy of the encoder code (the model's code/ folder) ran, not this checkout
    assert "/code/dynamix_core/" in proc.stdout.strip().splitlines()[-1]
    got_BD = np.load(tmp / "y.npy")
    with torch.no_grad():
        expected_BD = registry["encoder"].embed(torch.from_numpy(x_BCHW)).numpy()
    assert got_BD.dtype == np.float32 and got_BD.shape == (5, 64)
    assert np.abs(got_BD - expected_BD).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got_BD, axis=1), 1.0, atol=1e-5)


def test_onnx_export_matches_the_training_encoder_with_a_dynamic_batch(registry):
    import onnxruntime as ort

    path = download_onnx(NAME, "champion", registry["uri"], registry["tmp"] / "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the export used batch 2
        x_BCHW = images(batch, seed=batch)
        got_BD = session.run(None, {session.get_inputs()[0].name: x_BCHW})[0]
        with torch.no_grad():
            expected_BD = registry["encoder"].embed(torch.from_numpy(x_BCHW)).numpy()
        assert got_BD.shape == (batch, 64)
        assert np.abs(got_BD - expected_BD).max() < 1e-4


def test_version_carries_signature_example_weights_and_tags(registry):
    import mlflow

    tmp, uri = registry["tmp"], registry["uri"]
    with tracking(uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp / "dl"))
    info = mlflow.models.Model.load(local)
    (out,) = info.signature.outputs.inputs
    assert info.signature.inputs is None  # the model takes several input forms and checks them itself
    assert (out.type, out.shape) == (np.dtype(np.float32), (-1, 64))
    example = np.asarray(info.load_input_example(local))
    assert example.dtype.kind in "ui" and example.shape == (1, *IMG, 3)  # one raw image (JSON: ints)
    # registered from a ModelConfig alone: the transform defaults at the model's size
    assert json.loads(open(f"{local}/artifacts/preprocessing.json").read()) == {
        "height": IMG[0], "width": IMG[1], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

    stored = safetensors.numpy.load_file(f"{local}/artifacts/weights.safetensors")
    own = registry["encoder"].state_dict()
    assert stored.keys() == own.keys()
    assert all(np.array_equal(stored[k], own[k].numpy()) for k in own)
    assert json.loads(open(f"{local}/artifacts/model_config.json").read())["backbone"] == "test_vit"

    tags = registry_client(uri).get_model_version(NAME, "1").tags
    assert tags["weights_sha256"] == hashlib.sha256((tmp / "v1.safetensors").read_bytes()).hexdigest()
    assert tags["source_run_id"] == registry["version"].run_id
    assert float(tags["eval.mAP"]) == 0.25


def test_registering_the_same_weights_again_returns_the_existing_version(registry):
    tmp, uri = registry["tmp"], registry["uri"]
    again = register_model(tmp / "v1.safetensors", CFG, NAME, uri, export_onnx=False)
    assert (again.version, again.created) == ("1", False)
    assert len(registry_client(uri).search_model_versions(f"name = '{NAME}'")) == 1


def test_weights_that_do_not_match_the_config_are_rejected_before_logging(registry):
    tmp, uri = registry["tmp"], registry["uri"]
    other = ModelConfig(backbone="test_vit", img_size=(48, 16), drop_path_rate=0.0)  # another position grid
    with pytest.raises(WeightsError, match="pos_embed"):
        register_model(tmp / "v1.safetensors", other, "reid-mismatch", uri, export_onnx=False)
    assert registry_client(uri).search_model_versions("name = 'reid-mismatch'") == []


def test_register_into_a_training_run_with_metrics(registry, capfd):
    import mlflow

    tmp, uri = registry["tmp"], registry["uri"]
    capfd.readouterr()
    make_weights(tmp / "v_run.safetensors", seed=5)
    client = registry_client(uri)
    experiment = client.create_experiment("train", artifact_location=str(tmp / "train_artifacts"))
    run_id = client.create_run(experiment).info.run_id
    version = register_model(tmp / "v_run.safetensors", CFG, "reid-run", uri, run_id=run_id, export_onnx=False,
                             eval_metrics={"mAP": 0.5, "rank1": 0.75}, tags={"recipe": "dynamix"})
    assert version.created and version.run_id == run_id
    assert client.get_run(run_id).data.metrics == {"mAP": 0.5, "rank1": 0.75}
    tags = client.get_model_version("reid-run", version.version).tags
    assert (tags["recipe"], tags["eval.rank1"], tags["source_run_id"]) == ("dynamix", "0.75", run_id)
    assert mlflow.active_run() is None
    err = capfd.readouterr().err  # MLflow's own "Successfully registered model" / "Created version" lines
    assert "Successfully registered" not in err and "Created version" not in err, err


def test_register_command_reads_a_training_config(registry, capsys):
    tmp, uri = registry["tmp"], registry["uri"]
    make_weights(tmp / "v_cli.safetensors", seed=6)
    (tmp / "train.yaml").write_text(yaml.safe_dump(
        {"model": {"backbone": "test_vit", "img_size": list(IMG), "drop_path_rate": 0.0}, "seed": 3}))
    parser = argparse.ArgumentParser()
    register_cmd.add_arguments(parser)
    argv = ["--weights", str(tmp / "v_cli.safetensors"), "--config", str(tmp / "train.yaml"), "--name", "reid-cli",
            "--tracking-uri", uri, "--no-onnx", "--eval-metric", "mAP=0.3", "--tag", "team=reid"]
    assert register_cmd.run(parser.parse_args(argv)) == 0
    assert "registered: models:/reid-cli/1" in capsys.readouterr().out
    assert register_cmd.run(parser.parse_args(argv)) == 0
    assert "already registered" in capsys.readouterr().out
    tags = registry_client(uri).get_model_version("reid-cli", "1").tags
    assert (tags["team"], tags["eval.mAP"]) == ("reid", "0.3")


def test_register_and_promote_default_to_the_env_or_the_runs_own_store(tmp_path, monkeypatch, capsys):
    from dynamix_core.config import ConfigError
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "test_vit"}, "tracking": {"uri": None}}))
    resolve = register_cmd.resolve_tracking_uri
    with pytest.raises(ConfigError, match="no MLflow store.*pass --tracking-uri"):
        resolve(None, str(run_dir / "config.yaml"))  # the run has not logged anywhere yet
    (run_dir / "mlflow.db").write_bytes(b"")  # where `dynamix train` logs without a tracking URI
    assert resolve(None, str(run_dir / "config.yaml")) == f"sqlite:///{run_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow.db")  # the run would have logged there
    assert resolve(None, str(run_dir / "config.yaml")) == "sqlite:////srv/mlflow.db"
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"tracking": {"uri": "http://mlflow:5000"}}))
    assert resolve(None, str(run_dir / "config.yaml")) == "http://mlflow:5000"  # the run's own setting first
    assert resolve("http://given:5000", str(run_dir / "config.yaml")) == "http://given:5000"
    # promote without any store: one clear error, and no mlflow.db appears in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["promote", "--name", "x", "--version", "1", "--suite", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> np.ndarray:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)


def test_served_champion_embeds_raw_images_with_the_stored_preprocessing(tmp_path):
    """Registered from a training config whose transform is not ImageNet's; loaded from the registry
    and served over HTTP by MLflow's scoring server, raw images (uint8 pixels, JPEG bytes, base64 in
    JSON) give the training encoder's embeddings of the normalised tensors, computed here by hand."""
    import base64
    import io
    import threading

    import mlflow
    import uvicorn
    from mlflow.pyfunc.scoring_server import init as scoring_app
    from PIL import Image

    mean, std = np.array([0.2, 0.5, 0.7], np.float32), np.array([0.3, 0.2, 0.25], np.float32)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    encoder = make_weights(tmp_path / "w.safetensors", seed=3)
    run_config = tmp_path / "config.yaml"  # what `dynamix train` saves beside the run
    run_config.write_text(yaml.safe_dump({"model": dict(backbone="test_vit", img_size=list(IMG), drop_path_rate=0.0),
                                          "data": {"transform": {"height": IMG[0], "width": IMG[1],
                                                                 "mean": mean.tolist(), "std": std.tolist()}}}))
    version = register_model(tmp_path / "w.safetensors", str(run_config), "reid-raw", uri,
                             artifact_location=str(tmp_path / "artifacts"), export_onnx=False)
    registry_client(uri).set_registered_model_alias("reid-raw", "champion", version.version)

    pixels_BHW3 = np.random.default_rng(5).integers(0, 256, (3, *IMG, 3), dtype=np.uint8)
    jpegs = []
    for img in pixels_BHW3:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    decoded_BHW3 = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])

    def reference(img_BHW3):  # the normalised tensors, by hand
        x_BCHW = ((img_BHW3.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
        with torch.no_grad():
            return encoder.embed(torch.from_numpy(np.ascontiguousarray(x_BCHW))).numpy()

    with tracking(uri):
        model = mlflow.pyfunc.load_model("models:/reid-raw@champion")
    assert np.abs(model.predict(pixels_BHW3) - reference(pixels_BHW3)).max() < 1e-5
    assert np.abs(model.predict(jpegs) - reference(decoded_BHW3)).max() < 1e-5
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) pixels or JPEG/PNG bytes"):
        model.predict([np.zeros((4, 4), np.uint8)])

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(scoring_app(model), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        url = f"http://127.0.0.1:{port}/invocations"
        b64 = [[base64.b64encode(j).decode()] for j in jpegs]  # the README's request
        served = _post(url, {"dataframe_split": {"columns": ["image"], "data": b64}})
        assert served.shape == (3, 64) and np.abs(served - reference(decoded_BHW3)).max() < 1e-5
        served = _post(url, {"inputs": pixels_BHW3.tolist()})
        assert np.abs(served - reference(pixels_BHW3)).max() < 1e-5
    finally:
        server.should_exit = True
        thread.join(10)
