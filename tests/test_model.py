"""Encoder, momentum encoder and weight loading on tiny backbones (CPU, a few seconds)."""

from __future__ import annotations

import collections

import pytest
import torch

import dynamix_core  # noqa: F401  (torchvision shim before timm)
import timm
from dynamix_core.config import ConfigError
from dynamix_core.model import (
    ModelConfig,
    MomentumEncoder,
    ReIDEncoder,
    WeightsError,
    build_encoder,
    create_backbone,
    ema_update,
    load_weights,
    save_weights,
)

IMG = (32, 16)


def tiny_vit(img_size=IMG) -> ReIDEncoder:
    return build_encoder(ModelConfig(backbone="vit_tiny_patch16_224", img_size=img_size, drop_path_rate=0.0))


def images(n: int, seed: int = 0, size=IMG) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- encoder


def test_vit_encoder_shapes_and_normalised_embeddings():
    enc = tiny_vit()
    assert enc.backbone.patch_embed.grid_size == (2, 1)
    assert enc.embed_dim == 192
    assert enc(images(3)).shape == (3, 192)
    norms = enc.embed(images(3)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))


def test_cnn_backbone_takes_no_img_size():
    enc = build_encoder(ModelConfig(backbone="resnet18", img_size=IMG, drop_path_rate=0.0))
    assert enc(images(2)).shape == (2, 512)


def test_create_backbone_reraises_unrelated_type_errors(monkeypatch):
    def broken_builder(name, **kwargs):
        raise TypeError("bad depth")

    monkeypatch.setattr(timm, "create_model", broken_builder)
    with pytest.raises(TypeError, match="bad depth"):
        create_backbone("vit_tiny_patch16_224", IMG, drop_path_rate=0.0)


def test_bnneck_bias_is_frozen_at_zero():
    enc = tiny_vit()
    assert not enc.neck.bn.bias.requires_grad and enc.neck.bn.weight.requires_grad
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0)
    enc.embed(images(4)).sum().backward()
    opt.step()
    assert enc.neck.bn.bias.grad is None
    assert (enc.neck.bn.bias == 0).all()


def test_model_config_validation():
    with pytest.raises(ConfigError, match="model.ema_momentum"):
        ModelConfig(ema_momentum=1.0)
    with pytest.raises(ConfigError, match="model.img_size"):
        ModelConfig(img_size=(0, 128))


# ---------------------------------------------------------------- momentum encoder


def test_ema_matches_closed_form_and_keeps_its_own_buffers():
    online = tiny_vit()
    momentum = MomentumEncoder(online, momentum=0.9)
    start = {k: v.clone() for k, v in momentum.model.named_parameters()}
    with torch.no_grad():  # move the online model away from the copy, then keep it fixed
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online.neck.bn.running_mean.fill_(3.0)
        online.neck.bn.running_var.fill_(2.0)
    for _ in range(3):
        momentum.update(online)
    # constant target: theta~_k = m^k theta~_0 + (1 - m^k) theta
    for name, p in online.named_parameters():
        expected = 0.9**3 * start[name] + (1 - 0.9**3) * p
        torch.testing.assert_close(dict(momentum.model.named_parameters())[name], expected, rtol=1e-5, atol=1e-6)
    # f~'s BatchNorm statistics are its own (tracked by its key forwards), never copied from f
    torch.testing.assert_close(momentum.model.neck.bn.running_mean, torch.zeros(192))
    torch.testing.assert_close(momentum.model.neck.bn.running_var, torch.ones(192))


def test_momentum_keys_use_batch_statistics_and_track_their_own():
    """Keys normalise the BNNeck with the key batch's statistics (MoCo practice), computed here from
    the equation on the pre-BN features, and move f~'s running statistics by BatchNorm's momentum."""
    online = tiny_vit()
    momentum = MomentumEncoder(online)
    x = images(6)
    with torch.no_grad():
        pre_BD = momentum.model.backbone(x)
    bn = momentum.model.neck.bn
    mean, var = pre_BD.mean(0), pre_BD.var(0, unbiased=False)
    expected = torch.nn.functional.normalize((pre_BD - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias, dim=1)
    keys = momentum.keys(x)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn.momentum * mean, rtol=1e-4, atol=1e-6)
    assert not momentum.model.training and not bn.training  # back to eval for embed()
    # deployment embeddings use the running statistics: they no longer depend on the batch
    torch.testing.assert_close(momentum.embed(x[:1]), momentum.embed(x)[:1], rtol=1e-5, atol=1e-6)


