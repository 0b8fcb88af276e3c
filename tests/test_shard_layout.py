"""Shard sets as the WebDataset ecosystem reads them, without this project's code: one folder of tars
per split, a ``.cls`` member with a global identity, the README's loader. Read here with
``webdataset`` and ``ray.data.read_webdataset``; the expectations come from the source files and the
documented identity rule, written out again here."""

from __future__ import annotations

import glob
import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO_ROOT
from pipelines.ingest import IngestConfig, run_ingest

FOLDERS = {"bounding_box_train": "train", "bounding_box_test": "gallery", "query": "query"}


def image_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_market(root: Path, seed: int = 0) -> dict[str, tuple[str, str, bytes]]:
    """A Market-1501 folder (pids 1..5 in every split, two distractors 0000 in the gallery); returns
    ``file stem -> (split, source pid, bytes)``."""
    files = {}
    for f, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        names = [f"{i % 5 + 1:04d}_c{i % 6 + 1}s1_{100 * f + i:06d}_01.jpg" for i in range(10)]
        if folder == "bounding_box_test":
            names += ["0000_c1s1_000900_01.jpg", "0000_c2s1_000901_01.jpg"]
        for i, name in enumerate(names):
            data = image_bytes(1000 * seed + 100 * f + i)
            (root / folder / name).write_bytes(data)
            files[name[:-4]] = (FOLDERS[folder], name[:4], data)
    return files


def global_identity(dataset: str, source_pid: str) -> int:
    """The documented rule (README, docs/spec.md 1.3): the first 8 bytes of SHA-256 of
    ``dataset/source_pid``, big-endian, shifted right by 12 bits (52 bits: exact as a float too)."""
    return int.from_bytes(hashlib.sha256(f"{dataset}/{source_pid}".encode()).digest()[:8], "big") >> 12


def expected_samples(files, dataset: str, split: str) -> dict[str, tuple[int, bytes]]:
    """key -> (cls, image bytes) of the source's images of ``split``; a distractor has no identity (-1)."""
    return {f"{dataset}_{split}_{stem}": (-1 if pid == "0000" else global_identity(dataset, pid), data)
            for stem, (s, pid, data) in files.items() if s == split}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    files = make_market(root / "src")
    run_ingest(IngestConfig(root=root / "src", out=root / "out", dataset="mkt", workers=0, shard_max_count=4),
               progress=False)
    return root / "out", files


def test_each_split_folder_holds_only_its_tars(market):
    out, files = market
    for split in ("train", "query", "gallery"):
        names = sorted(p.name for p in (out / split).iterdir())
        assert names and all(re.fullmatch(r"shard-\d{6}\.tar", n) for n in names), names
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {"train", "query", "gallery"}


def test_webdataset_reads_each_split_with_its_global_identities(market):
    wds = pytest.importorskip("webdataset")
    out, files = market
    for split in ("train", "query", "gallery"):
        urls = sorted(glob.glob(str(out / split / "*.tar")))
        got = {key: (cls, image) for key, cls, image in
               wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "cls", "jpg")}
        want = expected_samples(files, "mkt", split)
        assert set(got) == set(want), split  # no image of another split
        for key, (cls, image) in got.items():
            assert cls == want[key][0]
            assert np.array_equal(image, pixels(want[key][1]))
    assert any(cls == -1 for cls, _ in expected_samples(files, "mkt", "gallery").values())


@pytest.mark.ray
def test_ray_data_reads_a_split_folder_as_it_is(market, ray_local):
    out, files = market
    rows = ray_local.data.read_webdataset(str(out / "train")).take_all()
    want = expected_samples(files, "mkt", "train")
    assert {r["__key__"]: r["cls"] for r in rows} == {k: cls for k, (cls, _) in want.items()}
    assert all(np.array_equal(r["jpg"], pixels(want[r["__key__"]][1])) for r in rows)


