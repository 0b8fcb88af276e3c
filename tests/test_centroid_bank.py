"""CentroidBank: momentum update, reinit, staleness and the Centroids loss in modes all / sampled,
each checked against a float64 loop written from the equations of SPEC 2.2/2.3b."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from dynamix_core.centroids import CentroidBank, CentroidBankConfig, build_centroid_bank
from dynamix_core.config import ConfigError

DIM = 6


def unit(n: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def make_bank(num: int, *, videos: list[int] | None = None, seed: int = 1, **cfg_kw) -> CentroidBank:
    cfg_kw.setdefault("mask_same_video", False)
    bank = CentroidBank(num, DIM, CentroidBankConfig(**cfg_kw))
    video = None if videos is None else torch.tensor(videos)
    bank.load_rows(torch.arange(num), unit(num, seed=seed), step=0, video_M=video)
    return bank


# --- reference from the equations (float64, loops) ----------------------------------------------

def reference_loss_and_grad(feat, pid, tau, rows, row_ids, row_video=None, video=None):
    """Mean over anchors of -log softmax(z_i . c_j / tau_i)[own id] over the rows ``row_ids``,
    skipping rows of the anchor's video other than its own identity; gradient by autograd."""
    feat64 = feat.detach().double().clone().requires_grad_(True)
    total = 0.0
    for i in range(len(pid)):
        terms, positive = [], None
        for j in row_ids:
            if video is not None and video[i] >= 0 and row_video[j] == video[i] and j != pid[i]:
                continue
            logit = feat64[i] @ rows[j].double() / tau[i]
            terms.append(logit)
            if j == pid[i]:
                positive = logit
        total = total + torch.logsumexp(torch.stack(terms), 0) - positive
    loss = total / len(pid)
    loss.backward()
    return loss.detach(), feat64.grad


def loss_and_grad(bank, feat, pid, tau, video=None, is_single_B=None):
    feat = feat.clone().requires_grad_(True)
    loss = bank.loss(feat, pid, tau, video, is_single_B)
    loss.backward()
    return loss.detach().double(), feat.grad.double()


def batch(num_anchors=8, num_ids=10, seed=3):
    gen = torch.Generator().manual_seed(seed)
    pid = torch.randint(0, num_ids, (num_anchors,), generator=gen)
    tau = torch.where(torch.rand(num_anchors, generator=gen) < 0.5, 0.05, 0.1)
    return unit(num_anchors, seed=seed), pid, tau


# --- momentum update, reinit, resize, staleness --------------------------------------------------

@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-3)])
def test_update_matches_momentum_equation(dtype, atol):
    bank = make_bank(7, storage_dtype=dtype)
    before = bank.centroids.double().clone()
    pid = torch.tensor([3, 1, 3, 3, 5, 1])
    feat = unit(6, seed=9)
    bank.update(feat, pid, step=4)
    mu = 0.2
    for identity in range(7):
        members = [feat[i].double() for i in range(len(pid)) if pid[i] == identity]
        if members:
            mean = sum(members) / len(members)
            expected = mu * before[identity] + (1 - mu) * mean
            expected = expected / expected.norm()
            assert bank.last_updated_step[identity] == 4
        else:
            expected = before[identity]
            assert bank.last_updated_step[identity] == 0
        torch.testing.assert_close(bank.centroids[identity].double(), expected, atol=atol, rtol=0)


def test_reinit_sets_members_mean_and_grows_the_bank():
    bank = make_bank(4, storage_dtype="float32")
    feat = unit(5, seed=11)
    pid = torch.tensor([2, 6, 2, 6, 6])
    bank.reinit(feat, pid, step=9, video_M=torch.tensor([3, 8, 3, 8, 8]))
    assert bank.num_identities == 7 and bank.centroids.shape == (7, DIM)
    for identity, members in ((2, [0, 2]), (6, [1, 3, 4])):
        mean = feat[members].double().mean(0)
        torch.testing.assert_close(bank.centroids[identity].double(), mean / mean.norm(), atol=1e-6, rtol=0)
        assert bank.last_updated_step[identity] == 9
    assert bank.row_video.tolist() == [-1, -1, 3, -1, -1, -1, 8]
    assert bank.centroids[4:6].abs().sum() == 0 and bank.last_updated_step[4:6].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="cannot shrink"):
        bank.resize(3)


