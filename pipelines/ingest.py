"""Ingest a source data set into WebDataset shards + parquet manifests (SPEC 1.3), with Ray Data.

    summary = run_ingest(IngestConfig(format="auto", root=Path("data/market"), out="shards/market"))

1. The driver parses the source (a cheap listing: no image is read) into a columnar sample table
   (:mod:`dynamix_core.data.sample_table`), builds the global :class:`IdentityMaps`, and plans
   shards deterministically: single-camera videos are packed whole and contiguous (a video never
   straddles two shards), other images by count and estimated size (file sizes, LMDB value
   lengths). Planning runs on Arrow columns and numpy codes, with Python loops over units, not
   images: each shard plan is a slice of one Arrow table.
   A shard holds images of one split only: each split is packed on its own, its shards contiguous.
2. Ray Data tasks write the shards (``from_items(plans).map(write)``, each plan one Arrow IPC item,
   :data:`SHARDS_PER_WORKER` x workers plans per dataset, so the driver never holds every item):
   each reads the image bytes, validates them by a full decode, and writes ``<split>/shard-NNNNNN.tar``
   (image, json record and ``.cls`` global identity per sample) + its parquet manifest
   (``manifests/<split>/shard-NNNNNN.parquet``) atomically: a split folder holds nothing but finished
   tars (the layout is in :mod:`dynamix_core.data.shards`). ``workers=0`` runs the same writer in this
   process, without Ray.
3. The driver writes ``ingest.json`` (the summary), ``identities.parquet`` (each identity's global id)
   and, last, ``manifest.parquet`` (one row per image, with its shard), atomically and only when their
   content changed.

Resumable and idempotent: a shard whose manifest matches its plan (same samples, nothing rejected)
is skipped on a re-run, so after a crash, or after fixing rejected inputs, a re-run writes only what
is missing, and re-running a finished ingest changes no file. One ingest per output folder at a time.

The output may be a folder or an object-store URI (``--out s3://bucket/prefix``, see
:mod:`dynamix_core.storage`): each tar is built in a local temporary file and uploaded whole, every
other file is one whole-object upload, so a crash leaves no half-written object; the skip checks
read the manifests back from the store.

Incremental: the plan is kept in ``plan.parquet`` (one row per planned image: key, shard, global
ids). A re-run into the same folder keeps its ids (a new identity, camera or video gets a new id
after the old ones, even when its name sorts between them) and its layout (every earlier image stays
in its shard, new videos and images go to new shards), so a source that grew, as scheduled
retraining ingests it, writes only new shards and the shards whose own images changed. Changed shard
limits, an earlier shard left with no image, or an inconsistent plan file mean a fresh plan, and so
does a plan of a folder written before the split folders (its ids are kept, its shards rewritten by
split and the old flat files removed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from dynamix_core import storage
from dynamix_core.config import ConfigError, field
from dynamix_core.data.images import image_problem, sniff_format
from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers import DISTRACTOR_PIDS, FORMATS, detect_format_why, parse_source_table
from dynamix_core.data.parsers._common import dangling_symlink, describe
from dynamix_core.data.records import (NO_IDENTITY, RECORD_FIELDS, SPLITS, BadInputError, IdentityMaps, ImageRef,
                                       InputReport, Record, global_identity)
from dynamix_core.data.sample_table import column_codes, combined_codes, fill_null, identity_maps, ids_by_row, where
from dynamix_core.data.shards import (
    BLOCK,
    DATASET_SCHEMA,
    IDENTITIES_NAME,
    MANIFEST_NAME,
    MANIFESTS_DIR,
    SHARD_SCHEMA,
    SUMMARY_NAME,
    ShardWriter,
    read_shard_manifest,
    read_shard_metadata,
    remove_stale_tmp,
    set_shard_paths,
    shard_damage,
    shard_relpath,
    shard_sizes,
    tmp_path,
    write_table_atomic,
)

_SHARD_RE = re.compile(r"shard-(\d{6})\.(tar|parquet)")
#: the plan of the last ingest into a folder (key -> shard and global ids), read by the next one
PLAN_NAME = "plan.parquet"
#: the shard layout a plan was made for (``plan.parquet`` metadata): one folder of tars per split.
#: A plan without it (flat shards that mix splits) keeps its ids but not its shards.
LAYOUT = "split-folders"
#: the folders a shard set may hold shards in: its root (sets written before the split folders),
#: one per split, and the per-shard manifests' folders
SHARD_FOLDERS = ("", *SPLITS, *(f"{MANIFESTS_DIR}/{split}" for split in SPLITS))
IDENTITIES_SCHEMA = pa.schema([("cls", pa.int64()), ("dataset", pa.string()), ("source_pid", pa.string()),
                               ("pid", pa.int64()), ("images", pa.int64())])
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("dataset", pa.string()), ("shard", pa.int32()),
                         ("pid", pa.int64()), ("camid", pa.int64()), ("video_id", pa.int64()),
                         ("source_pid", pa.string()), ("source_camid", pa.string())])
#: the previous plan as :func:`read_previous_plan` holds it: its repeated strings dictionary-encoded
_PREVIOUS_SCHEMA = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string()))
                              if f.name in ("dataset", "source_pid", "source_camid") else f for f in PLAN_SCHEMA])
#: one planned image as a shard-writing task receives it (:meth:`ShardPlan.to_item`)
PLAN_ITEM_SCHEMA = pa.schema([SHARD_SCHEMA.field(name) for name in RECORD_FIELDS]
                             + [("container", pa.string()), ("member", pa.string()), ("ext", pa.string()),
                                ("bytes", pa.int64()), ("cls", pa.int64())])
# from_item builds Records positionally, in RECORD_FIELDS order
assert RECORD_FIELDS == tuple(f.name for f in dataclasses.fields(Record))
_REPEATED = {"dataset", "split", "domain", "container", "ext"}  # few distinct values: dictionary-encoded
#: shards per writer in one Ray Data dataset: the driver builds the items (Arrow IPC plans, ~150 B an
#: image) of one such window at a time; more per window = less idling at the window's end
SHARDS_PER_WORKER = 8
#: problems listed one by one in ingest.json (all of them are counted)
MAX_LISTED_PROBLEMS = 1000


@dataclass(kw_only=True)
class IngestConfig:
    """One ingest: source, output folder, shard sizes, and how to run it."""

    root: str = field(help="the source data set: its folder, or the manifest file for --format manifest; a folder may be "
                           "an object-store URI (s3://bucket/raw/market1501): it is copied to a local cache first")
    out: str = field(help="output folder or object-store URI (s3://bucket/prefix) for shards and manifests "
                          "(created; a re-run resumes it)")
    format: str = field("auto", help=f"source format, one of {sorted(FORMATS)}, or auto (detect from the layout)")
    dataset: str | None = field(None, help="dataset name written into every record (default: the format's name)")
    options: dict[str, str] = field(
        default_factory=dict, help="format-specific parser options (cuhk03np variant, msmt17 version, manifest domain)"
    )
    strict: bool = field(False, help="fail at the first bad input instead of skipping and reporting it")
    shard_max_bytes: int = field(
        512 * 2**20, help="target shard size in bytes (a single video larger than this gets its own shard)"
    )
    shard_max_count: int = field(
        100_000, help="maximum images per shard (a single video larger than this gets its own shard)"
    )
    workers: int = field(2, help="shard writers running at once (Ray tasks); 0 = write in this process without Ray")
    address: str | None = field(None, help="Ray cluster to join (default: $RAY_ADDRESS, which Ray sets for a submitted job; else a local instance)")

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {sorted(FORMATS)} or 'auto'")
        if self.shard_max_bytes <= 0 or self.shard_max_count <= 0:
            raise ConfigError(
                f"shard_max_bytes/shard_max_count: must be positive, got {self.shard_max_bytes}/{self.shard_max_count}"
            )
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 = no Ray), got {self.workers}")

    @property
    def shard_limits(self) -> dict[str, int]:
        """The keyword arguments of the planning functions that bound a shard."""
        return {"max_bytes": self.shard_max_bytes, "max_count": self.shard_max_count}


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The images of one shard (all of one split), in write order, as a :data:`PLAN_ITEM_SCHEMA`
    table (string columns may be dictionary-encoded); ``digest`` identifies the plan across runs."""

    index: int
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def relpath(self) -> str:
        """Where the shard lies in its set: ``<split>/shard-NNNNNN.tar``."""
        return shard_relpath(self.table.column("split")[0].as_py(), self.index)

    @classmethod
    def from_samples(cls, index: int, samples: list[tuple[Record, ImageRef, int]],
                     classes: list[int] | None = None) -> "ShardPlan":
        """A plan from ``(record, image, stored size)`` triples and their global identities (default:
        none, -1)."""
        columns = {name: [getattr(r, name) for r, _, _ in samples] for name in RECORD_FIELDS}
        columns["container"] = [i.container for _, i, _ in samples]
        columns["member"] = [i.member for _, i, _ in samples]
        columns["ext"] = [i.ext for _, i, _ in samples]
        columns["bytes"] = [n for _, _, n in samples]
        columns["cls"] = list(classes) if classes is not None else [NO_IDENTITY] * len(samples)
        return cls(index, pa.table([pa.array(columns[f.name], f.type) for f in PLAN_ITEM_SCHEMA],
                                   schema=PLAN_ITEM_SCHEMA))

    def classes(self) -> list[int]:
        """The global identity (``.cls``) of each image, in write order."""
        return self.table.column("cls").to_pylist()

    def to_rows(self) -> list[dict]:
        return self.table.select(PLAN_ITEM_SCHEMA.names).cast(PLAN_ITEM_SCHEMA).to_pylist()

    def samples(self, batch: int = 4096) -> Iterator[tuple[Record, ImageRef, int]]:
        """``(record, image, stored size)`` of each image, built ``batch`` rows at a time."""
        for start in range(0, len(self), batch):
            for row in self.table.slice(start, batch).to_pylist():
                yield (Record(*(row[name] for name in RECORD_FIELDS)), ImageRef(row["container"], row["member"], row["ext"]),
                       row["bytes"])

    @property
    def digest(self) -> str:
        """SHA-1 of the plan's rows (the :data:`PLAN_ITEM_SCHEMA` columns) as sorted-key JSON."""
        return hashlib.sha1(json.dumps(self.to_rows(), sort_keys=True).encode()).hexdigest()

    def to_item(self) -> dict:
        """A Ray Data row: the plan travels as one Arrow IPC stream (columnar, repeated strings
        dictionary-encoded: 0.39x the bytes of the JSON rows it replaced; ``docs/spec.md`` 1.3)."""
        table = self.table.select(PLAN_ITEM_SCHEMA.names).cast(PLAN_ITEM_SCHEMA)
        arrays = [c.dictionary_encode() if name in _REPEATED else c for name, c in zip(table.column_names, table.columns)]
        table = pa.table(arrays, names=PLAN_ITEM_SCHEMA.names)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        return {"index": self.index, "plan": sink.getvalue().to_pybytes()}

    @classmethod
    def from_item(cls, item: dict) -> "ShardPlan":
        return cls(int(item["index"]), pa.ipc.open_stream(item["plan"]).read_all().cast(PLAN_ITEM_SCHEMA))


