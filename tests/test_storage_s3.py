"""Object storage by URI against a real S3 API on loopback (moto's server, started by the tests):
the storage helpers, `dynamix ingest --out s3://...`, `dynamix inspect s3://...`, and the training
data layer reading shards from the bucket.

References are independent of the code under test's remote path: slices of the bytes written, a
local ingest of the same source (itself checked against the source files by tests/test_ingest.py),
and the server's own object versions (a bucket with versioning keeps one version per upload, so
"a re-run writes nothing" is read from the server, not from the ingest's own counters)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import boto3
import numpy as np
import pytest

from conftest import TINY_SYNTH, free_port
from dynamix_core import storage
from dynamix_core.data.reader import ShardReader, read_dataset_manifest
from dynamix_core.data.records import Record
from dynamix_core.data.run_index import read_video
from dynamix_core.data.run_index_writer import write_single_camera_index
from dynamix_core.data.shards import ShardWriter, StaleShardError, read_members
from dynamix_core.data.train_sets import MultiCameraSet, RankVideos
from dynamix_core.data.transforms import TransformConfig
from dynamix_core.evaluation.target import TargetSet
from dynamix_core.storage import StorageError
from pipelines.cli import main
from pipelines.ingest import IngestConfig, run_ingest

SETS = {"synth_m0": "multi", "synth_video": "single", "synth_target": "target"}
SHARD_COUNT = 40  # several shards per set


def _client(bucket_uri: str):
    """A boto3 client of the loopback S3 (an independent client, for server-side checks) and the bucket."""
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), bucket_uri.removeprefix("s3://")


def _versions(bucket_uri: str) -> dict[str, int]:
    """Uploads per key, from the server (the bucket must have versioning on)."""
    client, bucket = _client(bucket_uri)
    counts: dict[str, int] = {}
    for v in client.list_object_versions(Bucket=bucket).get("Versions", []):
        counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


def _ingest(source: Path, out, name: str, **kw):
    cfg = IngestConfig(root=source, out=out, dataset=name, workers=0, shard_max_count=SHARD_COUNT, **kw)
    return run_ingest(cfg, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny SynthReID (a multi-camera, a single-camera and a target set) ingested into local folders."""
    from dynamix_core.config import load_config
    from dynamix_core.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(load_config(SynthConfig, None, TINY_SYNTH + ["num_videos=3"]), root / "data", progress=False)
    for name, kind in SETS.items():
        _ingest(root / "data" / kind / name, root / "local" / name, name)
    return root


# ------------------------------------------------------------------------------------------- helpers


def test_round_trip_ranged_reads_and_listing(s3_bucket, monkeypatch):
    data = np.random.default_rng(0).bytes(300_000)
    uri = storage.join(s3_bucket, "dir", "blob.bin")
    storage.write_bytes_atomic(uri, data)
    assert storage.read_bytes(uri) == data and storage.size(uri) == len(data) and storage.exists(uri)
    assert storage.read_range(uri, 1000, 517) == data[1000:1517]
    assert storage.read_range(uri, len(data) - 10, 100) == data[-10:]  # the end of the object: shorter
    # unordered, overlapping, far apart and past the end; merged into shared GETs or one GET each
    ranges = [(290_000, 5000), (10, 20), (12, 100), (200_000, 1), (400_000, 10), (299_990, 50)]
    expected = [data[o:o + n] for o, n in ranges]
    assert storage.read_ranges(uri, ranges) == expected
    monkeypatch.setattr(storage, "COALESCE_GAP", 0)
    monkeypatch.setattr(storage, "COALESCE_MAX", 64)
    assert storage.read_ranges(uri, ranges) == expected
    with storage.open_input(uri, buffer_size=4096) as fh:
        assert fh.read(700) + fh.read(300) == data[:1000]

    assert storage.listdir(storage.join(s3_bucket, "dir")) == {"blob.bin": len(data)}
    assert storage.listdir(storage.join(s3_bucket, "nothing")) == {}
    missing = storage.join(s3_bucket, "dir", "other.bin")
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError, match="other.bin"):
        storage.read_bytes(missing)
    storage.delete(uri)
    assert storage.listdir(storage.join(s3_bucket, "dir")) == {}


