"""The MoCo v3 objective (dynamix_core.pretrain) against references written from its equations:
a float64 loop for the loss, the closed-form gradient, the EMA and momentum formulas, and a whole
step recomputed in float64 from copies of the networks (values and gradients)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import dynamix_core  # noqa: F401  (torchvision shim before timm)
from dynamix_core.config import ConfigError
from dynamix_core.model import create_backbone
from dynamix_core.pretrain import (
    KeyEncoder,
    MocoConfig,
    OnlineNetwork,
    PretrainStep,
    contrastive_loss,
    ema_parameters,
    momentum_at,
)
from dynamix_core.training.optim import OptimConfig

IMG = (32, 16)


def loop_loss(q, k, tau: float, offset: int) -> float:
    """L(q, k) = 2 tau mean_i -log softmax_j(q^_i . k^_j / tau)[offset + i], one scalar at a time."""
    q, k = q.double().tolist(), k.double().tolist()

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    keys = [unit(row) for row in k]
    total = 0.0
    for i, row in enumerate(q):
        qi = unit(row)
        sims = [sum(a * b for a, b in zip(qi, kj)) / tau for kj in keys]
        top = max(sims)
        log_sum = top + math.log(sum(math.exp(s - top) for s in sims))
        total += log_sum - sims[offset + i]
    return 2 * tau * total / len(q)


def closed_form_grad(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int) -> torch.Tensor:
    """dL/dq: with p = softmax of the logits, dL/dq^_i = (2/B)(sum_j p_ij k^_j - k^_{offset+i}),
    then through the normalisation: dL/dq_i = (I - q^_i q^_i^T) dL/dq^_i / |q_i|."""
    q, k = q.double(), k.double()
    B = q.shape[0]
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    p = torch.softmax(qn @ kn.T / tau, dim=1)
    g_hat = (2.0 / B) * (p @ kn - kn[offset:offset + B])
    radial = (g_hat * qn).sum(1, keepdim=True) * qn
    return (g_hat - radial) / q.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("B, M, offset, tau", [(6, 6, 0, 0.2), (5, 15, 5, 1.0), (4, 12, 8, 0.07)])
def test_contrastive_loss_matches_loop_reference_and_closed_form_gradient(B, M, offset, tau):
    g = torch.Generator().manual_seed(B * 100 + M)
    q = torch.randn(B, 8, generator=g, requires_grad=True)
    k = torch.randn(M, 8, generator=g)
    k[offset:offset + B] += 0.8 * q.detach()  # positives somewhat aligned: a non-trivial softmax
    loss, acc = contrastive_loss(q, k, tau, offset)
    assert loss.item() == pytest.approx(loop_loss(q, k, tau, offset), rel=1e-5, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(q.grad.double(), closed_form_grad(q.detach(), k, tau, offset), rtol=1e-4, atol=1e-6)
    qn, kn = torch.nn.functional.normalize(q.detach(), dim=1), torch.nn.functional.normalize(k, dim=1)
    expected_acc = sum(int((qn[i] @ kn.T).argmax()) == offset + i for i in range(B)) / B
    assert acc.item() == pytest.approx(expected_acc)


def test_rank_offsets_reassemble_the_global_batch():
    """Two ranks with their own queries against the gathered keys average to the one-process loss."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    whole, _ = contrastive_loss(q, k, 0.2, 0)
    per_rank = [contrastive_loss(q[r * 4:(r + 1) * 4], k, 0.2, r * 4)[0] for r in (0, 1)]
    assert ((per_rank[0] + per_rank[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    with pytest.raises(ValueError, match="offset"):
        contrastive_loss(q[:4], k, 0.2, 6)


def test_momentum_schedule_formula():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(25, 100, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert momentum_at(70, 100, 0.9, "constant") == 0.9


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="temperature"):
        MocoConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        MocoConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="projector_layers"):
        MocoConfig(projector_layers=0)


def online_network(seed: int = 0, layers: tuple[int, int] = (2, 2)) -> OnlineNetwork:
    torch.manual_seed(seed)
    return OnlineNetwork(create_backbone("test_resnet", IMG, 0.0), dim=16, mlp_dim=32,
                         projector_layers=layers[0], predictor_layers=layers[1])


def test_teacher_stays_in_train_mode_and_keeps_its_own_batchnorm_statistics():
    online = online_network()
    teacher = KeyEncoder(online)
    teacher.eval()
    assert teacher.training and all(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(8, 3, *IMG, generator=torch.Generator().manual_seed(0))
    # batch statistics: an image's key depends on the rest of its batch
    assert not torch.allclose(teacher(x)[:4], teacher(x[:4]), atol=1e-4)
    # the EMA moves parameters only: the teacher's running statistics stay its own
    before = {n: b.clone() for n, b in teacher.named_buffers()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.1)
    online_before = {n: p.detach().clone() for n, p in online.named_parameters()}
    teacher_params = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_parameters(online, teacher, 0.75)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * teacher_params[n] + 0.25 * online_before[n])
    assert all(torch.equal(b, before[n]) for n, b in teacher.named_buffers())


def test_one_step_matches_a_float64_recomputation_values_and_gradients():
    """PretrainStep's loss and the online gradients it leaves behind equal a float64 recomputation:
    teacher = EMA of the online weights at this step's momentum, in train mode (batch statistics),
    loss = L(q1, k2) + L(q2, k1) from the loop reference."""
    cfg = MocoConfig(dim=16, mlp_dim=32, projector_layers=2, predictor_layers=2, temperature=0.5, momentum=0.9)
    online = online_network(seed=3)
    step = PretrainStep(online, cfg, OptimConfig(lr=1e-3, grad_clip=0.0), total_steps=10, device=torch.device("cpu"))
    with torch.no_grad():  # teacher != online, so the EMA matters
        for p in online.parameters():
            p.mul_(1.05).add_(0.01)
    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(6, 3, *IMG, generator=g), torch.randn(6, 3, *IMG, generator=g)
    m = momentum_at(4, 10, 0.9)
    ref_online = copy.deepcopy(online).double().train()
    ref_teacher = copy.deepcopy(step.teacher).double()
    with torch.no_grad():
        for (_, pt), (_, po) in zip(ref_teacher.named_parameters(), ref_online.named_parameters()):
            pt.copy_(m * pt + (1 - m) * po)
    out = step(x1, x2, step=4)
    assert out.momentum == pytest.approx(m)
    q1, q2 = ref_online(x1.double(), x2.double())
    k1, k2 = ref_teacher(x1.double()), ref_teacher(x2.double())
    expected = loop_loss(q1.detach(), k2, 0.5, 0) + loop_loss(q2.detach(), k1, 0.5, 0)
    assert out.loss == pytest.approx(expected, rel=1e-4)
    # gradients: autograd through the float64 copy of the online network, the loss from the equation
    def ref_loss(q, k):
        qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        logits = qn @ kn.T / 0.5
        return 2 * 0.5 * (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    (ref_loss(q1, k2) + ref_loss(q2, k1)).backward()
    for (name, p), (_, rp) in zip(online.named_parameters(), ref_online.named_parameters()):
        # float32 against float64: compare against the tensor's scale (single elements may be ~0)
        err = (p.grad.double() - rp.grad).abs().max().item()
        assert err <= 1e-4 * rp.grad.abs().max().item() + 1e-8, (name, err)
    # the teacher got exactly the EMA parameters and received no gradient
    for (name, p), (_, rp) in zip(step.teacher.named_parameters(), ref_teacher.named_parameters()):
        torch.testing.assert_close(p.double(), rp, msg=name)
        assert p.grad is None


def test_steps_learn_to_tell_instances_apart():
    """A few steps on a fixed set of images raise the instance-discrimination accuracy."""
    cfg = MocoConfig(dim=16, mlp_dim=64, projector_layers=2, predictor_layers=2, temperature=0.2, momentum=0.9)
    step = PretrainStep(online_network(seed=5), cfg, OptimConfig(lr=3e-3, warmup_fraction=0.0), total_steps=40,
                        device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 3, *IMG, generator=g)
    outs = [step(base + 0.3 * torch.randn(base.shape, generator=g), base + 0.3 * torch.randn(base.shape, generator=g), s)
            for s in range(40)]
    first, last = sum(o.loss for o in outs[:5]) / 5, sum(o.loss for o in outs[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert sum(o.accuracy for o in outs[-5:]) / 5 > 0.5