def _stored_sizes(table: pa.Table, report: InputReport, batch: int = 1 << 16) -> np.ndarray:
    """Per row the size of the encoded image as stored, without reading it; -1 (and a rejection
    "missing file") where it cannot be found. One LMDB transaction per store and ``batch`` rows."""
    codes, containers = column_codes(table.column("container"))
    members = table.column("member")
    sizes = np.empty(table.num_rows, np.int64)
    for start in range(0, table.num_rows, batch):
        txns = {}
        try:
            for row, member in enumerate(members.slice(start, batch).to_pylist(), start):
                container = containers[codes[row]]
                try:
                    if member is None:
                        sizes[row] = os.stat(container).st_size
                        continue
                    txn = txns.get(container)
                    if txn is None:
                        txn = txns[container] = open_lmdb(container).begin(buffers=True)
                    value = txn.get(member.encode())
                    if value is None:
                        raise KeyError(f"LMDB has no key {member!r}")
                    sizes[row] = len(value)
                except (OSError, KeyError, lmdb.Error) as exc:
                    dangling = member is None and os.path.islink(container)
                    report.reject(where(container, member), dangling_symlink(container) if dangling else f"missing file: {exc}")
                    sizes[row] = -1
        finally:
            for txn in txns.values():
                txn.abort()
    return sizes


