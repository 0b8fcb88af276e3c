"""The vectorised losses against loop references written directly from the SPEC 2.2 equations.

Each reference loops over anchors, positives and denominator terms with scalar float64 torch ops,
so autograd gives reference gradients too: values AND gradients (w.r.t. anchors, keys and
centroids) are compared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynamix_core.config import ConfigError
from dynamix_core.losses import (
    LossConfig,
    anchor_temperatures,
    augmentation_loss,
    camera_centroid_loss,
    instance_loss,
    total_loss,
)

D = 8
# identity 7 has one image (its only positive is its own key); identity 1 spans 3 images
LABELS = [1, 1, 1, 2, 2, 7, 3, 3, 4, 4]
IS_MULTI = [True, True, True, True, True, False, False, False, False, False]
TAU_M, TAU_S = 0.05, 0.1


def unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[d] * b[d] for d in range(D))


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def assert_same(loss, ref, inputs):
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads(loss, *inputs), grads(ref, *inputs)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- Instance loss


def ref_instance(z, zk, y, yk, taus):
    per_anchor = []
    for i in range(len(y)):
        positives = [j for j in range(len(yk)) if yk[j] == y[i]]
        if not positives:
            continue
        denom = sum(torch.exp(dot(z[i], zk[j]) / taus[i]) for j in range(len(yk)))
        terms = [torch.log(torch.exp(dot(z[i], zk[p]) / taus[i]) / denom) for p in positives]
        per_anchor.append(-sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


def test_instance_loss_matches_loop_with_mixed_temperatures():
    z, zk = unit(len(LABELS), 0), unit(len(LABELS), 1)
    y = torch.tensor(LABELS)
    tau_B = anchor_temperatures(torch.tensor(IS_MULTI), TAU_M, TAU_S, dtype=torch.float64)
    taus = [TAU_M if m else TAU_S for m in IS_MULTI]
    assert tau_B.tolist() == taus
    loss = instance_loss(z, y, zk, y, tau_B)
    assert_same(loss, ref_instance(z, zk, LABELS, LABELS, taus), [z, zk])


def test_instance_loss_anchor_without_positive_key_is_left_out():
    # keys from another set: anchor labels 5 and 6 have no key, 7's only key is not its own image
    z, zk = unit(4, 2), unit(5, 3)
    y, yk = [5, 7, 6, 8], [7, 8, 8, 9, 7]
    loss = instance_loss(z, torch.tensor(y), zk, torch.tensor(yk), 0.07)
    assert_same(loss, ref_instance(z, zk, y, yk, [0.07] * 4), [z, zk])


def test_instance_loss_with_no_positive_at_all_is_zero():
    z, zk = unit(2, 4), unit(3, 5)
    loss = instance_loss(z, torch.tensor([1, 2]), zk, torch.tensor([3, 4, 5]), 0.1)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in grads(loss, z, zk))


def test_instance_loss_ignores_autocast():
    z, zk = unit(len(LABELS), 6).detach().float(), unit(len(LABELS), 7).detach().float()
    y = torch.tensor(LABELS)
    exact = instance_loss(z, y, zk, y, TAU_M)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = instance_loss(z, y, zk, y, TAU_M)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- Augmentation loss


def ref_augmentation(zs, zk, y, taus):
    per_anchor = []
    for i in range(len(y)):
        pos = torch.exp(dot(zs[i], zk[i]) / taus[i])
        neg = sum((torch.exp(dot(zs[i], zk[j]) / taus[i]) for j in range(len(y)) if y[j] != y[i]), torch.zeros((), dtype=torch.float64))
        per_anchor.append(-torch.log(pos / (pos + neg)))
    return sum(per_anchor) / len(per_anchor)


def test_augmentation_loss_matches_loop():
    zs, zk = unit(len(LABELS), 10), unit(len(LABELS), 11)
    loss = augmentation_loss(zs, zk, torch.tensor(LABELS), 0.1)
    assert_same(loss, ref_augmentation(zs, zk, LABELS, [0.1] * len(LABELS)), [zs, zk])


def test_augmentation_loss_per_anchor_temperatures():
    zs, zk = unit(len(LABELS), 12), unit(len(LABELS), 13)
    tau_B = anchor_temperatures(torch.tensor(IS_MULTI), 0.07, 0.2, dtype=torch.float64)
    taus = [0.07 if m else 0.2 for m in IS_MULTI]
    assert_same(augmentation_loss(zs, zk, torch.tensor(LABELS), tau_B), ref_augmentation(zs, zk, LABELS, taus), [zs, zk])


def test_augmentation_loss_without_other_identities_is_zero():
    zs, zk = unit(3, 14), unit(3, 15)
    loss = augmentation_loss(zs, zk, torch.tensor([4, 4, 4]), 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert all((g.abs() < 1e-12).all() for g in grads(loss, zs, zk))


# ---------------------------------------------------------------- Camera-centroids loss

# (pid, camid) centroids: pid 1 in cams 0,1,2; pid 2 in cam 3 only; pid 3 in cams 4,5; pid 9 (no anchor) cam 0
CENTROID_PID = [1, 1, 1, 2, 3, 3, 9]
CENTROID_CAM = [0, 1, 2, 3, 4, 5, 0]
# anchors: pid 1 from cams 0, 1 and from a camera without a centroid (6); pid 2 cam 3 (no other camera:
# excluded); pid 3 cam 4; a single-camera anchor of pid 3 (excluded by domain); pid 1 cam 2
ANCHOR_PID = [1, 1, 1, 2, 3, 3, 1]
ANCHOR_CAM = [0, 1, 6, 3, 4, 4, 2]
ANCHOR_MULTI = [True, True, True, True, True, False, True]


def ref_camera_centroid(z, c, pid, cam, multi, cpid, ccam, tau):
    per_anchor = []
    for i in range(len(pid)):
        if not multi[i]:
            continue
        positives = [k for k in range(len(cpid)) if cpid[k] == pid[i] and ccam[k] != cam[i]]
        negatives = [k for k in range(len(cpid)) if cpid[k] != pid[i]]
        if not positives:
            continue
        neg = sum((torch.exp(dot(z[i], c[n]) / tau) for n in negatives), torch.zeros((), dtype=torch.float64))
        terms = []
        for p in positives:
            pos = torch.exp(dot(z[i], c[p]) / tau)
            terms.append(-torch.log(pos / (pos + neg)))
        per_anchor.append(sum(terms) / len(terms))
    if not per_anchor:
        return torch.zeros((), dtype=torch.float64)
    return sum(per_anchor) / len(per_anchor)


def run_camera(z, c, pid, cam, multi, cpid, ccam, tau):
    t = torch.tensor
    return camera_centroid_loss(z, t(pid), t(cam), t(multi), c, t(cpid), t(ccam), tau)


def test_camera_centroid_loss_matches_loop():
    z, c = unit(len(ANCHOR_PID), 20), unit(len(CENTROID_PID), 21)
    args = (ANCHOR_PID, ANCHOR_CAM, ANCHOR_MULTI, CENTROID_PID, CENTROID_CAM, 0.05)
    assert_same(run_camera(z, c, *args), ref_camera_centroid(z, c, *args), [z, c])


def test_camera_centroid_loss_without_negatives_is_finite():
    # only identity 1's centroids exist: positives but no negative -> each term is -log(1) = 0
    z, c = unit(2, 22), unit(3, 23)
    args = ([1, 1], [0, 2], [True, True], [1, 1, 1], [0, 1, 2], 0.05)
    loss = run_camera(z, c, *args)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert_same(loss, ref_camera_centroid(z, c, *args), [z, c])


def test_camera_centroid_loss_with_no_valid_anchor_is_zero():
    # identity 2 is seen by its own camera only; the other anchor is single-camera
    z, c = unit(2, 24), unit(len(CENTROID_PID), 25)
    loss = run_camera(z, c, [2, 1], [3, 0], [True, False], CENTROID_PID, CENTROID_CAM, 0.05)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in grads(loss, z, c))


# ---------------------------------------------------------------- total and config


def test_total_loss_is_the_weighted_sum_and_logs_each_term():
    cfg = LossConfig(weight_instance=2.0, weight_augmentation=0.5, weight_camera_centroid=0.0)
    a = torch.tensor(1.5, requires_grad=True)
    terms = {"instance": a * 1.0, "augmentation": torch.tensor(4.0), "camera_centroid": torch.tensor(9.0)}
    total, logged = total_loss(terms, cfg)
    assert total.item() == pytest.approx(2.0 * 1.5 + 0.5 * 4.0)
    assert logged == pytest.approx({"instance": 1.5, "augmentation": 4.0, "camera_centroid": 9.0, "total": 5.0})
    total.backward()
    assert a.grad.item() == 2.0


def test_total_loss_rejects_unknown_terms():
    with pytest.raises(ValueError, match="unknown loss term 'triplet'.*instance"):
        total_loss({"triplet": torch.tensor(1.0)}, LossConfig())


def test_loss_config_defaults_and_validation():
    cfg = LossConfig()
    assert (cfg.tau_ins_multi, cfg.tau_ins_single, cfg.tau_aug, cfg.tau_camera) == (0.05, 0.1, 0.1, 0.05)
    assert all(cfg.weight(t) == 1.0 for t in ("instance", "augmentation", "centroid", "camera_centroid"))
    with pytest.raises(ConfigError, match="loss.tau_aug"):
        LossConfig(tau_aug=0.0)
    with pytest.raises(ConfigError, match="loss.weight_centroid"):
        LossConfig(weight_centroid=-1.0)


def test_instance_loss_closed_form_two_keys():
    # one anchor, two keys of different identities: loss = log(1 + exp((s_neg - s_pos) / tau))
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    zk = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    loss = instance_loss(z, torch.tensor([0]), zk, torch.tensor([0, 1]), 0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp((0.0 - 0.6) / 0.1)), rel=1e-12)


# ---------------------------------------------------------------- per-domain means (loss.anchor_mean)


def test_per_domain_mean_is_the_multi_camera_mean_plus_the_single_camera_mean():
    """Each domain's anchors averaged on their own, the two means added: a reference from the
    subsets (instance loss of each domain's anchors alone against all keys) and from the loops."""
    z, zk, zs = unit(len(LABELS), 20), unit(len(LABELS), 21), unit(len(LABELS), 22)
    y = torch.tensor(LABELS)
    is_single = ~torch.tensor(IS_MULTI)
    tau_B = anchor_temperatures(torch.tensor(IS_MULTI), TAU_M, TAU_S, dtype=torch.float64)
    loss = instance_loss(z, y, zk, y, tau_B, is_single)
    m, s = ~is_single, is_single
    ref = instance_loss(z[m], y[m], zk, y, tau_B[m]) + instance_loss(z[s], y[s], zk, y, tau_B[s])
    assert_same(loss, ref, [z, zk])
    assert not torch.allclose(loss, instance_loss(z, y, zk, y, tau_B))
    taus = [TAU_M if mm else TAU_S for mm in IS_MULTI]
    assert_same(augmentation_loss(zs, zk, y, tau_B, is_single), _ref_augmentation_domains(zs, zk, LABELS, taus, IS_MULTI),
                [zs, zk])
    # no single-camera anchor: per-domain equals the batch mean
    none = torch.zeros(len(LABELS), dtype=torch.bool)
    torch.testing.assert_close(instance_loss(z, y, zk, y, tau_B, none), instance_loss(z, y, zk, y, tau_B))


def _ref_augmentation_domains(zs, zk, y, taus, is_multi):
    """The augmentation loop of ``ref_augmentation`` over the whole batch (negatives from both
    domains), averaged per domain and summed."""
    per_domain = {True: [], False: []}
    for i in range(len(y)):
        pos = torch.exp(dot(zs[i], zk[i]) / taus[i])
        neg = sum((torch.exp(dot(zs[i], zk[j]) / taus[i]) for j in range(len(y)) if y[j] != y[i]),
                  torch.zeros((), dtype=torch.float64))
        per_domain[is_multi[i]].append(-torch.log(pos / (pos + neg)))
    return sum(sum(v) / len(v) for v in per_domain.values())


def test_anchor_mean_option():
    assert LossConfig().anchor_mean == "batch"
    assert LossConfig(anchor_mean="per_domain").anchor_mean == "per_domain"


@pytest.mark.parametrize("mode", ["batch", "per_domain"])
def test_train_step_reduces_the_terms_as_loss_anchor_mean_says(mode, monkeypatch):
    """The training step's logged Instance, Augmentation and Centroids terms are the reductions that
    ``loss.anchor_mean`` names, recomputed here from the step's own per-anchor inputs."""
    import dynamix_core.training.step as step_module
    from dynamix_core.centroids import build_centroid_bank
    from dynamix_core.centroids.config import CentroidBankConfig
    from dynamix_core.model import build_encoder
    from dynamix_core.model.config import ModelConfig
    from dynamix_core.training.optim import OptimConfig

    torch.manual_seed(0)
    model = build_encoder(ModelConfig(backbone="test_resnet", img_size=(64, 32), num_stripes=2))
    bank = build_centroid_bank(CentroidBankConfig(mask_same_video=False), 6, model.embed_dim)
    bank.reinit(F.normalize(torch.randn(6, model.embed_dim), dim=1), torch.arange(6), step=0,
                video_M=torch.full((6,), -1))
    seen = {}
    real_instance, real_augmentation = step_module.instance_loss, step_module.augmentation_loss

    def spy_instance(z, y, zk, yk, tau, *rest):
        seen["instance"] = (z.detach(), y, zk.detach(), yk, tau)
        return real_instance(z, y, zk, yk, tau, *rest)

    def spy_augmentation(zs, zk, y, tau, *rest):
        seen["augmentation"] = (zs.detach(), zk.detach(), y, tau)
        return real_augmentation(zs, zk, y, tau, *rest)

    monkeypatch.setattr(step_module, "instance_loss", spy_instance)
    monkeypatch.setattr(step_module, "augmentation_loss", spy_augmentation)
    step = step_module.TrainStep(model, bank, loss_cfg=LossConfig(anchor_mean=mode), optim_cfg=OptimConfig(),
                                 ema_momentum=0.9, total_steps=10, device=torch.device("cpu"))
    is_single = torch.tensor([False] * 4 + [True] * 8)  # 4 multi-camera anchors, 8 video anchors
    batch = step_module.StepBatch(torch.randn(12, 3, 64, 32), torch.randn(12, 3, 64, 32),
                                  torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]), torch.arange(12),
                                  is_single, torch.where(is_single, 7, -1))
    terms = step(batch, 0).terms
    z, y, zk, yk, tau = seen["instance"]
    domains = (~is_single, is_single) if mode == "per_domain" else (torch.ones(12, dtype=torch.bool),)
    want = sum(float(real_instance(z[m], y[m], zk, yk, tau[m])) for m in domains)
    assert terms["instance"] == pytest.approx(want, rel=1e-5)
    zs, zk, y, tau = seen["augmentation"]  # (its per-domain reduction is checked against the loop above)
    want = real_augmentation(zs, zk, y, tau, is_single if mode == "per_domain" else None)
    assert terms["augmentation"] == pytest.approx(float(want), rel=1e-5)
    assert terms["augmentation"] != pytest.approx(float(real_augmentation(zs, zk, y, tau, None if mode == "per_domain"
                                                                          else is_single)), rel=1e-3)
