"""Identity cross-entropy, soft-margin batch-hard triplet, domain balance loss and gradient reversal,
against loop references written from the equations (values and gradients) and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from dynamix_core.losses.classification import identity_cross_entropy, soft_margin_triplet_loss
from dynamix_core.losses.domain import GradientReversal, MLPDiscriminator, domain_balance_loss, grad_reverse


def randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def assert_same(loss, ref, x):
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- identity cross-entropy


def ref_smoothed_ce(logits, targets, eps, temp):
    num_classes = logits.shape[1]
    total = 0.0
    for i in range(logits.shape[0]):
        scaled = [logits[i, c] / temp for c in range(num_classes)]
        log_z = torch.log(sum(torch.exp(s) for s in scaled))
        for c in range(num_classes):
            q = (1 - eps) * (1.0 if c == targets[i] else 0.0) + eps / num_classes
            total = total - q * (scaled[c] - log_z)
    return total / logits.shape[0]


@pytest.mark.parametrize("eps,temp", [(0.1, 2.0), (0.0, 1.0), (0.3, 0.5)])
def test_identity_cross_entropy_matches_the_equation(eps, temp):
    logits = randn(6, 5, seed=1) * 3
    targets = [0, 4, 2, 2, 1, 3]
    loss = identity_cross_entropy(logits, torch.tensor(targets), smoothing=eps, temperature=temp)
    assert_same(loss, ref_smoothed_ce(logits, targets, eps, temp), logits)


def test_identity_cross_entropy_rejects_bad_settings():
    with pytest.raises(ValueError, match="smoothing"):
        identity_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), smoothing=1.0)
    with pytest.raises(ValueError, match="temperature"):
        identity_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=0.0)


# ---------------------------------------------------------------- soft-margin batch-hard triplet


def ref_triplet(x, labels):
    terms = []
    for i in range(len(labels)):
        d = [torch.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1]))) for j in range(len(labels))]
        pos = [d[j] for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        neg = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        d_ap = max(pos, key=lambda t: t.item())
        d_an = min(neg, key=lambda t: t.item())
        terms.append(torch.log(1 + torch.exp(d_ap - d_an)))
    return sum(terms) / len(terms)


def test_soft_margin_triplet_matches_the_equation():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 5]  # identity 5 has no other positive: left out of the mean
    x = randn(len(labels), 4, seed=2)
    assert_same(soft_margin_triplet_loss(x, torch.tensor(labels)), ref_triplet(x, labels), x)


def test_soft_margin_triplet_is_log2_for_coincident_points():
    # all features equal: d_ap = d_an = 0 -> log(1 + e^0) = ln 2 for every anchor
    x = torch.ones(4, 3, dtype=torch.float64)
    assert soft_margin_triplet_loss(x, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- domain balance loss


def test_domain_balance_loss_is_minus_ln2_with_zero_gradient_at_uniform_output():
    logits = (torch.full((5, 2), 0.7, dtype=torch.float64)).requires_grad_(True)  # equal logits -> p = (1/2, 1/2)
    loss = domain_balance_loss(logits)
    assert loss.item() == pytest.approx(-math.log(2), abs=1e-15)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max().item() < 1e-15


def test_domain_balance_loss_matches_the_binary_closed_form_and_is_minimal_at_uniform():
    logits = randn(50, 2, seed=3) * 4
    p = torch.sigmoid(logits[:, 0] - logits[:, 1])  # softmax of two logits
    closed_form = (p * torch.log(p) + (1 - p) * torch.log(1 - p)).mean()
    loss = domain_balance_loss(logits)
    assert_same(loss, closed_form, logits)
    per_sample = [domain_balance_loss(logits[i : i + 1]).item() for i in range(50)]
    assert min(per_sample) >= -math.log(2) - 1e-12
    # closed-form gradient w.r.t. the logit difference a: d/da [p ln p + (1-p) ln(1-p)] = p (1-p) ln(p / (1-p))
    a = (logits[:, 0] - logits[:, 1]).detach()
    q = torch.sigmoid(a)
    (grad,) = torch.autograd.grad(domain_balance_loss(logits), logits)
    torch.testing.assert_close(grad[:, 0], q * (1 - q) * torch.log(q / (1 - q)) / 50, rtol=1e-9, atol=1e-12)


def test_domain_balance_loss_over_k_classes_is_minus_ln_k_at_uniform():
    assert domain_balance_loss(torch.zeros(3, 7, dtype=torch.float64)).item() == pytest.approx(-math.log(7))


# ---------------------------------------------------------------- gradient reversal


@pytest.mark.parametrize("lambd", [1.0, 0.25])
def test_gradient_reversal_flips_and_scales_the_gradient(lambd):
    x = randn(4, 3, seed=4)
    w = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3)
    y = grad_reverse(x, lambd)
    torch.testing.assert_close(y, x)
    f = lambda t: (torch.tanh(t) * w).sum() + (t**2).sum()  # noqa: E731
    (g_rev,) = torch.autograd.grad(f(grad_reverse(x, lambd)), x)
    (g,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g_rev, -lambd * g)
    (g_mod,) = torch.autograd.grad(f(GradientReversal(lambd)(x)), x)
    torch.testing.assert_close(g_mod, -lambd * g)


def test_gradient_reversal_passes_gradcheck():
    x = randn(3, 2, seed=5)
    # gradcheck compares the analytic backward with finite differences of the forward (identity), so
    # it must fail for lambda != -1; lambda = -1 makes the reversal an identity in both passes
    assert torch.autograd.gradcheck(lambda t: grad_reverse(t, -1.0), (x,))
    with pytest.raises(Exception):
        torch.autograd.gradcheck(lambda t: grad_reverse(t, 1.0), (x,), raise_exception=True)


def test_mlp_discriminator_shapes():
    disc = MLPDiscriminator(8, 2, hidden=(16, 4))
    assert disc(torch.randn(5, 8)).shape == (5, 2)
    assert [type(m).__name__ for m in disc] == ["Linear", "BatchNorm1d", "LeakyReLU"] * 2 + ["Linear"]
    with pytest.raises(ValueError, match="at least 2"):
        MLPDiscriminator(8, 1)
