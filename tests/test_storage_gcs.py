"""``gs://`` against a real Google Cloud Storage JSON API on loopback (gcp-storage-emulator, started by
the tests in its own process; ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` points the code at it): the
storage helpers, `dynamix ingest --out gs://...`, `dynamix inspect gs://...` and the training data
layer reading shards and the run's index from the bucket. The references are the same as for S3
(tests/test_storage_s3.py): slices of the bytes written and a local ingest of the same source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynamix_core import storage
from dynamix_core.data.run_index import read_video
from dynamix_core.data.run_index_writer import write_single_camera_index
from dynamix_core.data.train_sets import RankVideos
from pipelines.cli import main
from test_storage_s3 import SETS, SHARD_COUNT, _remote_files, _same_as_local, synth  # noqa: F401  (synth: the fixture)


def test_round_trip_ranged_reads_listing_and_delete(gcs_bucket):
    data = np.random.default_rng(0).bytes(3_000_000)  # above one socket buffer: ranged GETs while one is open
    uri = storage.join(gcs_bucket, "dir", "blob.bin")
    storage.write_bytes_atomic(uri, data)
    assert storage.read_bytes(uri) == data and storage.size(uri) == len(data) and storage.exists(uri)
    assert storage.read_range(uri, 1000, 517) == data[1000:1517]
    assert storage.read_range(uri, len(data) - 10, 100) == data[-10:]
    with storage.open_random(uri) as fh:
        fh.seek(2_000_000)
        assert fh.read(1000) == data[2_000_000:2_001_000]
    storage.write_bytes_atomic(storage.join(gcs_bucket, "dir", "sub", "x.txt"), b"x")
    assert storage.listdir(storage.join(gcs_bucket, "dir"))["blob.bin"] == len(data)
    storage.write_bytes_atomic(uri, b"replaced")  # an overwrite is one upload, seen whole
    assert storage.read_bytes(uri) == b"replaced"
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="blob.bin"):
        storage.read_bytes(uri)


def test_ingest_inspect_and_the_run_index_on_gcs_equal_the_local_ones(synth, gcs_bucket, tmp_path, capsys):  # noqa: F811
    def argv(name: str) -> list[str]:
        return ["ingest", "--root", str(synth / "data" / SETS[name] / name), "--out", f"{gcs_bucket}/shards/{name}",
                "--dataset", name, "--workers", "0", "--shard-max-count", str(SHARD_COUNT), "--no-progress"]

    name = "synth_video"
    local = synth / "local" / name
    remote = f"{gcs_bucket}/shards/{name}"
    assert main(argv(name)) == 0
    _same_as_local(remote, local)
    assert sum(n.endswith(".tar") for n in _remote_files(remote)) > 1  # several shards
    def mtimes() -> dict:
        fs, path = storage.resolve(remote)
        return {n: fs.get_file_info(f"{path}/{n}").mtime for n in _remote_files(remote)}

    stamps = mtimes()
    capsys.readouterr()
    assert main(argv(name)) == 0  # a re-run uploads nothing
    assert capsys.readouterr().out.startswith("up to date")
    assert mtimes() == stamps

    assert main(["inspect", remote]) == 0
    on_gcs = capsys.readouterr().out
    assert main(["inspect", str(local)]) == 0
    assert on_gcs.replace(remote, "ROOT") == capsys.readouterr().out.replace(str(local), "ROOT")

    # the run's index written to the bucket from the bucket's shards, and each video read back by it
    index_uri, index_file = f"{gcs_bucket}/runs/r/labels/index.parquet", str(tmp_path / "index.parquet")
    write_single_camera_index([remote], index_uri)
    write_single_camera_index([str(local)], index_file)
    index_gcs, index_local = storage.read_table(index_uri), storage.read_table(index_file)
    assert index_gcs.drop(["tar"]).equals(index_local.drop(["tar"]))
    assert index_gcs["tar"].to_pylist() == [f"{remote}/{Path(t).relative_to(local.resolve())}"
                                            for t in index_local["tar"].to_pylist()]
    videos_gcs, videos_local = RankVideos.load(index_uri, 0, 1), RankVideos.load(index_file, 0, 1)
    assert len(videos_gcs) == 3
    for i in range(len(videos_gcs)):
        keys, images = read_video(index_uri, videos_gcs.item(i))
        assert (keys, images) == read_video(index_file, videos_local.item(i)) and len(keys) > 5


def test_an_unreachable_endpoint_fails_in_one_line_after_the_retry_limit(monkeypatch):
    import time

    from conftest import free_port

    monkeypatch.setattr(storage, "GCS_RETRY_S", 1.0)
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("gs://some-bucket/x.parquet")
    assert time.monotonic() - t0 < 20
    text = str(err.value)
    assert "\n" not in text and text.startswith("gs://some-bucket/x.parquet: cannot ")
    assert "unreachable" in text and "Google Cloud Storage" in text
