"""Data Sampling Module (SPEC 2.3c): batch composition, dataset balance, video buffer, curriculum,
determinism, rank disjointness, exact resume and label updates."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from dynamix_core.config import ConfigError, from_dict
from dynamix_core.sampling import (
    MixedBatchSampler,
    MultiCameraSampler,
    SamplerConfig,
    ScheduleBreakpoint,
    SingleCameraSampler,
    VideoSamples,
    partition_stream,
    shape_at,
)
from dynamix_core.sampling.images import draw_images


# ----------------------------------------------------------------------------- fixtures (tiny data)
def multi_set(layout: dict[str, list[list[int]]]):
    """Arrays of a multi-camera train set. ``layout[dataset]`` = per identity, images per camera.
    Refs are 1000 + row index (distinct from row positions, so a ref/position mix-up shows)."""
    refs, pids, camids, datasets = [], [], [], []
    pid = 0
    for ds, identities in layout.items():
        for cams in identities:
            for cam, n in enumerate(cams):
                for _ in range(n):
                    refs.append(1000 + len(refs))
                    pids.append(pid)
                    camids.append(100 * pid + cam)
                    datasets.append(ds)
            pid += 1
    return np.array(refs), np.array(pids), np.array(camids), np.array(datasets)


def videos_stream(videos: list[VideoSamples]):
    return lambda position: iter(videos[position:])


def make_videos(num_videos: int, ids_per_video: int = 4, images_per_id: int = 5, first_id: int = 0):
    """Videos with keys as refs ``v<video>_<pid>_<i>`` so a test can read the truth off a ref."""
    videos = []
    for v in range(first_id, first_id + num_videos):
        refs = [f"v{v}_{v * 100 + p}_{i}" for p in range(ids_per_video) for i in range(images_per_id)]
        videos.append(VideoSamples(v, refs, [v * 100 + p for p in range(ids_per_video) for _ in range(images_per_id)]))
    return videos


def truth(ref: str) -> tuple[int, int]:
    _, pid, _ = ref.split("_")
    return int(ref.split("_")[0][1:]), int(pid)


def small_cfg(**kw) -> SamplerConfig:
    base = dict(num_multi_ids=4, multi_images_per_id=2, num_videos=3, ids_per_video=2, single_images_per_id=2,
                video_buffer_size=6, max_video_uses=2, seed=7)
    base.update(kw)
    return SamplerConfig(**base)


MULTI_LAYOUT = {
    "a": [[3, 2], [2, 2, 2], [4], [1, 1, 1, 1]] * 3,
    "b": [[2, 3], [5, 1]] * 10,
}


def mixed(cfg, total_steps=20, rank=0, world_size=1, videos=None):
    refs, pids, camids, datasets = multi_set(MULTI_LAYOUT)
    stream = videos_stream(videos if videos is not None else make_videos(200))
    return MixedBatchSampler(cfg, refs=refs, pids=pids, camids=camids, datasets=datasets,
                             video_stream=partition_stream(stream, rank, world_size), total_steps=total_steps,
                             rank=rank, world_size=world_size)


def plan_key(plan):
    return (plan.step, plan.refs, plan.pids.tolist(), plan.is_single.tolist(), plan.video_ids.tolist())


# ----------------------------------------------------------------------------- config + schedule
def test_default_config_matches_spec():
    cfg = SamplerConfig()
    counts = (cfg.num_multi_ids, cfg.multi_images_per_id, cfg.num_videos, cfg.ids_per_video, cfg.single_images_per_id)
    assert counts == (16, 4, 8, 2, 4)
    assert cfg.batch_size == 16 * 4 + 8 * 2 * 4
    shape = shape_at(cfg, 0, 100)
    assert (shape.num_multi_ids, shape.num_videos, shape.ids_per_video) == (16, 8, 2)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"num_videos": 0}, "sampler.num_videos=0"),
        ({"multi_images_per_id": 3}, "sampler.ids_per_video=2"),  # G*K_s = 8 not a multiple of K_m = 3
        ({"schedule": [{"step_fraction": 0.1, "multi_fraction": 0.5, "ids_per_video": 2}]}, "schedule[0].step_fraction"),
        ({"schedule": [{"step_fraction": 0.0, "multi_fraction": 0.5, "ids_per_video": 2},
                       {"step_fraction": 0.0, "multi_fraction": 0.5, "ids_per_video": 2}]}, "schedule[1].step_fraction"),
        ({"schedule": [{"step_fraction": 0.0, "multi_fraction": 1.5, "ids_per_video": 2}]}, "schedule[0].multi_fraction"),
        ({"schedule": [{"step_fraction": 0.0, "multi_fraction": 0.5, "ids_per_video": 0}]}, "schedule[0].ids_per_video"),
        ({"video_buffer_size": 8, "schedule": [{"step_fraction": 0.0, "multi_fraction": 0.0, "ids_per_video": 1}]},
         "video_buffer_size=8"),
    ],
)
def test_config_errors_name_the_field(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        from_dict(SamplerConfig, data, "sampler")


def test_piecewise_schedule_counts():
    cfg = from_dict(SamplerConfig, {"schedule": [
        {"step_fraction": 0.0, "multi_fraction": 1.0, "ids_per_video": 1},
        {"step_fraction": 0.2, "multi_fraction": 0.75, "ids_per_video": 1},
        {"step_fraction": 0.6, "multi_fraction": 0.5, "ids_per_video": 4},
    ]})
    # B = 128; hand-computed: 128 multi; 32 single images = 8 videos of 1 x 4; 64 single = 4 videos of 4 x 4
    expect = {0: (32, 0, 1), 19: (32, 0, 1), 20: (24, 8, 1), 59: (24, 8, 1), 60: (16, 4, 4), 99: (16, 4, 4)}
    for step, (p, v, g) in expect.items():
        shape = shape_at(cfg, step, 100)
        assert (shape.num_multi_ids, shape.num_videos, shape.ids_per_video) == (p, v, g), step


def test_linear_schedule_keeps_batch_size_and_tracks_the_ratio():
    cfg = from_dict(SamplerConfig, {"schedule_mode": "linear", "schedule": [
        {"step_fraction": 0.0, "multi_fraction": 0.9, "ids_per_video": 1},
        {"step_fraction": 0.5, "multi_fraction": 0.3, "ids_per_video": 2},
        {"step_fraction": 0.8, "multi_fraction": 0.5, "ids_per_video": 2},
    ]})
    total = 200
    for step in range(total):
        f = step / total
        if f < 0.5:
            target, g = 0.9 + (0.3 - 0.9) * f / 0.5, 1
        elif f < 0.8:
            target, g = 0.3 + (0.5 - 0.3) * (f - 0.5) / 0.3, 2
        else:
            target, g = 0.5, 2
        shape = shape_at(cfg, step, total)
        assert shape.batch_size == cfg.batch_size == 128
        assert shape.ids_per_video == g
        # the single part moves in whole videos (G*K_s images): nearest achievable split
        assert abs(shape.num_multi_images / 128 - target) <= g * 4 / 2 / 128 + 1e-12, step
    assert shape_at(cfg, 40, total).num_videos == math.floor((1 - (0.9 - 0.6 * 0.2 / 0.5)) * 128 / 4 + 0.5)


# ----------------------------------------------------------------------------- K images of one identity
def test_draw_images_spreads_over_cameras_and_repeats_only_when_short():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cams = [np.arange(0, 5), np.arange(10, 15), np.arange(20, 25)]
        got = draw_images(rng, cams, 4)
        assert len(set(got.tolist())) == 4 and len({x // 10 for x in got}) == 3
        got = draw_images(rng, [np.array([7]), np.arange(10, 20)], 4)
        assert len(set(got.tolist())) == 4 and (got == 7).sum() == 1  # the rare camera is never skipped
        got = draw_images(rng, [np.array([3]), np.array([9])], 4)
        assert sorted(set(got.tolist())) == [3, 9] and len(got) == 4  # both images, then repeats
        assert draw_images(rng, [np.array([5])], 4).tolist() == [5, 5, 5, 5]


def test_draw_images_is_uniform_within_a_camera():
    rng = np.random.default_rng(1)
    n_draws, k, n = 4000, 4, 10
    counts = Counter(x for _ in range(n_draws) for x in draw_images(rng, [np.arange(n)], k).tolist())
    p = k / n  # each image is in a uniform k-subset with probability k/n
    sd = math.sqrt(n_draws * p * (1 - p))
    assert all(abs(counts[i] - n_draws * p) < 6 * sd for i in range(n))


# ----------------------------------------------------------------------------- multi-camera P x K
def test_multi_batch_has_p_identities_times_k_images_spread_over_cameras():
    refs, pids, camids, datasets = multi_set(MULTI_LAYOUT)
    ref_pid = dict(zip(refs.tolist(), pids.tolist()))
    ref_cam = dict(zip(refs.tolist(), camids.tolist()))
    num_cams = {p: len(set(camids[pids == p].tolist())) for p in set(pids.tolist())}
    sampler = MultiCameraSampler(refs, pids, camids, datasets, images_per_id=4, seed=3)
    for _ in range(50):
        got_refs, got_pids = sampler.sample(6)
        assert len(got_refs) == 24
        assert [ref_pid[r] for r in got_refs] == got_pids.tolist()
        blocks = [got_refs[i:i + 4] for i in range(0, 24, 4)]
        assert len({ref_pid[b[0]] for b in blocks}) == 6  # distinct identities
        for block in blocks:
            pid = ref_pid[block[0]]
            assert {ref_pid[r] for r in block} == {pid}
            assert len({ref_cam[r] for r in block}) == min(4, num_cams[pid])


@pytest.mark.parametrize("balance", [True, False])
def test_identity_draws_are_uniform_over_datasets(balance):
    sizes = {"small": 10, "mid": 40, "large": 200}
    refs, pids, camids, datasets = multi_set({d: [[2, 2]] * n for d, n in sizes.items()})
    pid_ds = dict(zip(pids.tolist(), datasets.tolist()))
    sampler = MultiCameraSampler(refs, pids, camids, datasets, images_per_id=2, balance_datasets=balance, seed=11)
    n_batches, p = 1500, 8
    per_ds, per_id = Counter(), Counter()
    for _ in range(n_batches):
        _, got = sampler.sample(p)
        for pid in got[::2].tolist():
            per_ds[pid_ds[pid]] += 1
            per_id[pid] += 1
    slots = n_batches * p
    total = sum(sizes.values())
    for ds, n in sizes.items():
        # closed form: each slot lands in a dataset w.p. 1/D (balanced; no dataset has < P identities)
        # or n_d/N (identity-uniform); binomial spread, 5 sd tolerance
        share = 1 / len(sizes) if balance else n / total
        assert abs(per_ds[ds] - slots * share) < 5 * math.sqrt(slots * share * (1 - share)), (ds, per_ds)
        # and uniform over the identities inside the dataset
        q = share / n
        for pid in (x for x, d in pid_ds.items() if d == ds):
            assert abs(per_id[pid] - slots * q) < 6 * math.sqrt(slots * q * (1 - q)) + 1, (ds, pid)


def test_a_dataset_smaller_than_the_draw_gives_all_it_has():
    refs, pids, camids, datasets = multi_set({"tiny": [[1, 1]] * 2, "big": [[2]] * 50})
    sampler = MultiCameraSampler(refs, pids, camids, datasets, images_per_id=2, seed=0)
    for _ in range(100):
        _, got = sampler.sample(20)  # multinomial gives "tiny" ~10 slots: always capped at its 2 identities
        ids = got[::2].tolist()
        assert len(set(ids)) == 20 and {0, 1} <= set(ids)


def test_multi_sampler_rejects_bad_inputs():
    refs, pids, camids, datasets = multi_set({"a": [[2]] * 3})
    with pytest.raises(ValueError, match="needs 8 distinct multi-camera identities"):
        MultiCameraSampler(refs, pids, camids, datasets, images_per_id=2, world_size=2).sample(4)
    with pytest.raises(ValueError, match="pid 0 occurs in two source datasets"):
        MultiCameraSampler(refs, pids, camids, np.array(["a", "b"] + ["a"] * 4), images_per_id=2)
    with pytest.raises(ValueError, match="pid -1"):
        MultiCameraSampler(refs, np.r_[-1, pids[1:]], camids, datasets, images_per_id=2)


# ----------------------------------------------------------------------------- single-camera V x G x K
def single(videos, seed=0, **kw):
    args = dict(images_per_id=3, buffer_size=5, max_video_uses=2, seed=seed)
    args.update(kw)
    return SingleCameraSampler(videos_stream(videos), **args)


def test_single_batch_is_v_videos_times_g_same_video_identities_times_k():
    sampler = single(make_videos(40))
    for _ in range(15):
        refs, pids, video_ids = sampler.sample(3, 2)
        assert len(refs) == 3 * 2 * 3
        assert [truth(r) for r in refs] == list(zip(video_ids.tolist(), pids.tolist()))
        per_video = [refs[i:i + 6] for i in range(0, 18, 6)]
        assert len({truth(b[0])[0] for b in per_video}) == 3  # V distinct videos
        for block in per_video:
            assert len({truth(r)[0] for r in block}) == 1  # one video per block
            ids = [block[:3], block[3:]]
            assert all(len({truth(r)[1] for r in grp}) == 1 for grp in ids)
            assert truth(ids[0][0])[1] != truth(ids[1][0])[1]  # G distinct identities of that video
            assert all(len(set(grp)) == 3 for grp in ids)  # 5 images each: no repeats


def test_identities_with_two_or_more_images_are_preferred():
    rich = VideoSamples(1, ["a0", "a1", "b0", "b1", "b2", "c0"], [10, 10, 11, 11, 11, 12])  # c: one image
    poor = VideoSamples(2, ["d0", "d1", "e0", "f0"], [20, 20, 21, 22])  # only d has 2 images
    sampler = single([rich, poor] * 1, buffer_size=2, max_video_uses=1000)
    for _ in range(200):
        refs, pids, video_ids = sampler.sample(2, 2)
        by_video = {v: set(pids[video_ids == v].tolist()) for v in (1, 2)}
        assert by_video[1] == {10, 11}
        assert 20 in by_video[2] and len(by_video[2]) == 2
        for pid in (21, 22):  # a one-image identity fills its K slots with copies
            assert (pids == pid).sum() in (0, 3)


def test_buffer_retires_videos_after_max_uses_and_stays_bounded():
    videos = make_videos(60)
    sampler = single(videos, buffer_size=5, max_video_uses=2)
    uses = Counter()
    for _ in range(30):
        buffered = sampler.buffered_video_ids()
        assert len(buffered) == 5
        _, _, video_ids = sampler.sample(3, 2)
        batch_videos = set(video_ids.tolist())
        assert batch_videos <= set(buffered)
        uses.update(batch_videos)
    assert max(uses.values()) == 2  # no video serves more than max_video_uses batches
    assert sum(uses.values()) == 30 * 3


def test_videos_with_too_few_identities_make_room_when_g_grows():
    videos = make_videos(10, ids_per_video=2) + make_videos(30, ids_per_video=4, first_id=10)
    sampler = single(videos, buffer_size=5, max_video_uses=3)
    refs, pids, video_ids = sampler.sample(2, 2)  # G=2: the 2-identity videos are fine
    for _ in range(10):
        refs, pids, video_ids = sampler.sample(3, 4)
        assert min(video_ids.tolist()) >= 10  # only videos with >= G=4 identities serve
        assert len(refs) == 3 * 4 * 3


def test_exhausted_stream_is_reported():
    sampler = single(make_videos(4), buffer_size=4, max_video_uses=1)
    sampler.sample(2, 2)
    sampler.sample(2, 2)
    with pytest.raises(ValueError, match="video stream ended"):
        sampler.sample(2, 2)


def test_impossible_requests_raise_instead_of_looping():
    with pytest.raises(ValueError, match="6 videos cannot come from a buffer of 5"):
        single(make_videos(40)).sample(6, 2)
    videos = make_videos(3, ids_per_video=4) + make_videos(20, ids_per_video=2, first_id=3)

    def cycling(position):  # endless epochs over 23 videos, only 3 of which have 4 identities
        return (videos[i % len(videos)] for i in itertools.count(position))

    sampler = SingleCameraSampler(cycling, images_per_id=3, buffer_size=5, max_video_uses=2)
    with pytest.raises(ValueError, match="fewer than 4 videos with >= 4 identities"):
        sampler.sample(4, 4)
    assert len(sampler.sample(3, 4)[0]) == 3 * 4 * 3  # 3 such videos do exist


def test_label_updates_apply_between_batches():
    video = VideoSamples(5, [f"x{i}" for i in range(12)], [1] * 6 + [2] * 6)
    sampler = single([video], buffer_size=1, max_video_uses=10**6, images_per_id=2)
    refs, pids, _ = sampler.sample(1, 2)
    assert set(pids.tolist()) == {1, 2}
    # relabel: split identity 1 into 7 and 8, drop x11, keep the rest of 2
    new = [7, 7, 7, 8, 8, 8, 2, 2, 2, 2, 2, -1]
    assert sampler.update_labels(5, new)
    seen_pids, seen_refs = Counter(), set()
    for _ in range(100):
        refs, pids, _ = sampler.sample(1, 3)
        for r, p in zip(refs, pids.tolist()):
            assert new[int(r[1:])] == p != -1
        seen_pids.update(pids.tolist())
        seen_refs.update(refs)
    assert set(seen_pids) == {7, 8, 2} and "x11" not in seen_refs
    assert not sampler.update_labels(99, [0])  # not buffered
    with pytest.raises(ValueError, match="video 5: 3 new pids for 12 images"):
        sampler.update_labels(5, [1, 2, 3])


def test_partition_stream_gives_disjoint_shards_and_resumes_mid_shard():
    videos = make_videos(20)
    shards = [list(partition_stream(videos_stream(videos), r, 3)(0)) for r in range(3)]
    ids = [[v.video_id for v in s] for s in shards]
    assert sorted(sum(ids, [])) == list(range(20))
    assert all(i % 3 == r for r, s in enumerate(ids) for i in s)
    assert [v.video_id for v in partition_stream(videos_stream(videos), 1, 3)(2)] == ids[1][2:]


# ----------------------------------------------------------------------------- mixed batches
def test_mixed_plan_layout_and_domain_flags():
    cfg = small_cfg()
    plan = mixed(cfg).next_batch()
    assert len(plan.refs) == cfg.batch_size == 4 * 2 + 3 * 2 * 2
    assert plan.is_single.tolist() == [False] * 8 + [True] * 12
    assert (plan.video_ids[:8] == -1).all() and (plan.video_ids[8:] >= 0).all()
    assert all(isinstance(r, (int, np.integer)) for r in plan.multi_refs)
    assert all(truth(r) == (v, p) for r, v, p in zip(plan.single_refs, plan.single_video_ids, plan.single_pids))


def test_same_seed_same_batches_other_seed_other_batches():
    runs = [mixed(small_cfg()), mixed(small_cfg()), mixed(small_cfg(seed=8))]
    seqs = [[plan_key(s.next_batch()) for _ in range(12)] for s in runs]
    assert seqs[0] == seqs[1]
    assert seqs[0] != seqs[2]


def test_ranks_never_share_a_sample_within_a_step():
    world = 3
    cfg = small_cfg(num_multi_ids=4)
    ranks = [mixed(cfg, rank=r, world_size=world) for r in range(world)]
    ranks_of = {}
    for _ in range(15):
        plans = [s.next_batch() for s in ranks]
        refs = [set(p.refs) for p in plans]
        assert sum(len(r) for r in refs) == len(set().union(*refs))  # pairwise disjoint
        multi_ids = [set(p.multi_pids.tolist()) for p in plans]
        assert sum(map(len, multi_ids)) == len(set().union(*multi_ids)) == world * 4
        assert all(v % world == r for r, p in enumerate(plans) for v in p.single_video_ids.tolist())
        for r, ids in enumerate(multi_ids):
            for pid in ids:
                ranks_of.setdefault(pid, set()).add(r)
    assert max(map(len, ranks_of.values())) > 1  # across steps an identity can move to another rank


def test_resume_from_state_gives_the_batches_of_an_uninterrupted_run():
    cfg = small_cfg(schedule=[
        ScheduleBreakpoint(step_fraction=0.0, multi_fraction=0.6, ids_per_video=1),
        ScheduleBreakpoint(step_fraction=0.5, multi_fraction=0.4, ids_per_video=2),
    ], schedule_mode="linear")
    total = 16

    def relabel(sampler, step):
        if step == 3:  # a relabel lands mid-run: part of the state that must survive
            vid = sampler.buffered_video_ids()[0]
            pids = [vid * 100 + 50 + (i % 3) for i in range(20)]
            assert sampler.update_labels(vid, pids)

    straight = mixed(cfg, total_steps=total, rank=1, world_size=2)
    first = mixed(cfg, total_steps=total, rank=1, world_size=2)
    expected = []
    for step in range(total):
        relabel(straight, step)
        expected.append(plan_key(straight.next_batch()))
    for step in range(7):
        relabel(first, step)
        assert plan_key(first.next_batch()) == expected[step]
    state = json.loads(json.dumps(first.state_dict()))  # JSON-safe
    resumed = mixed(cfg, total_steps=total, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [plan_key(resumed.next_batch()) for _ in range(7, total)] == expected[7:]
    with pytest.raises(ValueError, match="rank 1 .* cannot resume rank 0"):
        mixed(cfg, total_steps=total, rank=0, world_size=2).load_state_dict(state)


# ----------------------------------------------------------------------------- videos added on top
def test_videos_add_keeps_the_baseline_multi_camera_images_and_adds_the_videos():
    """``videos: add``: every step has the multi-camera-only baseline's P_m x K_m images (the same
    ones, same seed) followed by V x G x K_s video images; ``replace`` gives part of them up."""
    baseline = small_cfg(videos="add", num_videos=0)
    added = small_cfg(videos="add")
    runs = [mixed(c) for c in (baseline, added)]
    for _ in range(12):
        base, add = (s.next_batch() for s in runs)
        assert len(base.multi_refs) == 4 * 2 and len(base.single_refs) == 0
        assert add.multi_refs == base.multi_refs and add.multi_pids.tolist() == base.multi_pids.tolist()
        assert len(add.single_refs) == 3 * 2 * 2 and len(add.refs) == 4 * 2 + 3 * 2 * 2
        assert add.is_single.sum() == 12 and (~add.is_single).sum() == 8


def test_videos_add_takes_no_split_schedule():
    with pytest.raises(ConfigError, match="sampler.schedule"):
        from_dict(SamplerConfig, {"videos": "add", "schedule": [
            {"step_fraction": 0.0, "multi_fraction": 0.5, "ids_per_video": 2}]}, "sampler")
    # G*K_s need not be a multiple of K_m when nothing is traded between the two parts
    cfg = from_dict(SamplerConfig, {"videos": "add", "multi_images_per_id": 3}, "sampler")
    shape = shape_at(cfg, 5, 10)
    assert (shape.num_multi_images, shape.num_single_images) == (16 * 3, 8 * 2 * 4)


@pytest.mark.parametrize("recipe", ["remix_demo.yaml", "dynamix_demo.yaml", "remix.yaml", "dynamix.yaml"])
def test_mixing_recipes_train_the_baselines_multi_camera_images_plus_videos(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("DYNAMIX_STORAGE_URI", str(tmp_path))  # the full recipes' paths
    from dynamix_core.config import load_config
    from pipelines.recipes import RECIPES_DIR
    from pipelines.train.config import TrainConfig

    base_recipe = "multicam_baseline_demo.yaml" if "demo" in recipe else "multicam_baseline.yaml"
    base = load_config(TrainConfig, RECIPES_DIR / base_recipe, []).sampler
    full = load_config(TrainConfig, RECIPES_DIR / recipe, [])
    assert full.loss.anchor_mean == "per_domain"  # the multi-camera anchors weigh as in the baseline's loss
    cfg = full.sampler
    for step in (0, 399, 799):
        want, got = shape_at(base, step, 800), shape_at(cfg, step, 800)
        assert want.num_single_images == 0 and want.num_multi_images == 16 * 4
        assert (got.num_multi_ids, got.multi_images_per_id) == (want.num_multi_ids, want.multi_images_per_id)
        assert got.num_single_images > 0