def test_staleness_tracking():
    bank = CentroidBank(6, DIM, CentroidBankConfig(stale_after_steps=50))
    bank.load_rows(torch.tensor([0, 1, 2, 3]), unit(4), step=0)
    bank.update(unit(2, seed=5), torch.tensor([1, 3]), step=70)
    assert bank.stale_rows(100).tolist() == [0, 2]  # age 100 > 50; rows 1, 3 have age 30
    assert bank.stale_rows(100, max_age=20).tolist() == [0, 1, 2, 3]
    assert bank.staleness_counts(100) == {"rows": 6, "never_written": 2, "stale": 2}


# --- the loss -----------------------------------------------------------------------------------

def test_all_mode_loss_and_gradient_match_reference():
    bank = make_bank(10, chunk_rows=3)  # several chunks, the last one partial
    feat, pid, tau = batch()
    loss, grad = loss_and_grad(bank, feat, pid, tau)
    ref_loss, ref_grad = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, range(10))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert bank.centroids.grad is None


def test_same_video_masking_matches_reference():
    row_video = [-1, -1, 4, 4, 4, 7, 7, 9, 9, 9]
    bank = make_bank(10, videos=row_video, mask_same_video=True, chunk_rows=4)
    pid = torch.tensor([0, 2, 3, 5, 8, 1, 4, 6])
    video = torch.tensor([row_video[p] for p in pid])
    feat, _, tau = batch()
    loss, grad = loss_and_grad(bank, feat, pid, tau, video)
    ref_loss, ref_grad = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, range(10),
                                                 row_video, video.tolist())
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    unmasked, _ = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, range(10))
    assert not torch.isclose(loss, unmasked, atol=1e-3)  # masking changed the result
    with pytest.raises(ValueError, match="pass video_B"):
        bank.loss(feat, pid, tau)


