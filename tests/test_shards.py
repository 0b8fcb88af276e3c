"""Shard primitives: atomic writer, byte offsets, WebDataset compatibility, and the validating tar reader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dynamix_core.data.records import BadInputError, InputReport, Record
from dynamix_core.data.shards import (
    ShardWriter,
    StaleShardError,
    iter_tar_samples,
    read_shard_manifest,
    read_members,
    read_shard_metadata,
    shard_manifest_path,
    shard_name,
)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _record(i: int) -> Record:
    return Record(key=f"ds_train_{i:04d}", dataset="ds", split="train", pid=i % 3, camid=i % 2,
                  video_id=-1, tracklet_id=-1, frame=i, domain="multi", source_pid=f"{i % 3}", source_camid="c1")


def _write(tmp_path, n: int = 5):
    tar_path = tmp_path / shard_name(0)
    samples = [(_record(i), _jpeg(i), "jpg") for i in range(n)]
    with ShardWriter(tar_path) as writer:
        for record, data, ext in samples:
            writer.add(record, data, ext)
        info = writer.commit({"plan_digest": "abc"})
    return tar_path, samples, info


def test_writer_offsets_and_metadata(tmp_path):
    tar_path, samples, info = _write(tmp_path)
    assert info.num_samples == 5 and info.tar_bytes == tar_path.stat().st_size
    raw = tar_path.read_bytes()
    rows = read_shard_manifest(tar_path).to_pylist()
    assert [r["key"] for r in rows] == [r.key for r, _, _ in samples]
    for row, (record, data, _) in zip(rows, samples):
        assert raw[row["offset"]:row["offset"] + row["size"]] == data  # random access by offset
        assert {k: row[k] for k in record.to_row()} == record.to_row()
    meta = read_shard_metadata(tar_path)
    assert meta["plan_digest"] == "abc" and meta["num_samples"] == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.parquet", "shard-000000.tar"]


def test_read_members_refuses_offsets_of_a_rewritten_shard(tmp_path):
    tar_path, samples, _ = _write(tmp_path)
    rows = read_shard_manifest(tar_path).to_pylist()
    offsets, sizes, keys = ([r[c] for r in rows] for c in ("offset", "size", "key"))
    assert read_members(tar_path, offsets, sizes, keys) == [data for _, data, _ in samples]
    with pytest.raises(StaleShardError, match="not ds_train_0000"):  # the right bytes under another key
        read_members(tar_path, offsets[1:2], sizes[1:2], ["ds_train_0000"])
    # A re-ingest of a grown source rewrites the shard: one more image in front shifts every member.
    with ShardWriter(tar_path) as writer:
        for record, data, ext in [(_record(99), _jpeg(99), "jpg"), *samples]:
            writer.add(record, data, ext)
        writer.commit({"plan_digest": "def"})
    for given_keys in (keys, None):  # without keys the tar header check alone catches it
        with pytest.raises(StaleShardError, match="the shard changed after its manifest was read"):
            read_members(tar_path, offsets, sizes, given_keys)


def test_shard_reads_back_with_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    long_record = _record(7)
    long_record.key = "ds_train_" + "x" * 120  # needs a PAX header
    tar_path = tmp_path / shard_name(0)
    samples = [(_record(i), _jpeg(i), "jpg") for i in range(3)] + [(long_record, _jpeg(7), "jpg")]
    with ShardWriter(tar_path) as writer:
        for sample in samples:
            writer.add(*sample)
        writer.commit({})
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert list(members) == [f"{r.key}.{ext}" for r, _, _ in samples for ext in ("jpg", "json")]
    for record, data, _ in samples:
        assert members[f"{record.key}.jpg"] == data
        assert json.loads(members[f"{record.key}.json"]) == record.to_row()
    got = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert [s["__key__"] for s in got] == [r.key for r, _, _ in samples]
    for s, (record, data, _) in zip(got, samples):
        assert s["jpg"] == data
        assert json.loads(s["json"]) == record.to_row()


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / shard_name(3)) as writer:
            writer.add(_record(0), _jpeg(0), "jpg")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_metadata_rejects_a_tar_that_does_not_match_its_manifest(tmp_path):
    tar_path, _, _ = _write(tmp_path)
    with open(tar_path, "ab") as fh:
        fh.write(b"\0" * 512)
    assert read_shard_metadata(tar_path) is None
    shard_manifest_path(tar_path).unlink()
    assert read_shard_metadata(tar_path) is None


def test_reader_returns_every_sample_of_a_good_shard(tmp_path):
    tar_path, samples, _ = _write(tmp_path)
    report = InputReport()
    got = list(iter_tar_samples(tar_path, report))
    assert [(r, d, e) for r, d, e in got] == samples
    assert len(report) == 0


def _raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _member_pair(i: int) -> list[tuple[str, bytes]]:
    record = _record(i)
    return [(f"{record.key}.jpg", _jpeg(i)), (f"{record.key}.json", json.dumps(record.to_row()).encode())]


def test_reader_rejects_unsafe_paths_and_malformed_json(tmp_path):
    bad_json = _record(2)
    members = (
        _member_pair(0)
        + [("/etc/evil.jpg", b"x"), ("../up.json", b"{}")]
        + _member_pair(1)
        + [(f"{bad_json.key}.jpg", _jpeg(2)), (f"{bad_json.key}.json", b"{not json")]
        + [("ds_train_0009.jpg", _jpeg(9)), ("ds_train_0009.json", b'{"key": "ds_train_0009"}')]  # fields missing
        + _member_pair(3)
    )
    tar_path = tmp_path / "bad.tar"
    _raw_tar(tar_path, members)
    report = InputReport()
    got = [record.key for record, _, _ in iter_tar_samples(tar_path, report)]
    assert got == [_record(i).key for i in (0, 1, 3)]  # nothing valid lost
    reasons = sorted((p.path.rsplit(":", 1)[-1], p.reason.split(":")[0]) for p in report.problems)
    assert reasons == [
        ("../up.json", "unsafe tar member path"),
        ("/etc/evil.jpg", "unsafe tar member path"),
        (bad_json.key, "malformed json"),
        ("ds_train_0009", "malformed json"),
    ]
    assert all(p.path.startswith(str(tar_path)) for p in report.problems)


def test_reader_reports_a_truncated_tar_and_keeps_what_came_before(tmp_path):
    tar_path, samples, _ = _write(tmp_path)
    rows = read_shard_manifest(tar_path).to_pylist()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_path.read_bytes()[:rows[3]["offset"] + 100])  # inside sample 3's image data
    report = InputReport()
    got = list(iter_tar_samples(cut, report))
    assert got == samples[:3]
    assert [p.reason.split(":")[0] for p in report.problems] == ["truncated tar"]
    assert report.problems[0].path == str(cut)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_handles_long_member_names(tmp_path, fmt):
    record = _record(0)
    record.key = "k" * 90 + "_" + "x" * 60  # longer than the 100-byte name field
    tar_path = tmp_path / "long.tar"
    data = _jpeg(0)
    with tarfile.open(tar_path, "w", format=fmt) as tar:
        meta = json.dumps(record.to_row()).encode()
        for name, payload in ((f"{record.key}.jpg", data), (f"{record.key}.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    report = InputReport()
    assert list(iter_tar_samples(tar_path, report)) == [(record, data, "jpg")] and len(report) == 0


def test_reader_joins_the_ustar_prefix_field(tmp_path):
    folder = "sub_" + "d" * 60  # ustar keeps a long folder in its 155-byte prefix field
    tar_path = tmp_path / "prefixed.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"{folder}/{'k' * 60}.txt")
        tar.addfile(info, io.BytesIO(b""))
    report = InputReport()
    assert list(iter_tar_samples(tar_path, report)) == []
    assert [p.path for p in report.problems] == [f"{tar_path}:{folder}/{'k' * 60}.txt"]


def test_reader_reports_a_corrupt_header(tmp_path):
    tar_path, samples, _ = _write(tmp_path)
    rows = read_shard_manifest(tar_path).to_pylist()
    raw = bytearray(tar_path.read_bytes())
    raw[rows[2]["offset"] - 512 + 5] ^= 0xFF  # flip a byte of sample 2's image header name
    tar_path.write_bytes(bytes(raw))
    report = InputReport()
    assert list(iter_tar_samples(tar_path, report)) == samples[:2]
    assert [p.reason for p in report.problems] == ["corrupt tar: header checksum mismatch"]


def test_reader_strict_mode_raises(tmp_path):
    tar_path = tmp_path / "bad.tar"
    _raw_tar(tar_path, _member_pair(0) + [("../x.jpg", b"x")])
    with pytest.raises(BadInputError, match=r"\.\./x\.jpg"):
        list(iter_tar_samples(tar_path, InputReport(strict=True)))
