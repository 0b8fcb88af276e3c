"""Market-1501-style folder layouts: Market-1501, DukeMTMC-reID and CUHK03-NP (SPEC 1.2).

All three keep one folder per split - ``bounding_box_train/`` (train), ``bounding_box_test/``
(gallery), ``query/`` (query) - and encode identity and camera in the file name:

* Market-1501 ``0002_c1s1_000451_03.jpg``: pid ``0002``, camera 1 of 6 (``s1`` = the camera's
  recording sequence). pid ``-1`` = junk, dropped and counted; pid ``0000`` = distractor, kept in
  the gallery as a negative and rejected anywhere else.
* DukeMTMC-reID ``0001_c2_f0046182.jpg``: camera 2 of 8, frame 46182 of that camera's video.
* CUHK03-NP ``0001_c1_1.png`` under ``labeled/`` or ``detected/``: camera 1 of the pair's 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dynamix_core.data.parsers._common import count_junk, list_image_files, require_dir
from dynamix_core.data.records import BadInputError, ImageRef, InputReport, RawSample, make_key

#: (folder, split) in the order they are read.
SPLIT_FOLDERS = (("bounding_box_train", "train"), ("bounding_box_test", "gallery"), ("query", "query"))
CUHK03_VARIANTS = ("labeled", "detected")


@dataclass(frozen=True, slots=True)
class MarketLayout:
    """The naming rule of one Market-style dataset."""

    title: str
    name_re: re.Pattern  # named groups: pid, cam, and frame where the name carries one
    name_form: str  # the rule in words, for reports
    ext: str
    num_cams: int
    junk_pid: str | None = None
    distractor_pid: str | None = None


# Market-1501's frame number counts within one (camera, sequence) recording, so it is not a frame
# index of a video and is not kept (the co-occurrence rule would misread it).
MARKET1501 = MarketLayout(
    "Market-1501", re.compile(r"(?P<pid>-1|\d{4})_c(?P<cam>\d)s\d_\d{6}_\d{2}\.jpg"),
    "PPPP_cCsS_FFFFFF_NN.jpg", "jpg", num_cams=6, junk_pid="-1", distractor_pid="0000",
)
DUKEMTMC = MarketLayout(
    "DukeMTMC-reID", re.compile(r"(?P<pid>\d{4})_c(?P<cam>\d)_f(?P<frame>\d{7})\.jpg"),
    "PPPP_cC_fFFFFFFF.jpg", "jpg", num_cams=8,
)
CUHK03NP = MarketLayout(
    "CUHK03-NP", re.compile(r"(?P<pid>\d{4})_c(?P<cam>\d)_\d+\.png"), "PPPP_cC_N.png", "png", num_cams=2,
)


def parse_market_layout(root: Path, report: InputReport, *, dataset: str, layout: MarketLayout) -> list[RawSample]:
    """Every image of the split folders present under ``root`` named by ``layout``'s rule."""
    expected = f"a {layout.title} folder holding bounding_box_train/, bounding_box_test/ and/or query/"
    require_dir(root, expected)
    folders = [(root / name, split) for name, split in SPLIT_FOLDERS if (root / name).is_dir()]
    if not folders:
        raise BadInputError(
            f"{root}: none of bounding_box_train/, bounding_box_test/, query/ found; expected {expected}")
    samples = []
    for folder, split in folders:
        for name in list_image_files(folder, report):
            sample = _parse_name(folder / name, split, report, dataset, layout)
            if sample is not None:
                samples.append(sample)
    return samples


def _parse_name(path: Path, split: str, report: InputReport, dataset: str, layout: MarketLayout) -> RawSample | None:
    match = layout.name_re.fullmatch(path.name)
    if match is None:
        report.reject(path, f"malformed name: expected {layout.name_form}")
        return None
    pid, cam = match["pid"], int(match["cam"])
    if pid == layout.junk_pid:
        count_junk(report, path, f"pid {pid} ({layout.title} convention: dropped at load)")
        return None
    if not 1 <= cam <= layout.num_cams:
        report.reject(path, f"bad camera: c{cam} outside c1-c{layout.num_cams}")
        return None
    if pid == layout.distractor_pid and split != "gallery":
        report.reject(path, f"misplaced distractor: pid {pid} belongs in bounding_box_test/ only")
        return None
    frame = match.groupdict().get("frame")
    return RawSample(
        dataset=dataset,
        split=split,
        source_pid=pid,
        source_camid=f"c{cam}",
        image=ImageRef(str(path), ext=layout.ext),
        key=make_key(dataset, split, path.stem),
        frame=int(frame) if frame is not None else -1,
    )


def parse_market1501(root: Path, report: InputReport, *, dataset: str) -> list[RawSample]:
    """Market-1501 (``0002_c1s1_000451_03.jpg``, cameras 1-6, junk ``-1``, distractors ``0000``)."""
    return parse_market_layout(root, report, dataset=dataset, layout=MARKET1501)


def parse_dukemtmc(root: Path, report: InputReport, *, dataset: str) -> list[RawSample]:
    """DukeMTMC-reID (``0001_c2_f0046182.jpg``, cameras 1-8)."""
    return parse_market_layout(root, report, dataset=dataset, layout=DUKEMTMC)


def parse_cuhk03np(root: Path, report: InputReport, *, dataset: str, variant: str = "labeled") -> list[RawSample]:
    """CUHK03-NP (``0001_c1_1.png``, cameras 1-2): the ``variant`` ("labeled" or "detected") folder
    under ``root``, itself in the Market layout."""
    if variant not in CUHK03_VARIANTS:
        raise ValueError(f"cuhk03np variant {variant!r}: expected one of {list(CUHK03_VARIANTS)}")
    require_dir(root, "a CUHK03-NP folder holding labeled/ and/or detected/")
    variant_root = root / variant
    if not variant_root.is_dir():
        present = [v for v in CUHK03_VARIANTS if (root / v).is_dir()]
        raise BadInputError(
            f"{root}: no {variant}/ folder (found {present or 'neither'}); expected CUHK03-NP with labeled/ "
            f"and/or detected/, each holding bounding_box_train/, bounding_box_test/, query/"
        )
    return parse_market_layout(variant_root, report, dataset=dataset, layout=CUHK03NP)
