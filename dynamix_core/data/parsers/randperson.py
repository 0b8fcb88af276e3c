"""RandPerson (SPEC 1.2): labeled synthetic images in one folder, ``pid_sXX_cYY_fNNNNNN.jpg``.

Cameras are scene-local, so the camera is namespaced by scene: ``sXX_cYY``.
"""

from __future__ import annotations

import re
from pathlib import Path

from dynamix_core.data.parsers._common import list_image_files, require_dir
from dynamix_core.data.records import ImageRef, InputReport, RawSample, make_key

NAME_RE = re.compile(r"(?P<pid>\d+)_s(?P<scene>\d+)_c(?P<cam>\d+)_f(?P<frame>\d+)\.jpg")


def parse_randperson(root: Path, report: InputReport, *, dataset: str) -> list[RawSample]:
    """Every image of a RandPerson folder: split "train", domain "synthetic"."""
    require_dir(root, "a RandPerson folder of pid_sXX_cYY_fNNNNNN.jpg images")
    samples = []
    for name in list_image_files(root, report):
        match = NAME_RE.fullmatch(name)
        if match is None:
            report.reject(root / name, "malformed name: expected pid_sXX_cYY_fNNNNNN.jpg")
            continue
        samples.append(RawSample(
            dataset=dataset,
            split="train",
            source_pid=match["pid"],
            source_camid=f"s{match['scene']}_c{match['cam']}",
            image=ImageRef(str(root / name)),
            key=make_key(dataset, "train", name[: -len(".jpg")]),
            domain="synthetic",
            frame=int(match["frame"]),
        ))
    return samples