@pytest.mark.parametrize("sampling", ["random", "hard", "mixed"])
@pytest.mark.parametrize("mask", [False, True])
def test_sampled_mode_equals_all_mode_when_negatives_cover_the_bank(sampling, mask):
    row_video = [-1, -1, 4, 4, 4, 7, 7, 9, 9, 9]
    all_bank = make_bank(10, videos=row_video, mask_same_video=mask)
    sampled = make_bank(10, videos=row_video, mask_same_video=mask, loss_mode="sampled", num_negatives=10,
                        negative_sampling=sampling, chunk_rows=3)
    feat, pid, tau = batch()
    video = torch.tensor([row_video[p] for p in pid])
    loss, grad = loss_and_grad(sampled, feat, pid, tau, video)
    ref_loss, ref_grad = loss_and_grad(all_bank, feat, pid, tau, video)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_hard_negatives_are_the_highest_masked_logits():
    row_video = [-1, -1, -1, 4, 4, 4, 7, 7, 7, 9, 9, 9, 9, 5, 5, 5]
    num = len(row_video)
    bank = make_bank(num, videos=row_video, mask_same_video=True, loss_mode="sampled", num_negatives=4,
                     negative_sampling="hard", chunk_rows=5)
    pid = torch.tensor([0, 3, 3, 9, 1, 6])
    video = torch.tensor([row_video[p] for p in pid])
    feat, _, tau = batch(num_anchors=6)
    # reference: score of a non-batch row = its highest masked logit over the anchors
    scores = {}
    for j in range(num):
        if j in pid.tolist():
            continue
        logits = [float(feat[i].double() @ bank.centroids[j].double() / tau[i]) for i in range(len(pid))
                  if not (video[i] >= 0 and row_video[j] == video[i])]
        scores[j] = max(logits, default=-math.inf)
    hardest = sorted(scores, key=scores.get, reverse=True)[:4]
    assert bank.sample_negatives(feat, pid, tau, video).tolist() == hardest
    rows = sorted(set(pid.tolist())) + hardest
    ref_loss, ref_grad = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, rows,
                                                 row_video, video.tolist())
    loss, grad = loss_and_grad(bank, feat, pid, tau, video)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_random_negatives_are_distinct_outside_the_batch_and_used_by_the_loss():
    bank = make_bank(40, loss_mode="sampled", num_negatives=12, negative_sampling="mixed",
                     mixed_hard_fraction=0.25)
    feat, pid, tau = batch(num_ids=40)
    torch.manual_seed(5)
    negatives = bank.sample_negatives(feat, pid, tau).tolist()
    assert len(negatives) == 12 == len(set(negatives)) and not set(negatives) & set(pid.tolist())
    torch.manual_seed(5)
    loss, grad = loss_and_grad(bank, feat, pid, tau)
    rows = sorted(set(pid.tolist())) + negatives
    ref_loss, ref_grad = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, rows)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_loss_stays_fp32_under_autocast():
    bank = make_bank(10)
    feat, pid, tau = batch()
    ref_loss, ref_grad = reference_loss_and_grad(feat, pid.tolist(), tau.tolist(), bank.centroids, range(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = loss_and_grad(bank, feat, pid, tau)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_temperatures_follow_the_domain():
    bank = make_bank(3)
    assert bank.temperatures(torch.tensor([True, False])).tolist() == pytest.approx([0.1, 0.05])


# --- errors, checkpoints, memory ------------------------------------------------------------------

def test_invalid_inputs_raise():
    bank = make_bank(5)
    feat, _, tau = batch(num_anchors=2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        bank.loss(feat, torch.tensor([1, 5]), tau)
    with pytest.raises(ValueError, match="pid -1"):
        bank.update(feat, torch.tensor([-1, 2]), step=1)
    with pytest.raises(ConfigError, match="ShardedCentroidBank"):
        CentroidBank(5, DIM, CentroidBankConfig(loss_mode="sharded"))
    with pytest.raises(ConfigError, match="momentum"):
        CentroidBankConfig(momentum=1.0)


def test_state_dict_round_trip_and_nbytes():
    bank = make_bank(5, videos=[-1, 2, 2, 3, 3])
    bank.update(unit(2, seed=4), torch.tensor([1, 4]), step=3)
    restored = build_centroid_bank(CentroidBankConfig(), 1, DIM)
    restored.load_state_dict(bank.state_dict())
    assert restored.num_identities == 5
    assert torch.equal(restored.centroids, bank.centroids) and restored.centroids.dtype == torch.float16
    assert torch.equal(restored.row_video, bank.row_video)
    assert torch.equal(restored.last_updated_step, bank.last_updated_step)
    assert bank.nbytes == 5 * DIM * 2 + 5 * 8 * 2
    with pytest.raises(ValueError, match="storage_dtype"):
        CentroidBank(1, DIM, CentroidBankConfig(storage_dtype="float32")).load_state_dict(bank.state_dict())


@pytest.mark.parametrize("mode", ["all", "sampled"])
def test_never_written_rows_are_left_out_of_the_softmax(mode):
    """Rows never written are zero vectors; they must not enter any denominator (their logit 0
    would otherwise count once per unknown identity), except an anchor's own (unwritten) row."""
    num, written = 10, [0, 1, 2, 3, 4, 5]
    bank = CentroidBank(num, DIM, CentroidBankConfig(mask_same_video=False, loss_mode=mode, num_negatives=64))
    rows = unit(num, seed=5)
    bank.load_rows(torch.tensor(written), rows[written], step=0)
    feat = unit(4, seed=6)
    pid = torch.tensor([0, 3, 5, 8])  # the last anchor's own identity has no centroid yet
    tau = torch.full((4,), 0.1)
    stored = bank.centroids.float()
    ref_loss, ref_grad = 0.0, []
    for i in range(4):  # reference: the written rows plus the anchor's own row (zero if unwritten)
        ids = sorted(set(written) | {int(pid[i])})
        loss, grad = reference_loss_and_grad(feat[i:i + 1], pid[i:i + 1], tau[i:i + 1], stored, ids)
        ref_loss += float(loss) / 4
        ref_grad.append(grad / 4)
    loss, grad = loss_and_grad(bank, feat, pid, tau)
    assert float(loss) == pytest.approx(ref_loss, abs=1e-5)
    torch.testing.assert_close(grad, torch.cat(ref_grad), atol=1e-5, rtol=1e-4)


def test_growth_is_geometric_and_keeps_every_row():
    """Identities arrive a few at a time (each label version adds some): the bank must not copy
    itself at every growth (issue 13: it did, O(N) per version). Reallocations are counted by the
    storage address; the rows written before every growth keep their values, new rows are unset,
    and a checkpoint holds exactly the identities in use (not the spare capacity)."""
    cfg = CentroidBankConfig(storage_dtype="float32")
    bank = CentroidBank(10, 4, cfg)
    bank.load_rows(torch.arange(10), torch.eye(4).repeat(3, 1)[:10], step=1, video_M=torch.arange(10))
    addresses = {bank.centroids.data_ptr()}
    written = {i: torch.eye(4)[i % 4] for i in range(10)}
    n = 10
    for k in range(1, 1500):
        n += 7
        bank.resize(n)
        addresses.add(bank.centroids.data_ptr())
        if k % 100 == 0:  # write a row now and then; it must survive later growth
            bank.load_rows(torch.tensor([n - 1]), torch.ones(1, 4), step=k, video_M=torch.tensor([k]))
            written[n - 1] = torch.full((4,), 0.5)
    assert bank.num_identities == n and bank.centroids.shape == (n, 4)
    assert len(addresses) <= 2 + int(np.ceil(np.log2(n / 10))), len(addresses)  # doublings, not 1499 copies
    for i, row in written.items():
        torch.testing.assert_close(bank.centroids[i], row)
    unset = torch.ones(n, dtype=torch.bool)
    unset[list(written)] = False
    assert (bank.centroids[unset] == 0).all() and (bank.last_updated_step[unset] == -1).all()
    assert (bank.row_video[unset] == -1).all()
    state = bank.state_dict()
    assert state["centroids"].untyped_storage().nbytes() == n * 4 * 4  # no spare rows in the checkpoint
    again = CentroidBank(1, 4, cfg)
    again.load_state_dict(state)
    torch.testing.assert_close(again.centroids, bank.centroids)


def test_per_domain_loss_is_the_sum_of_each_domains_mean():
    """``is_single_B`` given: the mean over the multi-camera anchors plus the mean over the
    single-camera anchors, each against the reference of that domain's anchors alone."""
    bank = make_bank(10, chunk_rows=3)
    feat, pid, tau = batch(num_anchors=9)
    is_single = torch.tensor([False] * 6 + [True] * 3)
    loss, grad = loss_and_grad(bank, feat, pid, tau, is_single_B=is_single)
    ref_loss = sum(reference_loss_and_grad(feat[m], pid[m].tolist(), tau[m].tolist(), bank.centroids, range(10))[0]
                   for m in (~is_single, is_single))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    batch_loss, _ = loss_and_grad(bank, feat, pid, tau)
    assert not torch.isclose(loss, batch_loss, atol=1e-3)
    # a multi-camera anchor's gradient is 1/6 of its own loss's, not 1/9 as in the batch mean
    own = torch.zeros(9, dtype=torch.bool)
    own[0] = True
    _, grad_alone = loss_and_grad(bank, feat, pid, tau, is_single_B=~own)  # anchor 0 alone in its domain
    torch.testing.assert_close(grad[0] * 6, grad_alone[0], atol=1e-6, rtol=1e-5)
