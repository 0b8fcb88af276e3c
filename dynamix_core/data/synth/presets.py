"""Named SynthReID settings (``dynamix synth --preset``, ``dynamix experiment --preset``).

* ``demo`` - the demo's data: three labelled multi-camera sets of 150 train identities, 64 videos
  of the source's people and cameras, one scene, viewpoint and light per walk; a 50-identity target.
* ``real`` - shaped like the regime the method is for (LUPerson-NL : the labelled sets is about
  130 : 1 in identities): one labelled multi-camera set of 60 train identities; 600 videos with
  about 2,700 people (45x the labelled identities) drawn from the world rather than from the source
  - 30 % of them wear the target's clothing combination and 50 % of the videos are filmed by cameras
  like the target's, as street videos cover the target's kind of place - and walks that vary within
  a video (half cross into another scene, half turn, the light drifts by up to -+30 %); a target of
  200 identities. Fixed before any result on it was seen; kept whatever the results.
"""

from __future__ import annotations

PRESETS: dict[str, list[str]] = {
    "demo": ["num_videos=64", "multi_train_ids=150"],
    "real": [
        "num_multi_sets=1", "multi_train_ids=60", "multi_test_ids=40",
        "num_videos=600", "min_people_per_video=3", "max_people_per_video=6",
        "video_target_clothing_share=0.3", "video_target_camera_share=0.5",
        "scene_change_rate=0.5", "turn_rate=0.5", "light_change=0.3",
        "target_ids=200",
    ],
}


def preset_overrides(name: str) -> list[str]:
    """The ``KEY=VALUE`` settings of preset ``name`` (apply further overrides after them)."""
    if name not in PRESETS:
        raise ValueError(f"SynthReID preset {name!r}: expected one of {sorted(PRESETS)}")
    return list(PRESETS[name])
