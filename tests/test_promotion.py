"""Promotion: the champion alias moves only to a challenger that scores better on the same suite;
decisions and scores are recorded as version tags; failures leave the aliases untouched."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mlflow")

from dynamix_core.data.images import decode_image  # noqa: E402
from dynamix_core.data.transforms import TransformConfig, ViewTransform  # noqa: E402
from dynamix_core.evaluation import evaluate_features  # noqa: E402
from dynamix_core.model import ModelConfig, build_encoder, save_weights  # noqa: E402
from pipelines.commands import promote as promote_cmd  # noqa: E402
from services.promotion import CHAMPION, PREVIOUS_CHAMPION, promote  # noqa: E402
from services.registry import register_model, registry_client  # noqa: E402

NAME = "reid-promo"
IMG = (32, 16)
CFG = ModelConfig(backbone="test_vit", img_size=IMG, drop_path_rate=0.0)
NUM_IDS, NUM_CAMS = 4, 2


def reference_map(q_BD, g_BD, q_pids, g_pids, q_cams, g_cams) -> float:
    """mAP from the definition (SPEC 3), one query at a time: drop same-pid-same-camera gallery
    entries, rank by cosine distance (stable), AP = mean of precision at each positive's rank."""
    aps = []
    for i in range(len(q_BD)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        dist = 1.0 - g_BD[keep] @ q_BD[i]
        rel = (g_pids[keep] == q_pids[i])[np.argsort(dist, kind="stable")]
        if rel.any():
            hits = np.flatnonzero(rel)
            aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
    return float(np.mean(aps))


class ChannelSuite:
    """Fixed images whose identity lives in the red channel and whose camera lives, much stronger,
    in the green channel. A model that only sees red retrieves by identity (high mAP); one that
    only sees green retrieves by camera (low mAP). Query = the first image of each (identity,
    camera), gallery = the second."""

    name = "channel-suite"

    def __init__(self):
        rng = np.random.default_rng(0)
        identity = rng.standard_normal((NUM_IDS, *IMG)).astype(np.float32)
        camera = 3 * rng.standard_normal((NUM_CAMS, *IMG)).astype(np.float32)
        self.splits = {}
        for split in ("query", "gallery"):
            pids, cams = np.meshgrid(np.arange(NUM_IDS), np.arange(NUM_CAMS), indexing="ij")
            pids, cams = pids.ravel(), cams.ravel()
            img_NCHW = 0.1 * rng.standard_normal((len(pids), 3, *IMG)).astype(np.float32)
            img_NCHW[:, 0] += identity[pids]
            img_NCHW[:, 1] += camera[cams]
            self.splits[split] = (img_NCHW, pids, cams)

    def __call__(self, embed):  # preprocessed float32 (B, 3, H, W): the model's tensor input
        (q_img, q_pids, q_cams), (g_img, g_pids, g_cams) = self.splits["query"], self.splits["gallery"]
        return evaluate_features(embed(q_img), embed(g_img), q_pids, g_pids, q_cams, g_cams)


class FailingSuite:
    name = "failing-suite"

    def __call__(self, embed):
        raise RuntimeError("gallery images unreadable")


def channel_model(seed: int, channel: int):
    """A random-init encoder whose patch embedding reads only ``channel``."""
    torch.manual_seed(seed)
    encoder = build_encoder(CFG).eval()
    with torch.no_grad():
        weight = encoder.backbone.patch_embed.proj.weight
        keep = weight[:, channel].clone()
        weight.zero_()
        weight[:, channel] = keep
    return encoder


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1 and 3 see only the camera channel, 2 and 4 only the identity channel (4 gets its
    artifact corrupted in the test); ``expected`` holds each one's reference mAP on the ChannelSuite,
    computed from the training-side encoders."""
    tmp = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{tmp}/mlflow.db"
    suite = ChannelSuite()
    (q_img, q_pids, q_cams), (g_img, g_pids, g_cams) = suite.splits["query"], suite.splits["gallery"]
    expected = {}
    for version, (seed, channel) in enumerate([(0, 1), (1, 0), (2, 1), (3, 0)], start=1):
        encoder = channel_model(seed, channel)
        save_weights(encoder, tmp / f"v{version}.safetensors")
        registered = register_model(tmp / f"v{version}.safetensors", CFG, NAME, uri,
                                    artifact_location=str(tmp / "artifacts"), export_onnx=False)
        assert registered.version == str(version)
        with torch.no_grad():
            q_BD, g_BD = (encoder.embed(torch.from_numpy(x)).numpy() for x in (q_img, g_img))
        expected[str(version)] = reference_map(q_BD, g_BD, q_pids, g_pids, q_cams, g_cams)
    # the fixture is only meaningful if the identity-channel models really are better
    assert min(expected["2"], expected["4"]) > max(expected["1"], expected["3"]) + 0.2
    return {"tmp": tmp, "uri": uri, "suite": suite, "expected": expected, "client": registry_client(uri)}


def aliases(client) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def promotion_tags(client, version: str) -> dict[str, str]:
    tags = client.get_model_version(NAME, version).tags
    return {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}


def corrupt_weights(client, version: str) -> None:
    """Overwrite the stored weights artifact of ``version`` with garbage."""
    model_id = client.get_model_version(NAME, version).source.rsplit("/", 1)[-1]
    location = client.get_logged_model(model_id).artifact_location.removeprefix("file://")
    (Path(location) / "artifacts" / "weights.safetensors").write_bytes(b"not a safetensors file")


def test_promotion_sequence(registry):
    """One registry walked through the cases in order (each step depends on the aliases left by
    the previous one)."""
    client, uri, suite, expected = registry["client"], registry["uri"], registry["suite"], registry["expected"]

    # no champion yet: the first challenger is promoted whatever its score
    first = promote(NAME, 1, suite, tracking_uri=uri)
    assert (first.decision, first.champion_version, first.champion_score) == ("promoted", None, None)
    assert aliases(client) == {CHAMPION: "1"}
    tags = promotion_tags(client, "1")
    assert tags["decision"] == "promoted" and tags["champion_version"] == "" and tags["champion_score"] == ""
    assert float(tags["challenger_score"]) == pytest.approx(expected["1"], abs=1e-5)

    # better, but not by the margin: rejected, nothing moves
    by_margin = promote(NAME, 2, suite, tracking_uri=uri, margin=1.0)
    assert by_margin.decision == "rejected" and aliases(client) == {CHAMPION: "1"}
    assert by_margin.challenger_score == pytest.approx(expected["2"], abs=1e-5)
    assert by_margin.champion_score == pytest.approx(expected["1"], abs=1e-5)

    # better: promoted; the replaced champion stays addressable as previous-champion
    better = promote(NAME, 2, suite, tracking_uri=uri, margin=0.01)
    assert better.decision == "promoted"
    assert aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    tags = promotion_tags(client, "2")
    assert tags["decision"] == "promoted" and tags["champion_version"] == "1" and tags["margin"] == "0.01"
    assert float(tags["challenger_score"]) == pytest.approx(expected["2"], abs=1e-5)
    assert float(tags["champion_score"]) == pytest.approx(expected["1"], abs=1e-5)
    assert tags["metric"] == "mAP" and tags["suite"] == "channel-suite" and tags["timestamp"].endswith("+00:00")

    # worse: rejected
    worse = promote(NAME, 3, suite, tracking_uri=uri)
    assert worse.decision == "rejected" and "stays 2" in worse.message
    assert aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    tags = promotion_tags(client, "3")
    assert tags["decision"] == "rejected" and tags["champion_version"] == "2"
    assert float(tags["challenger_score"]) == pytest.approx(expected["3"], abs=1e-5)

    # the suite raises: error recorded, aliases untouched
    failed = promote(NAME, 3, FailingSuite(), tracking_uri=uri)
    assert failed.decision == "error" and "gallery images unreadable" in failed.message
    assert aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    tags = promotion_tags(client, "3")
    assert tags["decision"] == "error" and tags["challenger_score"] == "" and "RuntimeError" in tags["message"]

    # a (would-be better) challenger whose artifact is corrupt: error, aliases untouched
    corrupt_weights(client, "4")
    broken = promote(NAME, 4, suite, tracking_uri=uri)
    assert broken.decision == "error" and aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    assert promotion_tags(client, "4")["decision"] == "error"

    # the champion itself as challenger: nothing to do
    assert promote(NAME, 2, suite, tracking_uri=uri).decision == "rejected"
    assert aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}


def test_unknown_version_is_a_usage_error(registry):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        promote(NAME, 99, registry["suite"], tracking_uri=registry["uri"])


def write_market_suite(root: Path) -> None:
    """A tiny Market-1501 layout: query/ and bounding_box_test/ with 4 ids x 2 cameras."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (NUM_IDS, 64, 32, 3))
    for folder, index in (("query", 0), ("bounding_box_test", 1)):
        (root / folder).mkdir(parents=True)
        for pid in range(NUM_IDS):
            for cam in range(NUM_CAMS):
                noisy = np.clip(base[pid] + rng.normal(0, 20, base[pid].shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(root / folder / f"{pid + 1:04d}_c{cam + 1}s1_{index:06d}_00.jpg", quality=95)


def test_promote_command_on_an_image_folder_suite(registry, capsys):
    tmp, uri = registry["tmp"], registry["uri"]
    suite_root = tmp / "market"
    write_market_suite(suite_root)
    encoder = channel_model(seed=7, channel=0)
    save_weights(encoder, tmp / "cli.safetensors")
    prep = TransformConfig(height=IMG[0], width=IMG[1], mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.25))  # not ImageNet's
    register_model(tmp / "cli.safetensors", CFG, "reid-cli", uri, export_onnx=False, preprocessing=prep)

    parser = argparse.ArgumentParser()
    promote_cmd.add_arguments(parser)
    args = parser.parse_args(["--name", "reid-cli", "--version", "1", "--suite", str(suite_root),
                              "--tracking-uri", uri, "--batch-size", "3"])
    assert promote_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "challenger  1" in out and "decision: promoted" in out

    # reference: the stored preprocessing as training-time evaluation applies it (decode at the
    # model's size, normalise with the run's mean/std) and mAP from the definition
    view = ViewTransform(prep, "test")
    feats, labels = {}, {}
    for folder in ("query", "bounding_box_test"):
        files = sorted((suite_root / folder).iterdir())
        x = torch.stack([view(decode_image(f.read_bytes(), IMG)) for f in files])
        with torch.no_grad():
            feats[folder] = encoder.embed(x).numpy()
        labels[folder] = (np.array([int(f.name[:4]) for f in files]), np.array([int(f.name[6]) for f in files]))
    expected = reference_map(feats["query"], feats["bounding_box_test"], labels["query"][0],
                             labels["bounding_box_test"][0], labels["query"][1], labels["bounding_box_test"][1])
    tags = registry["client"].get_model_version("reid-cli", "1").tags
    assert float(tags["promotion.challenger_score"]) == pytest.approx(expected, abs=1e-5)
    assert {k: str(v) for k, v in registry["client"].get_registered_model("reid-cli").aliases.items()} == {CHAMPION: "1"}