def test_momentum_encoder_is_frozen_eval_and_batch_independent():
    online = tiny_vit()
    momentum = MomentumEncoder(online)
    momentum.train()
    assert not momentum.model.training
    assert not any(p.requires_grad for p in momentum.parameters())
    x = images(5)
    keys = momentum.embed(x)
    assert not keys.requires_grad
    # eval-mode BNNeck: a key does not depend on the rest of the batch
    torch.testing.assert_close(momentum.embed(x[:1]), keys[:1], rtol=1e-5, atol=1e-6)


def test_ema_update_rejects_a_wrapped_model():
    online = tiny_vit()
    wrapped = torch.nn.Sequential(collections.OrderedDict(module=online))
    with pytest.raises(ValueError, match="unwrapped online model"):
        ema_update(wrapped, MomentumEncoder(online).model)


# ---------------------------------------------------------------- weights


def test_weights_round_trip(tmp_path):
    enc = tiny_vit()
    with torch.no_grad():
        enc.neck.bn.running_mean.uniform_()
    path = tmp_path / "sub" / "enc.safetensors"
    save_weights(enc, path)
    assert [p.name for p in path.parent.iterdir()] == ["enc.safetensors"]  # no temporary left behind
    other = tiny_vit()
    load_weights(other, path)
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    enc.eval(), other.eval()
    torch.testing.assert_close(enc(images(2)), other(images(2)), rtol=0, atol=0)


def test_torch_checkpoint_with_prefix_and_nesting(tmp_path):
    enc = tiny_vit()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, path)
    other = tiny_vit()
    with pytest.raises(WeightsError, match="strip_prefixes"):
        load_weights(other, path)
    load_weights(other, path, strip_prefixes=["module."])
    assert torch.equal(other.backbone.pos_embed, enc.backbone.pos_embed)


