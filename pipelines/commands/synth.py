"""Generate the SynthReID data set (SPEC 1.4) in the real on-disk formats.

    dynamix synth --out data/synthreid                      # defaults: ~3k images, well under a minute
    dynamix synth --out data/big --scale 100 --workers 8    # 100x the identities and videos
    dynamix synth --out data/s1 --seed 1 --set num_videos=40 --set fragment_rate=0.3
    dynamix synth --out data/real --preset real --workers 2  # the regime of docs/learning.md section 8

Writes OUT/multi/synth_m*/ (Market-1501 layout), OUT/single/synth_video/ (LUPerson-NL LMDB +
ground_truth.parquet), OUT/target/synth_target/ (Market layout, query + gallery) and
OUT/synthreid.json. The same settings give byte-identical files; re-running on a finished OUT does
nothing, and an interrupted run continues with the sets it had not finished.
"""

from __future__ import annotations

import argparse

from dynamix_core.config import field_help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dynamix_core.data.synth import SynthConfig
    from dynamix_core.data.synth.presets import PRESETS

    keys = "\n".join(f"  {key} (default {default}): {help}" for key, help, default in field_help(SynthConfig))
    parser.epilog = f"settings for --set KEY=VALUE:\n{keys}"
    parser.add_argument("--out", required=True, help="output folder (created; must be new, empty or a SynthReID folder)")
    parser.add_argument("--seed", type=int, default=None, help="master seed (overrides the config's seed)")
    parser.add_argument("--config", default=None, help="YAML file of SynthConfig settings")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="named settings applied over --config and under --set: demo (what `make demo` "
                             "generates), real (one small labelled set, 600 videos of world people and cameras "
                             "with scene, viewpoint and light changes, a 200-identity target)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set num_videos=40")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every identity/video/extra-image count (1000 gives millions of images)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (output is identical for any number)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_summary(summary: dict) -> str:
    """A few human-readable lines: images per set and split, identities, cameras, videos, tracker noise."""
    h, w = summary["image_size"]
    state = "already complete, nothing done" if summary["skipped"] else "written"
    lines = [f"SynthReID {state}: {summary['out']} (seed {summary['seed']}, {h}x{w} JPEG q{summary['jpeg_quality']})"]
    for s in summary["sets"]:
        splits = ", ".join(f"{split} {n}" for split, n in s["images"].items())
        line = f"  {s['name']:<14} {s['format']:<12} {s['num_images']:>8} images ({splits})"
        if s["kind"] == "single":
            line += (f"; {s['videos']} videos, {s['people']} people, {s['tracklets']} tracklets; noise: "
                     f"{s['fragmented_people']} people fragmented, {s['switched_tracklets']} tracklets with an id switch")
            if s.get("target_look_people") or s.get("target_camera_videos") or s.get("scene_changing_walks") \
                    or s.get("turning_walks"):
                line += (f"; world: {s['target_look_people']} people in the target's clothing, "
                         f"{s['target_camera_videos']} target-like cameras; {s['scene_changing_walks']} walks "
                         f"change scene, {s['turning_walks']} turn")
        else:
            ids = s["identities"]
            id_text = f"{ids['train']} train + {ids['test']} test ids" if ids["train"] else f"{ids['test']} ids"
            line += f"; {id_text}, {s['cameras']} cameras, {s['distractors']} distractors, {s['junk']} junk"
        lines.append(line)
    lines.append(f"  total          {sum(s['num_images'] for s in summary['sets']):>21} images")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dynamix_core.config import load_config
    from dynamix_core.data.synth import SynthConfig, generate

    from dynamix_core.data.synth.presets import preset_overrides

    overrides = preset_overrides(args.preset) if args.preset else []
    overrides += ([f"seed={args.seed}"] if args.seed is not None else []) + list(args.overrides)
    cfg = load_config(SynthConfig, args.config, overrides).scaled(args.scale)
    summary = generate(cfg, args.out, progress=not args.no_progress, workers=args.workers)
    print(format_summary(summary))
    return 0