def test_writes_leave_no_temporary_or_partial_object(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a shard's local temporary tar goes
    prefix = storage.join(s3_bucket, "shards")
    storage.write_bytes_atomic(storage.join(prefix, "ingest.json"), "old")
    storage.write_bytes_atomic(storage.join(prefix, "ingest.json"), "new content")
    assert storage.read_bytes(storage.join(prefix, "ingest.json")) == b"new content"

    record = Record(key="ds_train_0000", dataset="ds", split="train", domain="multi", pid=0, camid=0,
                    source_pid="1", source_camid="c1")
    tar_uri = storage.join(prefix, "shard-000000.tar")
    with pytest.raises(RuntimeError, match="writer killed"):
        with ShardWriter(tar_uri) as writer:
            writer.add(record, b"\xff\xd8 image bytes \xff\xd9", "jpg")
            raise RuntimeError("writer killed")
    assert storage.listdir(prefix) == {"ingest.json": len(b"new content")}  # nothing of the shard
    assert list(tmp_path.iterdir()) == []  # and no local leftovers

    with ShardWriter(tar_uri) as writer:
        writer.add(record, b"\xff\xd8 image bytes \xff\xd9", "jpg")
        info = writer.commit({"plan_digest": "x"})
    assert sorted(storage.listdir(prefix)) == ["ingest.json", "shard-000000.parquet", "shard-000000.tar"]
    assert storage.size(tar_uri) == info.tar_bytes and list(tmp_path.iterdir()) == []
    client, bucket = _client(s3_bucket)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # none left open


def test_errors_are_one_line_naming_the_bucket_or_endpoint(s3_bucket, monkeypatch, capsys):
    missing = "s3://no-such-bucket-dynamix/shards"
    calls = [lambda: storage.read_bytes(storage.join(missing, "manifest.parquet")),
             lambda: storage.write_bytes_atomic(storage.join(missing, "x"), b"1"),
             lambda: storage.makedirs(missing),
             lambda: storage.listdir(missing),
             lambda: read_dataset_manifest(missing)]
    for call in calls:
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-dynamix' does not exist") as info:
            call()
        assert "\n" not in str(info.value) and missing in str(info.value)

    # the CLI: one line on stderr, exit 2, before the source is even listed
    assert main(["ingest", "--root", "/nonexistent/source", "--format", "market1501", "--out", missing,
                 "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-bucket-dynamix" in err[0]

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match="unreachable") as info:
        storage.read_bytes(storage.join(s3_bucket, "x"))
    assert dead in str(info.value) and "\n" not in str(info.value)


# -------------------------------------------------------------------------------------------- ingest


def _remote_files(out: str) -> list[str]:
    """Every object under ``out`` (S3 or GCS), relative to it (``train/shard-000000.tar``): a recursive
    listing by pyarrow's file system, not the project's own (one folder deep) listing."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(out)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(path.rstrip("/") + "/") for i in infos if i.type == pafs.FileType.File)


def _same_as_local(out: str, local: Path) -> None:
    """The objects under ``out`` are the files of ``local`` (split folders included), byte for byte."""
    remote = _remote_files(out)
    assert remote == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name in remote:
        assert storage.read_bytes(storage.join(out, name)) == (local / name).read_bytes(), name


def test_ingest_to_s3_equals_a_local_ingest_and_a_rerun_writes_nothing(synth, s3_bucket, capsys):
    client, bucket = _client(s3_bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    def argv(name: str) -> list[str]:
        return ["ingest", "--root", str(synth / "data" / SETS[name] / name), "--out", f"{s3_bucket}/shards/{name}",
                "--dataset", name, "--workers", "0", "--shard-max-count", str(SHARD_COUNT), "--no-progress"]

    for name in SETS:
        assert main(argv(name)) == 0
        _same_as_local(f"{s3_bucket}/shards/{name}", synth / "local" / name)
        assert sum(n.endswith(".tar") for n in _remote_files(f"{s3_bucket}/shards/{name}")) > 1  # several shards
    uploads = _versions(s3_bucket)
    assert set(uploads.values()) == {1}

    capsys.readouterr()
    for name in SETS:  # a re-run: nothing uploaded, nothing deleted
        assert main(argv(name)) == 0
        assert capsys.readouterr().out.startswith("up to date")
    assert _versions(s3_bucket) == uploads


def test_incremental_reingest_on_s3_skips_unchanged_shards(synth, s3_bucket, tmp_path):
    client, bucket = _client(s3_bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    source = tmp_path / "src"
    shutil.copytree(synth / "data" / "multi" / "synth_m0", source)
    held = tmp_path / "held"
    held.mkdir()
    for path in sorted((source / "bounding_box_train").iterdir())[-12:]:  # the source before it grew
        path.rename(held / path.name)
    out, local = f"{s3_bucket}/m0", tmp_path / "local"
    _ingest(source, out, "synth_m0")
    _ingest(source, local, "synth_m0")
    before = _versions(s3_bucket)
    tars_before = {k for k in before if k.endswith(".tar")}

    for path in held.iterdir():  # the source grows
        path.rename(source / "bounding_box_train" / path.name)
    result = _ingest(source, out, "synth_m0")
    _ingest(source, local, "synth_m0")
    _same_as_local(out, local)
    after = _versions(s3_bucket)
    # new images go to new shards; every earlier shard is left as it was (one upload each)
    assert {k: after[k] for k in tars_before} == {k: 1 for k in tars_before}
    new_tars = {k for k in after if k.endswith(".tar")} - tars_before
    assert len(new_tars) == result.shards_written >= 1 and result.shards_skipped == len(tars_before)


def test_inspect_prints_the_same_summary_as_for_the_local_copy(synth, s3_bucket, capsys):
    out = f"{s3_bucket}/shards/synth_m0"
    _ingest(synth / "data" / "multi" / "synth_m0", out, "synth_m0")
    local = synth / "local" / "synth_m0"
    outputs = []
    for where in (out, str(local)):
        assert main(["inspect", where]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0][0].startswith(out) and outputs[1][0].startswith(str(local))
    assert outputs[0][1:] == outputs[1][1:] and len(outputs[0]) > 5
    summaries = []
    for where in (out, str(local)):
        assert main(["inspect", where, "--json"]) == 0
        summaries.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "dir"})
    assert summaries[0] == summaries[1]


# ------------------------------------------------------------------------------------- reading shards


def test_training_data_loads_from_s3_shards_as_from_local_ones(synth, s3_bucket, tmp_path):
    remote = {name: f"{s3_bucket}/shards/{name}" for name in SETS}
    for name, kind in SETS.items():
        _ingest(synth / "data" / kind / name, remote[name], name)
    local = {name: str(synth / "local" / name) for name in SETS}

    multi_s3, multi_local = MultiCameraSet.load([remote["synth_m0"]]), MultiCameraSet.load([local["synth_m0"]])
    assert multi_s3.keys == multi_local.keys and multi_s3.data == multi_local.data
    assert multi_s3.pid.tolist() == multi_local.pid.tolist() and multi_s3.camid.tolist() == multi_local.camid.tolist()

    # the run's index written to the bucket from the bucket's shards, and each video read back by it
    index_uri, index_file = f"{s3_bucket}/runs/r/labels/index.parquet", str(tmp_path / "index.parquet")
    info = write_single_camera_index([remote["synth_video"]], index_uri)
    write_single_camera_index([local["synth_video"]], index_file)
    index_s3, index_local = storage.read_table(index_uri), storage.read_table(index_file)
    assert index_s3.num_rows == info.num_rows and index_s3.drop(["tar"]).equals(index_local.drop(["tar"]))
    local_root = Path(local["synth_video"]).resolve()
    assert index_s3["tar"].to_pylist() == [f"{remote['synth_video']}/{Path(t).relative_to(local_root)}"
                                           for t in index_local["tar"].to_pylist()]
    videos_s3, videos_local = RankVideos.load(index_uri, 0, 1), RankVideos.load(index_file, 0, 1)
    for i in range(len(videos_s3)):
        keys, images = read_video(index_uri, videos_s3.item(i))
        assert (keys, images) == read_video(index_file, videos_local.item(i)) and len(keys) > 5
    assert len(videos_s3) == 3

    target_s3 = TargetSet.load(remote["synth_target"], TransformConfig())
    target_local = TargetSet.load(local["synth_target"], TransformConfig())
    assert target_s3.q_data == target_local.q_data and target_s3.g_data == target_local.g_data
    assert target_s3.g_pid.tolist() == target_local.g_pid.tolist() and len(target_s3.g_data) > 0

    for name in SETS:  # the sequential reader too
        got = [(s.record, s.data) for s in ShardReader(remote[name]).iter_samples()]
        assert got == [(s.record, s.data) for s in ShardReader(local[name]).iter_samples()] and got


def test_member_reads_on_s3_refuse_a_rewritten_or_truncated_shard(synth, s3_bucket):
    out = f"{s3_bucket}/shards/synth_m0"
    _ingest(synth / "data" / "multi" / "synth_m0", out, "synth_m0")
    manifest = read_dataset_manifest(out).to_pylist()
    first_shard, second_shard = list(dict.fromkeys(r["shard"] for r in manifest))[:2]
    first = [r for r in manifest if r["shard"] == first_shard]
    tar = f"{out}/{first_shard}"
    offsets, sizes, keys = [r["offset"] for r in first], [r["size"] for r in first], [r["key"] for r in first]
    local_tar = synth / "local" / "synth_m0" / first_shard
    assert read_members(tar, offsets, sizes, keys) == read_members(local_tar, offsets, sizes, keys)

    other = storage.read_bytes(f"{out}/{second_shard}")  # a re-ingest rewrote the shard meanwhile
    storage.write_bytes_atomic(tar, other)
    with pytest.raises(StaleShardError, match="shard changed after its manifest was read"):
        read_members(tar, offsets, sizes, keys)
    storage.write_bytes_atomic(tar, local_tar.read_bytes()[:offsets[-1]])  # cut inside the last member
    with pytest.raises(StaleShardError, match="truncated"):
        read_members(tar, offsets[-1:], sizes[-1:], keys[-1:])


def _put(bucket_uri: str, key: str, data: bytes) -> None:
    client, bucket = _client(bucket_uri)
    client.put_object(Bucket=bucket, Key=key, Body=data)


def _replace_in_a_later_second(bucket_uri: str, key: str, data: bytes) -> None:
    """Overwrite ``key`` with ``data`` so that the store's modification time differs from the one before
    (S3 keeps whole seconds): re-put until the reported time changes, no fixed sleep."""
    uri = f"{bucket_uri}/{key}"
    fs, path = storage.resolve(uri)
    before = fs.get_file_info(path).mtime_ns
    while True:
        _put(bucket_uri, key, data)
        if fs.get_file_info(path).mtime_ns != before:
            return


def test_cached_copies_of_objects_follow_the_store(s3_bucket, tmp_path, monkeypatch):
    """model.weights, recipes, raw trees and evaluation suites on a bucket are read through a local cache:
    a second read downloads nothing, but an object replaced by one of the SAME size (new weights of the same
    architecture) is fetched again, and a file gone from a tree is gone from its copy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _put(s3_bucket, "w/weights.bin", b"A" * 64)
    first = storage.local_file(f"{s3_bucket}/w/weights.bin")
    assert first.read_bytes() == b"A" * 64 and first.is_relative_to(tmp_path / "cache")
    calls = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda *a: calls.append(a) or real(*a))
    assert storage.local_file(f"{s3_bucket}/w/weights.bin") == first and calls == []
    _replace_in_a_later_second(s3_bucket, "w/weights.bin", b"B" * 64)
    assert storage.local_file(f"{s3_bucket}/w/weights.bin").read_bytes() == b"B" * 64 and len(calls) == 1
    with pytest.raises(FileNotFoundError, match="w/missing.bin"):
        storage.local_file(f"{s3_bucket}/w/missing.bin")

    for key, data in {"raw/a/1.jpg": b"x" * 10, "raw/b/2.jpg": b"y" * 20, "raw/list.txt": b"1\n2\n"}.items():
        _put(s3_bucket, key, data)
    tree = storage.local_tree(f"{s3_bucket}/raw")
    assert {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()} == \
        {"a/1.jpg": b"x" * 10, "b/2.jpg": b"y" * 20, "list.txt": b"1\n2\n"}
    calls.clear()
    client, bucket = _client(s3_bucket)
    client.delete_object(Bucket=bucket, Key="raw/b/2.jpg")
    _replace_in_a_later_second(s3_bucket, "raw/list.txt", b"3\n4\n")
    assert storage.local_tree(f"{s3_bucket}/raw") == tree
    assert {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()} == \
        {"a/1.jpg": b"x" * 10, "list.txt": b"3\n4\n"}
    assert [c[0] for c in calls] == [f"{s3_bucket}/raw/list.txt"]  # only the changed file is fetched
    with pytest.raises(FileNotFoundError, match="nothing"):
        storage.local_tree(f"{s3_bucket}/nothing")


class _CountingFile:
    """A random-access file that counts the bytes read through it."""

    def __init__(self, inner, counter: list):
        self.inner, self.counter = inner, counter

    def read(self, n=-1):
        data = self.inner.read() if n is None or n < 0 else self.inner.read(n)
        self.counter.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def test_a_column_or_a_manifest_check_reads_a_fraction_of_a_large_parquet(s3_bucket, monkeypatch):
    """The label store's start needs one column of the run's index and the driver's ingest check
    needs the manifest's footer: on an object store neither may download the whole object (a
    10M-row manifest is gigabytes). Bytes fetched are counted at the storage layer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dynamix_core.data.reader import check_dataset_manifest
    from dynamix_core.data.shards import DATASET_SCHEMA, MANIFEST_NAME

    n = 200_000
    text = pa.array([f"synth_video/v{i // 64:06d}/f{i % 64:03d}_{i * 7919 % 100003:06d}" for i in range(n)])
    columns = {f.name: (pa.array(np.arange(n, dtype=np.int64)) if pa.types.is_integer(f.type) else text)
               for f in DATASET_SCHEMA}
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=DATASET_SCHEMA), buf, row_group_size=50_000)
    data = buf.getvalue().to_pybytes()
    root = storage.join(s3_bucket, "shards", "big")
    storage.write_bytes_atomic(storage.join(root, MANIFEST_NAME), data)

    fetched: list[int] = []
    real_read_bytes, real_open_random = storage.read_bytes, storage.open_random
    monkeypatch.setattr(storage, "read_bytes", lambda uri: (lambda b: (fetched.append(len(b)), b)[1])(real_read_bytes(uri)))
    monkeypatch.setattr(storage, "open_random", lambda uri: _CountingFile(real_open_random(uri), fetched))

    pids = storage.read_table(storage.join(root, MANIFEST_NAME), columns=["pid"])["pid"].to_numpy()
    assert np.array_equal(pids, np.arange(n))
    assert sum(fetched) < len(data) / 4, (sum(fetched), len(data))
    fetched.clear()
    assert check_dataset_manifest(root) == n
    assert sum(fetched) < 64 * 1024, (sum(fetched), len(data))
    bad = storage.join(s3_bucket, "shards", "bad")
    storage.write_bytes_atomic(storage.join(bad, MANIFEST_NAME), data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME}.*re-run `dynamix ingest"):
        check_dataset_manifest(bad)
    with pytest.raises(FileNotFoundError, match="not a finished ingest"):
        check_dataset_manifest(storage.join(s3_bucket, "shards", "none"))
