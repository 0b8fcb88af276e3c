"""The in-process ShardReader: whole videos only from a single-camera set, a truncated tar reported."""

from __future__ import annotations

import pytest

from dynamix_core.data.reader import ShardReader, read_dataset_manifest
from dynamix_core.data.records import BadInputError, InputReport
from test_ingest import ingest, make_luperson_nl, make_market


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("videos")
    make_luperson_nl(tmp / "src", {1: 5, 2: 3, 4: 6, 7: 2})
    ingest(tmp / "src", tmp / "out", shard_max_count=8)
    return tmp / "out"


def test_iter_videos_refuses_a_multi_camera_set(tmp_path):
    make_market(tmp_path / "src", per_folder=2)
    ingest(tmp_path / "src", tmp_path / "out")
    with pytest.raises(BadInputError, match="single-camera"):
        next(ShardReader(tmp_path / "out").iter_videos())


def test_tar_cut_at_a_member_boundary_is_reported(video_set, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(video_set, copy)
    manifest = read_dataset_manifest(copy).to_pylist()
    first_shard = [r for r in manifest if r["shard"] == manifest[0]["shard"]]
    tar = copy / first_shard[0]["shard"]
    # cut right after the second sample's json member: a well-formed but shorter tar
    end_of_json = first_shard[2]["offset"] - 512
    tar.write_bytes(tar.read_bytes()[:end_of_json])
    report = InputReport()
    got = list(ShardReader(copy, report=report).iter_samples([first_shard[0]["shard"]]))
    assert len(got) == 2
    assert [p.reason.split(":")[0] for p in report.problems] == ["truncated tar"]