def _estimated_tar_bytes(size: np.ndarray) -> np.ndarray:
    # image header + data padded to a block + json header + json (about one block)
    return 3 * BLOCK + -(-size // BLOCK) * BLOCK


@dataclass(frozen=True, slots=True)
class PreviousPlan:
    """What the last ingest into a folder planned (its ``plan.parquet``, columnar)."""

    table: pa.Table  # the file's content (write_plan compares against it instead of reading it again)
    num_shards: int
    pid: dict[tuple[str, str], int]  # (dataset, source_pid) -> pid
    camid: dict[tuple[str, str], int]  # (dataset, source_camid) -> camid
    keeps_layout: bool = True  # planned for the split folders: its shards may be kept (else only its ids)

    def rows_of(self, keys: pa.ChunkedArray) -> np.ndarray:
        """Per key of ``keys`` its row in this plan (-1: not planned then). One hash of the earlier keys."""
        rows = pc.index_in(keys, value_set=self.table.column("key").combine_chunks())
        return rows.fill_null(-1).to_numpy().astype(np.int64)

    def column_at(self, rows: np.ndarray, name: str) -> np.ndarray:
        """The int column ``name`` at ``rows`` (from :meth:`rows_of`; -1 where a row is -1)."""
        values = self.table.column(name).to_numpy().astype(np.int64)
        return np.where(rows >= 0, values[np.maximum(rows, 0)], -1) if len(values) else np.full(len(rows), -1)

    def fixed_maps(self, samples: pa.Table, rows: np.ndarray | None = None) -> dict[str, dict] | None:
        """The earlier ids for :func:`identity_maps`, or None when they are not one-to-one (then the
        folder is planned afresh). Videos are matched through the keys of their images (``rows``:
        :meth:`rows_of` the samples' keys, if already known)."""
        rows = self.rows_of(samples.column("key")) if rows is None else rows
        earlier = self.column_at(rows, "video_id")
        codes, videos = combined_codes([samples.column("dataset"), samples.column("source_video")])
        known = (codes >= 0) & (earlier != -1)
        pairs = np.unique(np.stack([codes[known], earlier[known]], axis=1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            return None  # one video, two earlier ids
        video = {videos[c]: int(v) for c, v in pairs.tolist()}
        fixed = {"pid": self.pid, "camid": self.camid, "video": video}
        if any(len(set(m.values())) != len(m) for m in fixed.values()):
            return None
        return fixed


def _id_map(table: pa.Table, source: str, target: str) -> dict[tuple[str, str], int] | None:
    """``(dataset, source id) -> id`` of a plan table (rows without id left out); None when a source
    id has two ids."""
    triples = table.select(["dataset", source, target]).filter(pc.field(target) != -1)
    triples = triples.group_by(["dataset", source, target]).aggregate([]).to_pylist()
    out: dict[tuple[str, str], int] = {}
    for t in triples:
        if out.setdefault((t["dataset"], t[source]), t[target]) != t[target]:
            return None
    return out


def read_previous_plan(out_dir: str | Path, *, max_bytes: int, max_count: int) -> PreviousPlan | None:
    """The plan of the last ingest into ``out_dir``, if it used the same shard limits (else None)."""
    path = storage.join(out_dir, PLAN_NAME)
    if not storage.exists(path):
        return None
    try:
        # repeated strings as dictionaries (as write_plan holds them): about half the memory at 10M rows
        table = storage.read_table(path, read_dictionary=["dataset", "source_pid", "source_camid"])
    except storage.StorageError:  # the store is unusable: say so instead of silently planning afresh
        raise
    except (OSError, pa.ArrowException):  # unreadable (edited, or not ours): plan afresh; shards are checked by digest
        return None
    meta = table.schema.metadata or {}
    if meta.get(b"shard_max_bytes") != str(max_bytes).encode() or meta.get(b"shard_max_count") != str(max_count).encode():
        return None
    try:
        table = table.select(PLAN_SCHEMA.names).cast(_PREVIOUS_SCHEMA).unify_dictionaries()  # one per column
    except (KeyError, pa.ArrowException):  # not a plan this code wrote
        return None
    pid, camid = _id_map(table, "source_pid", "pid"), _id_map(table, "source_camid", "camid")
    if pid is None or camid is None:
        return None  # one source id with two ids: not a plan this code wrote
    shards = table.column("shard")
    return PreviousPlan(table=table, num_shards=(pc.max(shards).as_py() + 1) if len(shards) else 0, pid=pid, camid=camid,
                        keeps_layout=meta.get(b"layout") == LAYOUT.encode())


def write_plan(plans: list["ShardPlan"], path: str | Path, previous: PreviousPlan | None, *, max_bytes: int,
               max_count: int) -> None:
    """``plan.parquet``, atomically and only when it differs from ``previous`` (what
    :func:`read_previous_plan` read from the same file with the same limits; None: write)."""
    def shard_table(p: ShardPlan) -> pa.Table:  # one shard at a time, columnar
        t = p.table
        columns = [t.column("key"), t.column("dataset"), pa.array(np.full(len(p), p.index, np.int32)),
                   t.column("pid"), t.column("camid"), t.column("video_id"), t.column("source_pid"),
                   t.column("source_camid")]
        return pa.table(columns, names=PLAN_SCHEMA.names).cast(PLAN_SCHEMA)

    table = pa.concat_tables([shard_table(p) for p in plans]) if plans else PLAN_SCHEMA.empty_table()
    if previous is not None and previous.keeps_layout and _same_rows(previous.table, table):
        return
    write_table_atomic(table.replace_schema_metadata({"shard_max_bytes": str(max_bytes),
                                                      "shard_max_count": str(max_count), "layout": LAYOUT}), path)


def _same_rows(earlier: pa.Table, table: pa.Table, batch: int = 1 << 16) -> bool:
    """Whether two plan tables hold the same rows (compared as plain strings, a batch at a time)."""
    if earlier.num_rows != table.num_rows:
        return False
    return all(earlier.slice(start, batch).cast(PLAN_SCHEMA).equals(table.slice(start, batch))
               for start in range(0, table.num_rows, batch))


def _pack(counts: list[int], sizes: list[int], groups: list[int], first_index: int, *, max_bytes: int,
          max_count: int) -> list[int]:
    """The shard of each unit (given by its image count, estimated bytes and group, in order): shards
    are filled from ``first_index`` on with whole units of one group (split) each."""
    shards, shard, current, current_bytes, group = [], first_index, 0, 0, None
    for count, size, unit_group in zip(counts, sizes, groups):
        if current and (current + count > max_count or current_bytes + size > max_bytes or unit_group != group):
            shard, current, current_bytes = shard + 1, 0, 0
        shards.append(shard)
        current += count
        current_bytes += size
        group = unit_group
    return shards


def _identity_classes(dataset: pa.ChunkedArray, source_pid: pa.ChunkedArray, distractor_pid: str | None) -> np.ndarray:
    """Per row its global identity (:func:`global_identity`, once per distinct identity); -1 for an
    unlabeled image and for the format's distractors. Two identities of the set with one global id
    (about 1e-4 at a million identities) are an error, not a silent merge."""
    codes, pairs = combined_codes([dataset, source_pid])
    known = [pid not in ("", distractor_pid) for _, pid in pairs]
    ids = [global_identity(ds, pid) if ok else NO_IDENTITY for (ds, pid), ok in zip(pairs, known)]
    seen: dict[int, tuple] = {}
    for pair, gid, ok in zip(pairs, ids, known):
        if ok and seen.setdefault(gid, pair) != pair:
            raise BadInputError(f"identities {seen[gid]} and {pair} have the same global id {gid} "
                                f"(dataset/source pid hash); rename one data set (--dataset NAME)")
    return np.array(ids + [NO_IDENTITY], np.int64)[codes]


def _record_table(samples: pa.Table, maps: IdentityMaps, sizes: np.ndarray, video_id: np.ndarray,
                  distractor_pid: str | None = None) -> pa.Table:
    """The :data:`PLAN_ITEM_SCHEMA` columns of ``samples`` (global ids from ``maps``, vectorised:
    one map lookup per distinct id, not per image; ``video_id`` already computed by the caller)."""
    c = samples.column
    columns = {
        "key": c("key"), "dataset": c("dataset"), "split": c("split"),
        "pid": ids_by_row([c("dataset"), c("source_pid")], maps.pid.__getitem__),
        "camid": ids_by_row([c("dataset"), c("source_camid")], maps.camid.__getitem__),
        "video_id": video_id,
        "tracklet_id": ids_by_row([c("dataset"), c("source_video"), c("source_tracklet")],
                                  lambda t: maps.tracklet_local[t]),
        "frame": c("frame"), "domain": c("domain"), "source_pid": fill_null(c("source_pid"), ""),
        "source_camid": c("source_camid"), "container": c("container"), "member": c("member"), "ext": c("ext"),
        "bytes": sizes, "cls": _identity_classes(c("dataset"), fill_null(c("source_pid"), ""), distractor_pid),
    }
    arrays = [pa.array(a) if isinstance(a, np.ndarray) else a for a in (columns[name] for name in PLAN_ITEM_SCHEMA.names)]
    return pa.table(arrays, names=PLAN_ITEM_SCHEMA.names)


def plan_shards(
    samples: pa.Table, maps: IdentityMaps, report: InputReport, *, max_bytes: int, max_count: int,
    previous: PreviousPlan | None = None, previous_rows: np.ndarray | None = None, distractor_pid: str | None = None,
) -> list[ShardPlan]:
    """Pack ``samples`` (a :data:`SAMPLE_SCHEMA` table, in its given, sorted order) into shard plans.

    Units are whole videos for single-camera samples (all images of a ``(dataset, video)`` in one
    split, in sample order) and single images otherwise; units are ordered by split (train, query,
    gallery) and then by their first image. A shard holds units of one split and is closed when the
    next unit would push it past ``max_count`` images or ``max_bytes`` estimated bytes, or is of
    another split. A sample whose image cannot be found is rejected here. Stored sizes are part of
    the plan, so replacing an input by a file of another size (a fixed image) makes its shard's plan
    differ and the shard be rewritten. Each image's global identity (``cls``) is planned too; the
    source pid ``distractor_pid`` (the format's distractors) has none.

    With ``previous`` (planned for the split folders), a unit whose earlier images all lay in one
    shard stays there (a video that grew stays whole in its shard); the other units fill new shards
    after the earlier ones. If an earlier shard would be left empty, or hold two splits, everything
    is packed afresh. ``previous_rows``: the samples' rows in it (:meth:`PreviousPlan.rows_of`), if
    already known.

    Columnar throughout (numpy over per-row codes; Python loops over units, not images): the plans
    are slices of one :data:`PLAN_ITEM_SCHEMA` table."""
    sizes = _stored_sizes(samples, report)
    if previous is not None and previous_rows is None:
        previous_rows = previous.rows_of(samples.column("key"))
    if (sizes < 0).any():
        found = sizes >= 0
        samples, sizes = samples.filter(pa.array(found)), sizes[found]
        previous_rows = previous_rows[found] if previous_rows is not None else None
    n = samples.num_rows
    rows = np.arange(n)
    split_codes, split_names = column_codes(samples.column("split"))
    split_rank = np.array([SPLITS.index(x) if x in SPLITS else len(SPLITS) for x in split_names] + [len(SPLITS)],
                          np.int64)[split_codes]  # train, query, gallery, then any other
    video, videos = combined_codes([samples.column("dataset"), samples.column("source_video")])
    video_in_split, _ = combined_codes([samples.column("dataset"), samples.column("source_video"), samples.column("split")])
    unit = np.where(video_in_split >= 0, video_in_split, (video_in_split.max(initial=-1) + 1) + rows)  # or one image
    _, first_row, unit = np.unique(unit, return_index=True, return_inverse=True)
    rank = np.empty(len(first_row), np.int64)
    rank[np.lexsort((first_row, split_rank[first_row]))] = np.arange(len(first_row))
    unit = rank[unit.reshape(-1)]  # units numbered by split, then in the order of their first image
    unit_split = np.empty(len(rank), np.int64)
    unit_split[rank] = split_rank[first_row]
    counts = np.bincount(unit, minlength=len(rank))
    unit_bytes = np.bincount(unit, weights=_estimated_tar_bytes(sizes), minlength=len(rank)).astype(np.int64)
    shard_of_unit = None
    if previous is not None and previous.keeps_layout and n:
        earlier = previous.column_at(previous_rows, "shard")
        known = earlier >= 0
        low = np.full(len(rank), np.iinfo(np.int64).max)
        high = np.full(len(rank), -1)
        np.minimum.at(low, unit[known], earlier[known])
        np.maximum.at(high, unit[known], earlier[known])
        kept = (high >= 0) & (low == high)
        pairs = set(zip(low[kept].tolist(), unit_split[kept].tolist()))  # (earlier shard, split) of kept units
        one_split = len(pairs) == len({shard for shard, _ in pairs})
        if one_split and np.array_equal(np.unique(low[kept]), np.arange(previous.num_shards)):
            shard_of_unit = np.where(kept, low, -1)
            fresh = np.flatnonzero(~kept)
            shard_of_unit[fresh] = _pack(counts[fresh].tolist(), unit_bytes[fresh].tolist(), unit_split[fresh].tolist(),
                                         previous.num_shards, max_bytes=max_bytes, max_count=max_count)
    if shard_of_unit is None:
        shard_of_unit = np.asarray(_pack(counts.tolist(), unit_bytes.tolist(), unit_split.tolist(), 0,
                                         max_bytes=max_bytes, max_count=max_count), np.int64)
    shard = shard_of_unit[unit] if n else np.zeros(0, np.int64)
    order = np.lexsort((rows, unit, shard))  # by shard, then unit, then sample order
    video_id = np.array([maps.video[v] for v in videos] + [-1], np.int64)[video]  # code -1 -> -1
    table = _record_table(samples, maps, sizes, video_id, distractor_pid)
    if not np.array_equal(order, rows):  # a store listed video by video is in plan order already: no copy
        table, shard = table.take(pa.array(order)), shard[order]
    del samples, order, rows, unit
    bounds = np.flatnonzero(np.diff(shard)) + 1
    starts = np.concatenate([[0], bounds]) if n else np.zeros(0, np.int64)
    ends = np.concatenate([bounds, [n]]) if n else np.zeros(0, np.int64)
    return [ShardPlan(int(shard[a]), table.slice(int(a), int(b - a))) for a, b in zip(starts, ends)]


# ------------------------------------------------------------------------------------------- writing


def _finished_shard(plan: ShardPlan, out_dir: str | Path) -> dict | None:
    """The metadata of ``plan``'s shard when it is already written from this very plan, nothing
    was rejected from it and its bytes are still those written (None: it has to be written; a
    damaged shard is rewritten by the next ingest)."""
    tar_path, manifest_path = set_shard_paths(out_dir, plan.relpath)
    meta = read_shard_metadata(tar_path, manifest_path)
    if meta is not None and meta.get("plan_digest") == plan.digest and meta.get("num_rejected") == "0":
        return meta if shard_damage(tar_path, meta) is None else None
    return None


def write_planned_shard(item: dict, out_dir: str) -> dict:
    """Write (or skip, when already finished) one planned shard; the Ray Data ``map`` function.

    Returns a row ``{index, written, num_samples, tar_bytes, problems}`` (``problems`` = JSON list of
    ``[path, reason]``). Inputs that cannot be read or do not fully decode are left out of the shard
    and reported; the shard then records them (``num_rejected``) so the next run retries it."""
    plan = ShardPlan.from_item(item)
    tar_path, manifest_path = set_shard_paths(out_dir, plan.relpath)
    digest = plan.digest
    meta = _finished_shard(plan, out_dir)
    if meta is not None:
        return {"index": plan.index, "written": False, "num_samples": int(meta["num_samples"]),
                "tar_bytes": int(meta["tar_bytes"]), "problems": "[]"}
    report = InputReport()  # strict mode is applied by the driver, which sees every shard's problems
    # the temporary tar in the set's root: a split folder holds finished tars only
    with ShardWriter(tar_path, manifest_path, tmp_dir=None if storage.is_remote(out_dir) else out_dir) as writer:
        for (record, image, _), cls in zip(plan.samples(), plan.classes()):
            try:
                data = image.read_bytes()
            except (OSError, KeyError) as exc:
                dangling = image.member is None and os.path.islink(image.container)
                report.reject(describe(image), dangling_symlink(image.container) if dangling else f"missing file: {exc}")
                continue
            problem = image_problem(data)
            if problem is not None:
                report.reject(describe(image), problem)
                continue
            writer.add(record, data, sniff_format(data), cls)  # the bytes as stored, whatever the file name says
        info = writer.commit({"plan_digest": digest, "num_rejected": str(len(report))})
    return {"index": plan.index, "written": True, "num_samples": info.num_samples, "tar_bytes": info.tar_bytes,
            "problems": json.dumps([[p.path, p.reason] for p in report.problems])}


def _run_local(plans: list[ShardPlan], out_dir: str) -> Iterator[dict]:
    for plan in plans:
        yield write_planned_shard(plan.to_item(), str(out_dir))


def _run_ray(plans: list[ShardPlan], out_dir: str, cfg: IngestConfig) -> Iterator[dict]:
    import ray

    from pipelines.console import quiet_ray_libraries
    from pipelines.ray_cluster import connect

    started_here = not ray.is_initialized()
    if started_here:  # the job's cluster (--address, RAY_ADDRESS), else a local instance
        connect(cfg.address)
    try:
        quiet_ray_libraries()  # the driver shows one bar, in images
        # an object store is reached by URI from every node (with that node's AWS_* variables)
        target = out_dir if storage.is_remote(out_dir) else str(Path(out_dir).resolve())
        window = SHARDS_PER_WORKER * max(cfg.workers, 1)
        for start in range(0, len(plans), window):  # the items of one window at a time, not of every shard
            part = plans[start:start + window]
            ds = ray.data.from_items([p.to_item() for p in part], override_num_blocks=len(part))
            ds = ds.map(write_planned_shard, fn_kwargs={"out_dir": target}, num_cpus=1,
                        compute=ray.data.TaskPoolStrategy(size=cfg.workers))
            yield from ds.iter_rows()
    finally:
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------------------------------ finishing


def _remove_outdated_shards(out_dir: str, plans: list[ShardPlan]) -> list[str]:
    """Delete the shard files (tars and their manifests) that are not the current plan's: shards of an
    earlier plan numbered beyond it or now in another split's folder, and the flat files of a set
    written before the split folders. A split folder then holds exactly the plan's tars."""
    current = {rel for p in plans for rel in (p.relpath, f"{MANIFESTS_DIR}/{storage.with_suffix(p.relpath, '.parquet')}")}
    removed = []
    for folder in SHARD_FOLDERS:
        path = storage.join(out_dir, folder) if folder else out_dir
        for name in sorted(storage.listdir(path)):
            rel = f"{folder}/{name}" if folder else name
            if _SHARD_RE.fullmatch(name) and rel not in current:
                storage.delete(storage.join(path, name))
                removed.append(storage.join(path, name))
    return removed


def _dataset_manifest(out_dir: str, plans: list[ShardPlan]) -> pa.Table:
    tables = []
    for plan in plans:
        table = read_shard_manifest(*set_shard_paths(out_dir, plan.relpath))
        tables.append(table.append_column("shard", pa.array([plan.relpath] * table.num_rows, pa.string())))
    return pa.concat_tables(tables).cast(DATASET_SCHEMA)


def _identities(plans: list[ShardPlan], manifest: pa.Table) -> pa.Table:
    """``identities.parquet``: each identity of the set with its global id (``cls``, the ``.cls``
    member), ``dataset``, ``source_pid``, the set's own ``pid``, and its number of ``images``."""
    classes = pa.concat_tables([p.table.select(["dataset", "source_pid", "cls"]) for p in plans]).cast(
        pa.schema([("dataset", pa.string()), ("source_pid", pa.string()), ("cls", pa.int64())]))
    classes = classes.filter(pc.field("cls") != NO_IDENTITY).group_by(["dataset", "source_pid", "cls"]).aggregate([])
    counts = manifest.group_by(["dataset", "source_pid", "pid"]).aggregate([("key", "count")])
    table = counts.join(classes, ["dataset", "source_pid"], join_type="inner")
    table = table.rename_columns({"key_count": "images"}).select(IDENTITIES_SCHEMA.names).cast(IDENTITIES_SCHEMA)
    return table.sort_by([("dataset", "ascending"), ("source_pid", "ascending")])


def _staged(cfg: IngestConfig, progress: bool) -> IngestConfig:
    """``cfg`` with its source folder on an object store replaced by a local copy (the parsers read
    directory trees and LMDB files). The copy is on this machine only, so its shards are written by
    this process rather than by Ray tasks that may run on other nodes."""
    if storage.exists(cfg.root):
        raise ConfigError(f"root: {cfg.root} is a single object; a source on an object store must be a folder "
                          "(a manifest source must be a local file)")
    local = storage.local_tree(cfg.root)
    if progress:
        print(f"[ingest] {cfg.root}: copied to {local}; shards are written by this process", flush=True)
    return dataclasses.replace(cfg, root=str(local), workers=0)


def _summary(cfg: IngestConfig, fmt: str, manifest: pa.Table, out_dir: str, plans: list[ShardPlan],
             report: InputReport, source: str) -> dict:
    def distinct(column: str) -> int:  # distinct (dataset, id) pairs, -1 (none) excluded
        known = manifest.filter(pc.field(column) != -1)
        return known.group_by(["dataset", column]).aggregate([]).num_rows

    names = [p.relpath for p in plans]
    sizes = shard_sizes(out_dir, names)  # a listing per split folder, not a request per shard on an object store
    missing = [name for name in names if name not in sizes]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:3]} vanished during the ingest; re-run it")
    num_shards = len(plans)
    shard_bytes = [sizes[name] for name in names]
    return {
        "format": fmt,
        "root": source,
        "datasets": sorted(set(manifest.column("dataset").to_pylist())),
        "options": dict(sorted(cfg.options.items())),
        "images": manifest.num_rows,
        "identities": distinct("pid"),
        "cameras": distinct("camid"),
        "videos": distinct("video_id"),
        "shards": num_shards,
        "shard_bytes": sum(shard_bytes),
        "skipped": len(report),
        "skipped_by_reason": dict(sorted(report.counts().items())),
        "problems": [{"path": p.path, "reason": p.reason} for p in report.problems[:MAX_LISTED_PROBLEMS]],
    }


def _write_table_if_changed(table: pa.Table, path: str, schema: pa.Schema) -> None:
    if not (storage.exists(path) and storage.read_table(path, schema=schema).equals(table)):
        write_table_atomic(table, path)


def _write_text_if_changed(text: str, path: str) -> None:
    if storage.exists(path) and storage.read_bytes(path) == text.encode():
        return
    if storage.is_remote(path):
        storage.write_bytes_atomic(path, text)
        return
    tmp = tmp_path(Path(path))
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one run did: the persisted summary (also ``ingest.json``), and this run's own counts."""

    summary: dict
    report: InputReport
    shards_written: int
    shards_skipped: int
    seconds: float
    format_why: str = "given with --format"  # or "auto-detected: <what in the layout decided it>"


def plan_ingest(cfg: IngestConfig, report: InputReport) -> tuple[str, str, PreviousPlan | None, list[ShardPlan]]:
    """Parse the source and plan its shards: ``(format, why that format, the folder's previous plan,
    the shard plans)``. The parsed samples die with this call (the plans keep what the shards need),
    so they are not held while ``plan.parquet`` and the shards are written."""
    fmt, why = (cfg.format, "given with --format") if cfg.format != "auto" else detect_format_why(cfg.root)
    samples = parse_source_table(fmt, cfg.root, report, dataset=cfg.dataset, **cfg.options)
    pa.default_memory_pool().release_unused()  # the parse's freed batches: give their pages back
    limits = cfg.shard_limits
    previous = read_previous_plan(str(cfg.out), **limits)
    rows = previous.rows_of(samples.column("key")) if previous is not None else None
    fixed = previous.fixed_maps(samples, rows) if previous is not None else None
    maps = identity_maps(samples, fixed)
    plans = plan_shards(samples, maps, report, **limits, previous=previous if fixed is not None else None,
                        previous_rows=rows if fixed is not None else None, distractor_pid=DISTRACTOR_PIDS.get(fmt))
    del rows
    return fmt, why, previous, plans


def run_ingest(cfg: IngestConfig, *, progress: bool = True) -> IngestResult:
    """Run (or resume) one ingest; raises :class:`BadInputError` in strict mode at the first bad input."""
    start = time.perf_counter()
    if storage.is_remote(cfg.out):
        storage.makedirs(cfg.out)  # a missing bucket or unreachable store fails before the source is listed
    source = str(cfg.root)
    if storage.is_remote(source):
        cfg = _staged(cfg, progress)
    report = InputReport(strict=cfg.strict)
    fmt, why, previous, plans = plan_ingest(cfg, report)
    out_dir = str(cfg.out)
    storage.makedirs(out_dir)  # a local folder (an object store has no folders to create)
    if not storage.is_remote(out_dir):  # (an object store never holds temporary objects: uploads are whole)
        for folder in SHARD_FOLDERS:
            if (Path(out_dir) / folder).is_dir():
                remove_stale_tmp(Path(out_dir) / folder)
    write_plan(plans, storage.join(out_dir, PLAN_NAME), previous, **cfg.shard_limits)  # first: a resumed run plans the same shards

    # a re-run over an unchanged source has nothing to write: check here instead of starting Ray
    all_done = all(_finished_shard(p, out_dir) is not None for p in plans)
    results = _run_local(plans, out_dir) if cfg.workers == 0 or all_done else _run_ray(plans, out_dir, cfg)
    written = 0
    with tqdm(total=sum(len(p) for p in plans), unit="img", desc="ingest",
              disable=not progress or all_done) as bar:  # nothing to write: no bar, the summary says so
        for row in results:
            for path, reason in json.loads(row["problems"]):
                report.reject(path, reason)  # raises here in strict mode
            written += bool(row["written"])
            bar.update(len(plans[row["index"]]))

    _remove_outdated_shards(out_dir, plans)
    manifest = _dataset_manifest(out_dir, plans)
    summary = _summary(cfg, fmt, manifest, out_dir, plans, report, source)
    _write_text_if_changed(json.dumps(summary, indent=2) + "\n", storage.join(out_dir, SUMMARY_NAME))
    _write_table_if_changed(_identities(plans, manifest), storage.join(out_dir, IDENTITIES_NAME), IDENTITIES_SCHEMA)
    # last: its presence marks a finished ingest
    _write_table_if_changed(manifest, storage.join(out_dir, MANIFEST_NAME), DATASET_SCHEMA)
    return IngestResult(summary, report, written, len(plans) - written, time.perf_counter() - start,
                        why if cfg.format != "auto" else f"auto-detected: {why}")


def format_result(result: IngestResult) -> str:
    """The final human-readable summary."""
    s = result.summary
    rate = s["images"] / result.seconds if result.seconds > 0 else float("nan")
    first = (f"ingested {s['images']} images of {', '.join(s['datasets'])} in {result.seconds:.1f}s "
             f"({rate:.0f} images/s)")
    if result.shards_written == 0 and result.shards_skipped:
        first = f"up to date: {s['images']} images of {', '.join(s['datasets'])} already in {result.shards_skipped} shards"
    return "\n".join([
        first,
        f"format: {s['format']} ({result.format_why})",
        f"identities: {s['identities']}  cameras: {s['cameras']}  videos: {s['videos']}",
        f"shards: {s['shards']} ({result.shards_written} written, {result.shards_skipped} already complete), "
        f"{s['shard_bytes'] / 2**20:.1f} MiB",
        result.report.summary(),
    ])

