"""Generate the whole SynthReID data set under one folder (SPEC 1.4, layout in ``synthreid.json``).

    OUT/multi/synth_m0 ...      Market-1501 layout, one per multi-camera source set
    OUT/single/synth_video      LUPerson-NL layout (keys.pkl + lmdb/) + ground_truth.parquet
    OUT/target/synth_target     Market-1501 layout, query/ + bounding_box_test/ only
    OUT/synthreid.json          seed, sizes, the sets with their format names; written last

Crash safety: each set is written into a temporary sibling and renamed when complete; a re-run of the
same config skips finished sets and, once ``synthreid.json`` exists, does nothing at all. A folder
holding another config's output is refused rather than mixed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from dynamix_core.config import ConfigError, to_dict
from dynamix_core.data.synth.config import SynthConfig
from dynamix_core.data.synth.market import GALLERY, QUERY, TRAIN, MarketImage, MarketSet, multi_set, plan_units, \
    render_unit, target_set
from dynamix_core.data.synth.videos import VideoPlan, render_video, video_plans
from dynamix_core.data.synth.writer import VideoStoreWriter, atomic_dir, encode_jpeg, write_atomic_text

MANIFEST = "synthreid.json"
#: Present while a generation is unfinished: the fingerprint of the config writing the folder.
CLAIM = ".synthreid-partial.json"
VIDEO_SET = "synth_video"
_SPLIT_OF_FOLDER = {TRAIN: "train", QUERY: "query", GALLERY: "gallery"}


# --- work units (module level: they run in worker processes)

def _market_job(job: tuple[SynthConfig, MarketSet, list[MarketImage]]) -> list[bytes]:
    cfg, mset, unit = job
    return [encode_jpeg(img, cfg.jpeg_quality) for img in render_unit(cfg, mset, unit)]


def _video_job(job: tuple[SynthConfig, VideoPlan]) -> list[bytes]:
    cfg, plan = job
    return [encode_jpeg(img, cfg.jpeg_quality) for img in render_video(cfg, plan)]


class _Renderer:
    """Runs work units in order, in this process or in a pool of ``workers`` processes. At most a
    few units per worker are in flight, so memory stays bounded at any scale."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ConfigError(f"workers={workers}: must be >= 1")
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None

    def map(self, fn: Callable, jobs: Iterable) -> Iterator:
        if self.pool is None:
            yield from map(fn, jobs)
            return
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(self.pool.apply_async(fn, (job,)))
            if len(pending) >= 4 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


# --- summaries (from the plans: a resumed run reports skipped sets the same way)

def _market_summary(mset: MarketSet, units: list[list[MarketImage]], kind: str, path: str) -> dict:
    images = collections.Counter(_SPLIT_OF_FOLDER[im.folder] for unit in units for im in unit)
    extras = collections.Counter(im.kind for unit in units for im in unit)
    return {
        "name": mset.name, "kind": kind, "format": "market1501", "path": path,
        "num_images": sum(images.values()), "images": dict(sorted(images.items())),
        "identities": {"train": mset.num_train_ids, "test": mset.num_test_ids},
        "cameras": len(mset.cameras), "distractors": extras["distractor"], "junk": extras["junk"],
    }


def _video_summary(cfg: SynthConfig) -> dict:
    totals = collections.Counter()
    for plan in video_plans(cfg):
        totals.update(images=len(plan.boxes), people=len(plan.walks), tracklets=plan.num_tracklets,
                      fragmented_people=plan.num_fragmented, switched_tracklets=plan.num_switched,
                      target_camera_videos=int(plan.target_camera),
                      target_look_people=sum(w.target_look for w in plan.walks),
                      scene_changing_walks=sum(len(w.scenes) > 1 for w in plan.walks),
                      turning_walks=sum(w.turn_at >= 0 for w in plan.walks))
    return {
        "name": VIDEO_SET, "kind": "single", "format": "luperson_nl", "path": f"single/{VIDEO_SET}",
        "num_images": totals["images"], "images": {"train": totals["images"]}, "videos": cfg.num_videos,
        "people": totals["people"], "tracklets": totals["tracklets"],
        "fragmented_people": totals["fragmented_people"], "switched_tracklets": totals["switched_tracklets"],
        "target_camera_videos": totals["target_camera_videos"], "target_look_people": totals["target_look_people"],
        "scene_changing_walks": totals["scene_changing_walks"], "turning_walks": totals["turning_walks"],
    }