def test_missing_and_unexpected_keys_are_listed_with_counts(tmp_path):
    enc = tiny_vit()
    state = enc.state_dict()
    dropped = sorted(k for k in state if k.startswith("backbone.blocks."))
    kept = {k: v for k, v in state.items() if k not in dropped}
    kept["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(kept, path)
    with pytest.raises(WeightsError) as err:
        load_weights(tiny_vit(), path)
    msg = str(err.value)
    assert f"missing from the file {len(dropped)}: [{dropped[0]}" in msg
    assert f"and {len(dropped) - 10} more" in msg
    assert "unexpected in the file 1: [extra.weight]" in msg
    assert "To fix" in msg
    load_weights(tiny_vit(), path, strict=False)  # non-strict loads what matches


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_weights(tiny_vit(img_size=(48, 16)), path)
    with pytest.raises(WeightsError, match=r"backbone.pos_embed \(file \(1, 4, 192\) vs model \(1, 3, 192\)\)"):
        load_weights(tiny_vit(), path, strict=False)


def test_missing_file_and_non_state_dict_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tiny_vit(), tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch state dict"):
        load_weights(tiny_vit(), garbage)
    bad_safetensors = tmp_path / "garbage.safetensors"
    bad_safetensors.write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(tiny_vit(), bad_safetensors)
    listing = tmp_path / "list.pth"
    torch.save({"epoch": 1, "lr": 0.1}, listing)
    with pytest.raises(WeightsError, match=r"no flat \{name: tensor\} state dict \(top level: \['epoch', 'lr'\]\)"):
        load_weights(tiny_vit(), listing)


def test_backbone_weights_drop_head_and_resample_pos_embed(tmp_path):
    # an "ImageNet-style" checkpoint: square 32x32 input (2x2 grid), a 10-class head
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=(32, 32))
    path = tmp_path / "imagenet.pth"
    torch.save(src.state_dict(), path)
    enc = build_encoder(ModelConfig(backbone="vit_tiny_patch16_224", img_size=IMG, drop_path_rate=0.0,
                                    weights=str(path), weights_scope="backbone"))
    assert enc.backbone.pos_embed.shape == (1, 3, 192)
    torch.testing.assert_close(enc.backbone.pos_embed[:, 0], src.pos_embed[:, 0])  # class token untouched
    assert torch.equal(enc.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------- part (stripe) pooling


@pytest.mark.parametrize("backbone, size", [("test_resnet", (128, 64)), ("vit_tiny_patch16_224", (64, 32))])
def test_stripe_pooling_averages_horizontal_bands_of_the_feature_map(backbone, size):
    cfg = ModelConfig(backbone=backbone, img_size=size, num_stripes=4, drop_path_rate=0.0)
    enc = build_encoder(cfg).eval()
    x = images(3, size=size)
    with torch.no_grad():
        fmap = enc.backbone.forward_features(x)
        if fmap.dim() == 3:  # ViT: (B, prefix + h*w, C) -> (B, C, h, w)
            h, w = enc.backbone.patch_embed.grid_size
            fmap = fmap[:, -h * w:].transpose(1, 2).reshape(3, -1, h, w)
        B, C, H, W = fmap.shape
        # each of the 4 stripes is the mean of H/4 consecutive rows (here H is a multiple of 4)
        expected = fmap.reshape(B, C, 4, H // 4, W).mean(dim=(3, 4)).reshape(B, C * 4)
        bn = enc.neck.bn
        expected = (expected - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        out = enc(x)
    assert enc.embed_dim == C * 4 == out.shape[1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_ibn_a_normalises_half_the_channels_per_image_and_half_per_batch():
    """``model.ibn``: bn1 of every block of layer1-layer3 is IBN-a, checked against the equations
    (instance norm: each image's own per-channel mean and biased variance; batch norm: the batch's),
    and instance normalisation makes those channels blind to a per-image gain. A ViT is refused."""
    from dynamix_core.config import ConfigError
    from dynamix_core.model.encoder import IBN

    enc = build_encoder(ModelConfig(backbone="test_resnet", img_size=(64, 32), num_stripes=2, drop_path_rate=0.0,
                                    ibn=True))
    converted = [blk.bn1 for name in ("layer1", "layer2", "layer3") for blk in getattr(enc.backbone, name)]
    assert converted and all(isinstance(m, IBN) for m in converted)
    assert not any(isinstance(blk.bn1, IBN) for blk in enc.backbone.layer4)

    ibn = converted[0].train()
    torch.manual_seed(0)
    with torch.no_grad():
        ibn.IN.weight.uniform_(0.5, 1.5), ibn.IN.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, ibn.half * 2, 6, 5) * 3 + 1
    out = ibn(x)
    a, b = x[:, :ibn.half], x[:, ibn.half:]
    inst = (a - a.mean(dim=(2, 3), keepdim=True)) / torch.sqrt(a.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
    inst = inst * ibn.IN.weight.view(1, -1, 1, 1) + ibn.IN.bias.view(1, -1, 1, 1)
    batch = (b - b.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(b.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, torch.cat([inst, batch], dim=1), rtol=1e-4, atol=1e-4)
    # one image 3x brighter in every channel: its instance-normalised half does not change
    brighter = x.clone()
    brighter[0] *= 3
    torch.testing.assert_close(ibn(brighter)[0, :ibn.half], out[0, :ibn.half], rtol=1e-3, atol=1e-3)

    with pytest.raises(ConfigError, match="model.ibn"):
        build_encoder(ModelConfig(backbone="test_vit", img_size=(32, 16), drop_path_rate=0.0, ibn=True))


def test_a_backbone_that_cannot_be_built_is_refused_on_the_driver_in_one_line(tmp_path):
    """``dynamix train`` with ``model.ibn`` on a ViT, or a misspelt timm name, ends before Ray starts
    with one ``error:`` line naming the key (exit 2), not a worker traceback."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    for override, key in (("model.backbone=test_vit", "model.ibn"), ("model.backbone=resnet_typo", "model.backbone")):
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "train", "--config", "recipes/multicam_baseline_demo.yaml",
             "--set", override, "--set", f"run.storage={tmp_path}"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and key in lines[0] and "error:" in lines[0], lines
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