def _readme_loader() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- loader -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md: no ```python block after <!-- loader -->"
    return block[1]


@pytest.mark.ray
def test_the_readme_loader_trains_on_train_images_only(market, ray_local):
    out, files = market
    code = _readme_loader()
    assert len(code.strip().splitlines()) <= 5
    namespace: dict = {}
    exec(code.replace("data/shards/market1501", str(out)), namespace)  # noqa: S102 - the documented snippet
    want = expected_samples(files, "mkt", "train")
    images = list(namespace["train"])
    assert sorted(cls for _, cls in images) == sorted(cls for cls, _ in want.values())
    assert sorted(np.asarray(img).tobytes() for img, _ in images) == sorted(pixels(d).tobytes() for _, d in want.values())
    rows = namespace["train_ray"].take_all()
    assert {r["__key__"] for r in rows} == set(want)  # no query or gallery image


def test_identities_do_not_collide_across_shard_sets_and_the_mapping_is_stored(tmp_path, market):
    """Two sets ingested apart, with the same source pids (1..5): their ``.cls`` ids are disjoint,
    and each set stores its mapping (``identities.parquet``) beside its split folders."""
    wds = pytest.importorskip("webdataset")
    out, files = market
    make_market(tmp_path / "src", seed=1)
    run_ingest(IngestConfig(root=tmp_path / "src", out=tmp_path / "other", dataset="other", workers=0), progress=False)

    def classes(root: Path) -> set[int]:
        urls = sorted(glob.glob(str(root / "*" / "*.tar")))
        return {cls for (cls,) in wds.WebDataset(urls, shardshuffle=False).to_tuple("cls").map_tuple(int)} - {-1}

    assert len(classes(out)) == len(classes(tmp_path / "other")) == 5
    assert not classes(out) & classes(tmp_path / "other")
    table = pq.read_table(out / "identities.parquet").to_pylist()
    assert {(r["dataset"], r["source_pid"]): r["cls"] for r in table} == {
        ("mkt", pid): global_identity("mkt", pid) for _, pid, _ in files.values() if pid != "0000"}


def test_an_old_flat_shard_set_stays_readable_and_a_reingest_lays_it_out_by_split(tmp_path, market):
    """A set written before the split folders (tars and their manifests beside manifest.parquet) is
    still read by the project's readers; ingesting into its folder again rewrites it by split and
    leaves none of the old files."""
    import pyarrow as pa

    from dynamix_core.data.reader import ShardReader, read_dataset_manifest
    from pipelines.commands.inspect import inspect_shard_set

    out, files = market
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = pq.read_table(old / "manifest.parquet")
    for rel in set(manifest["shard"].to_pylist()):  # train/shard-000000.tar -> shard-000000.tar
        (old / rel).rename(old / Path(rel).name)
        (old / "manifests" / rel).with_suffix(".parquet").rename((old / Path(rel).name).with_suffix(".parquet"))
    shutil.rmtree(old / "manifests")
    for split in ("train", "query", "gallery"):
        (old / split).rmdir()
    (old / "identities.parquet").unlink()
    flat = pa.array([Path(s).name for s in manifest["shard"].to_pylist()])
    pq.write_table(manifest.set_column(manifest.schema.get_field_index("shard"), "shard", flat), old / "manifest.parquet")

    samples = {s.key: s.data for s in ShardReader(old).iter_samples()}
    assert samples == {f"mkt_{split}_{stem}": data for stem, (split, _, data) in files.items()}
    assert inspect_shard_set(old, [])["images"] == len(files)

    src = tmp_path / "src"
    shutil.copytree(out.parent / "src", src)
    run_ingest(IngestConfig(root=src, out=old, dataset="mkt", workers=0, shard_max_count=4), progress=False)
    assert sorted(p.name for p in old.iterdir() if p.is_file()) == ["identities.parquet", "ingest.json",
                                                                    "manifest.parquet", "plan.parquet"]
    assert {r["shard"] for r in read_dataset_manifest(old).to_pylist()} == set(manifest["shard"].to_pylist())


def test_a_split_folder_given_where_a_shard_set_is_expected_is_named_in_one_line(market, capsys):
    """``ROOT/train`` is what WebDataset readers take; the project's readers take ``ROOT`` and say so."""
    from dynamix_core.data.reader import ShardReader
    from pipelines.cli import main

    out, _ = market
    with pytest.raises(FileNotFoundError) as info:
        ShardReader(out / "train")
    assert str(info.value) == (f"{out / 'train'} is the 'train' split folder of the shard set {out}; "
                               f"pass the set's folder ({out}) instead")
    assert main(["inspect", str(out / "query")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pass the set's folder ({out})" in err[0]


def test_two_identities_with_one_global_id_stop_the_ingest_in_one_line(tmp_path, monkeypatch):
    """A hash collision is an error before any shard is written, never two people merged into one id."""
    import pipelines.ingest as ingest_mod
    from dynamix_core.data.records import BadInputError

    make_market(tmp_path / "src")
    monkeypatch.setattr(ingest_mod, "global_identity", lambda dataset, pid: 7)
    with pytest.raises(BadInputError) as info:
        run_ingest(IngestConfig(root=tmp_path / "src", out=tmp_path / "out", dataset="mkt", workers=0), progress=False)
    assert "\n" not in str(info.value) and "same global id 7" in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tar"))