def _claim(out: Path, cfg: SynthConfig) -> None:
    """Mark ``out`` as being written by ``cfg``, refusing a folder that holds something else."""
    claim = out / CLAIM
    if claim.exists():
        theirs = json.loads(claim.read_text())["fingerprint"]
        if theirs != cfg.fingerprint():
            raise ConfigError(f"{out}: holds an unfinished SynthReID generation of other settings "
                              f"(fingerprint {theirs}); delete the folder or choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not a SynthReID folder; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic_text(claim, json.dumps({"fingerprint": cfg.fingerprint()}))


def generate(cfg: SynthConfig, out_dir: str | Path, progress: bool = True, workers: int = 1) -> dict:
    """Write the SynthReID data set of ``cfg`` under ``out_dir``; returns the summary (the content of
    ``synthreid.json`` plus ``out`` and ``skipped``: True when the folder was already complete).

    ``workers > 1`` renders in that many spawned processes (same bytes as one process); a script
    calling it must then guard its entry point with ``if __name__ == "__main__":``."""
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.exists():
        summary = json.loads(manifest.read_text())
        if summary["fingerprint"] != cfg.fingerprint():
            raise ConfigError(f"{out}: holds a finished SynthReID set of other settings "
                              f"(fingerprint {summary['fingerprint']}, seed {summary['seed']}); choose another --out")
        return {**summary, "out": str(out), "skipped": True}
    _claim(out, cfg)

    market = [(multi_set(cfg, i), "multi") for i in range(cfg.num_multi_sets)] + [(target_set(cfg), "target")]
    market_plans = [(mset, plan_units(cfg, mset)) for mset, _ in market]
    market_sets = [_market_summary(mset, units, kind, f"{kind}/{mset.name}")
                   for (mset, units), (_, kind) in zip(market_plans, market)]
    video_sets = [_video_summary(cfg)] if cfg.num_videos else []
    sets = market_sets[:-1] + video_sets + market_sets[-1:]  # sources first, the target last
    renderer = _Renderer(workers)
    try:
        with tqdm(total=sum(s["num_images"] for s in sets), disable=not progress, unit="img", desc="synth") as bar:
            for (mset, units), info in zip(market_plans, market_sets):
                with _set_dir(out / info["path"], info, bar) as tmp:
                    if tmp is not None:
                        _write_market(cfg, mset, units, tmp, renderer, bar)
            for info in video_sets:
                with _set_dir(out / info["path"], info, bar) as tmp:
                    if tmp is not None:
                        _write_videos(cfg, tmp, info["num_images"], renderer, bar)
    finally:
        renderer.close()
    summary = {"generator": "SynthReID", "fingerprint": cfg.fingerprint(), "seed": cfg.seed,
               "image_size": [cfg.height, cfg.width], "jpeg_quality": cfg.jpeg_quality, "sets": sets,
               "config": to_dict(cfg)}
    write_atomic_text(manifest, json.dumps(summary, indent=2) + "\n")
    (out / CLAIM).unlink()
    return {**summary, "out": str(out), "skipped": False}


@contextlib.contextmanager
def _set_dir(final: Path, info: dict, bar: tqdm) -> Iterator[Path | None]:
    """The temporary folder to write set ``info`` into, or None if an interrupted run of the same
    config already finished it."""
    if final.is_dir():
        bar.update(info["num_images"])
        yield None
        return
    final.parent.mkdir(exist_ok=True)
    with atomic_dir(final) as tmp:
        yield tmp


def _write_market(cfg: SynthConfig, mset: MarketSet, units: list[list[MarketImage]], root: Path,
                  renderer: _Renderer, bar: tqdm) -> None:
    for folder in sorted({im.folder for unit in units for im in unit}):
        (root / folder).mkdir()
    jobs = ((cfg, mset, unit) for unit in units)
    for unit, jpegs in zip(units, renderer.map(_market_job, jobs)):
        for image, data in zip(unit, jpegs):
            (root / image.folder / image.name).write_bytes(data)
        bar.update(len(unit))


def _write_videos(cfg: SynthConfig, root: Path, num_images: int, renderer: _Renderer, bar: tqdm) -> None:
    writer = VideoStoreWriter(root, num_images, cfg.height, cfg.width)
    plans = video_plans(cfg)
    # the plans are generated twice (cheap) so that none has to be kept once its video is written
    for plan, jpegs in zip(video_plans(cfg), renderer.map(_video_job, ((cfg, p) for p in plans))):
        rows = [(box.key(plan.video), plan.first_tracker_pid + box.tracklet, plan.walks[box.person].true_pid,
                 box.tracklet, box.frame) for box in plan.boxes]
        writer.add_video(plan.video, rows, jpegs)
        bar.update(len(rows))
    writer.close()
