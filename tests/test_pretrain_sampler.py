"""The pre-training sampler (dynamix_core.sampling.unlabeled): batch composition, every image once per
pass, determinism, exact resume, cycling streams smaller than the buffer, clear errors."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from dynamix_core.sampling import UnlabeledImageSampler, VideoSamples


def make_videos(sizes: list[int]) -> list[VideoSamples]:
    return [VideoSamples(v, [f"v{v}_{i}" for i in range(n)], [-1] * n) for v, n in enumerate(sizes)]


def finite(videos):
    return lambda position: iter(videos[position:])


def cycling(videos, pulls: Counter | None = None):
    def stream(position):
        for i in itertools.count(position):
            if pulls is not None:
                pulls["n"] += 1
            yield videos[i % len(videos)]
    return stream


def video_of(ref: str) -> int:
    return int(ref.split("_")[0][1:])


def test_batches_cap_images_per_video_and_use_every_image_once_per_pass():
    videos = make_videos([7, 3, 12, 5, 9, 4, 6, 8, 10, 2, 11, 3])
    total = sum(len(v.refs) for v in videos)
    sampler = UnlabeledImageSampler(finite(videos), batch_size=8, buffer_size=4, max_images_per_video=2, seed=1)
    seen = []
    for _ in range(total // 8 - 3):  # the last videos' images stay buffered at the end of the stream
        refs, vids = sampler.next_batch()
        assert len(refs) == 8 and max(Counter(vids.tolist()).values()) <= 2
        assert [video_of(r) for r in refs] == vids.tolist()
        seen += refs
    assert len(set(seen)) == len(seen), "an image was handed out twice in one pass"
    assert len(sampler.buffered_video_ids()) <= 4 + 8  # topped up past 4 only to fill a batch


def test_same_seed_same_batches_other_seed_other_batches():
    videos = make_videos([6] * 10)
    def draw(seed):
        s = UnlabeledImageSampler(cycling(videos), batch_size=6, buffer_size=5, max_images_per_video=2, seed=seed)
        return [s.next_batch()[0] for _ in range(12)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    # ranks draw from their own random streams
    a = UnlabeledImageSampler(cycling(videos), batch_size=6, buffer_size=5, max_images_per_video=2, seed=3, rank=0)
    b = UnlabeledImageSampler(cycling(videos), batch_size=6, buffer_size=5, max_images_per_video=2, seed=3, rank=1)
    assert a.next_batch()[0] != b.next_batch()[0]


def test_resume_continues_exactly():
    videos = make_videos([5, 9, 4, 7, 6, 8, 3, 10])
    make = lambda: UnlabeledImageSampler(cycling(videos), batch_size=6, buffer_size=4, max_images_per_video=2, seed=9)
    straight = make()
    expected = [straight.next_batch()[0] for _ in range(20)]
    first = make()
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == 7
    assert [resumed.next_batch()[0] for _ in range(13)] == expected[7:]
    with pytest.raises(ValueError, match="rank"):
        UnlabeledImageSampler(cycling(videos), batch_size=6, buffer_size=4, max_images_per_video=2,
                              rank=1).load_state_dict(state)


def test_cycling_stream_smaller_than_the_buffer_does_not_spin():
    """Three videos, a buffer of eight: the sampler stops pulling once every video is buffered and
    pulls again only when one retires, so the stream is not read round and round."""
    pulls = Counter()
    videos = make_videos([4, 4, 4])
    sampler = UnlabeledImageSampler(cycling(videos, pulls), batch_size=6, buffer_size=8, max_images_per_video=2, seed=0)
    for _ in range(30):
        refs, vids = sampler.next_batch()
        assert len(refs) == 6 and max(Counter(vids.tolist()).values()) <= 2
    assert pulls["n"] < 30 * 8, pulls


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="buffer_videos"):
        UnlabeledImageSampler(finite(make_videos([5] * 3)), batch_size=10, buffer_size=2, max_images_per_video=4)
    sampler = UnlabeledImageSampler(cycling(make_videos([5, 5])), batch_size=6, buffer_size=4, max_images_per_video=2)
    with pytest.raises(ValueError, match="lower data.batch_size"):
        sampler.next_batch()
    with pytest.raises(ValueError, match="empty"):
        UnlabeledImageSampler(finite([]), batch_size=2, buffer_size=2, max_images_per_video=1).next_batch()


def test_a_stream_of_few_videos_keeps_serving_full_batches():
    """All videos buffered and nearly used up: they retire early and come back whole from the stream."""
    videos = make_videos([5, 6, 7, 4])
    sampler = UnlabeledImageSampler(cycling(videos), batch_size=8, buffer_size=4, max_images_per_video=2, seed=2)
    counts = Counter()
    for _ in range(40):
        refs, vids = sampler.next_batch()
        assert len(refs) == 8 and sorted(Counter(vids.tolist()).values()) == [2, 2, 2, 2]
        counts.update(refs)
    assert set(counts) == {r for v in videos for r in v.refs}, "some image was never served"


def test_local_pretraining_gives_the_same_model_with_threaded_views():
    """``view_threads`` only parallelises decoding and augmentation: the views are seeded per image,
    so 1 and 3 threads train bit-identical weights."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from dynamix_core.data.transforms import TransformConfig
    from dynamix_core.model import create_backbone
    from dynamix_core.pretrain import MocoConfig
    from dynamix_core.pretrain.local import LocalPretrainConfig, LocalVideos, pretrain_local

    rng = np.random.default_rng(0)
    videos = make_videos([6, 5, 7, 4])
    images = {}
    for video in videos:
        for key in video.refs:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            images[key] = buf.getvalue()
    local = LocalVideos(videos, images)
    view = TransformConfig(height=32, width=16, crop_scale=(0.3, 1.0), pad=0, erase_prob=0.5)
    weights = []
    for threads in (1, 3):
        torch.manual_seed(0)
        backbone = create_backbone("test_resnet", (32, 16), 0.0)
        cfg = LocalPretrainConfig(steps=3, batch_size=8, buffer_videos=4, max_images_per_video=2, seed=1,
                                  objective=MocoConfig(dim=16, mlp_dim=32), view1=view, view2=view,
                                  view_threads=threads)
        pretrain_local(backbone, local, cfg, device=torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in backbone.parameters()]))
    assert torch.equal(weights[0], weights[1])
