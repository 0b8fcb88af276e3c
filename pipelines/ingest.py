"""Ingest a source data set into WebDataset shards + parquet manifests (SPEC 1.3), with Ray Data.

    summary = run_ingest(IngestConfig(format="auto", root=Path("data/market"), out="shards/market"))

1. The driver parses the source (a cheap listing: no image is read), builds the global
   :class:`IdentityMaps`, and plans shards deterministically: single-camera videos are packed whole
   and contiguous (a video never straddles two shards), other images by count and estimated size
   (file sizes, LMDB value lengths).
2. Ray Data tasks write the shards (``from_items(plans).map(write)``, each plan one Arrow IPC item):
   each reads the image bytes, validates them by a full decode, and writes ``shard-NNNNNN.tar`` + its
   parquet manifest atomically. ``workers=0`` runs the same writer in this process, without Ray.
3. The driver writes ``ingest.json`` (the summary) and, last, ``manifest.parquet`` (one row per
   image, with its shard), both atomically and only when their content changed.

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
limits, an earlier shard left with no image, or an inconsistent plan file mean a fresh plan.
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

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from dynamix_core import storage
from dynamix_core.config import ConfigError, field
from dynamix_core.data.images import image_problem, sniff_format
from dynamix_core.data.lmdb_io import open_lmdb
from dynamix_core.data.parsers import FORMATS, detect_format_why, parse_source
from dynamix_core.data.records import RECORD_FIELDS, IdentityMaps, ImageRef, InputReport, RawSample, Record
from dynamix_core.data.shards import (
    BLOCK,
    DATASET_SCHEMA,
    MANIFEST_NAME,
    SHARD_SCHEMA,
    SUMMARY_NAME,
    ShardWriter,
    read_shard_manifest,
    read_shard_metadata,
    record_row,
    remove_stale_tmp,
    shard_name,
    tmp_path,
    write_table_atomic,
)

_SHARD_RE = re.compile(r"shard-(\d{6})\.(tar|parquet)")
#: the plan of the last ingest into a folder (key -> shard and global ids), read by the next one
PLAN_NAME = "plan.parquet"
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("dataset", pa.string()), ("shard", pa.int32()),
                         ("pid", pa.int64()), ("camid", pa.int64()), ("video_id", pa.int64()),
                         ("source_pid", pa.string()), ("source_camid", pa.string())])
#: one planned image as a shard-writing task receives it (:meth:`ShardPlan.to_item`)
PLAN_ITEM_SCHEMA = pa.schema([SHARD_SCHEMA.field(name) for name in RECORD_FIELDS]
                             + [("container", pa.string()), ("member", pa.string()), ("ext", pa.string()),
                                ("bytes", pa.int64())])
# from_item builds Records positionally, in RECORD_FIELDS order
assert RECORD_FIELDS == tuple(f.name for f in dataclasses.fields(Record))
_REPEATED = {"dataset", "split", "domain", "container", "ext"}  # few distinct values: dictionary-encoded
#: problems listed one by one in ingest.json (all of them are counted)
MAX_LISTED_PROBLEMS = 1000


@dataclass(kw_only=True)
class IngestConfig:
    """One ingest: source, output folder, shard sizes, and how to run it."""

    root: Path = field(help="the source data set: its folder, or the manifest file for --format manifest")
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
    address: str | None = field(None, help="Ray cluster to join (default: start a local Ray instance)")

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
    """The samples of one shard, in write order; ``digest`` identifies the plan across runs."""

    index: int
    samples: list[tuple[Record, ImageRef, int]]  # (record, image, stored size in bytes)

    def to_rows(self) -> list[dict]:
        return [{**record_row(r), "container": i.container, "member": i.member, "ext": i.ext, "bytes": n}
                for r, i, n in self.samples]

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_rows(), sort_keys=True).encode()).hexdigest()

    def to_item(self) -> dict:
        """A Ray Data row: the plan travels as one Arrow IPC stream (columnar, repeated strings
        dictionary-encoded: 0.39x the bytes of the JSON rows it replaced; ``docs/spec.md`` 1.3)."""
        records = [r for r, _, _ in self.samples]
        columns = {name: [getattr(r, name) for r in records] for name in RECORD_FIELDS}
        columns["container"] = [i.container for _, i, _ in self.samples]
        columns["member"] = [i.member for _, i, _ in self.samples]
        columns["ext"] = [i.ext for _, i, _ in self.samples]
        columns["bytes"] = [n for _, _, n in self.samples]
        arrays = [pa.array(columns[f.name], f.type) for f in PLAN_ITEM_SCHEMA]
        arrays = [a.dictionary_encode() if f.name in _REPEATED else a for a, f in zip(arrays, PLAN_ITEM_SCHEMA)]
        table = pa.table(arrays, names=PLAN_ITEM_SCHEMA.names)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        return {"index": self.index, "plan": sink.getvalue().to_pybytes()}

    @classmethod
    def from_item(cls, item: dict) -> "ShardPlan":
        c = pa.ipc.open_stream(item["plan"]).read_all().cast(PLAN_ITEM_SCHEMA).to_pydict()  # dictionaries decoded
        records = [Record(*values) for values in zip(*(c[name] for name in RECORD_FIELDS))]
        images = [ImageRef(*values) for values in zip(c["container"], c["member"], c["ext"])]
        return cls(int(item["index"]), list(zip(records, images, c["bytes"])))


def _where(image: ImageRef) -> str:
    """Where an image lives, for reports: the file path, or ``<lmdb dir>[<key>]``."""
    return image.container if image.member is None else f"{image.container}[{image.member}]"


def _stored_bytes(image: ImageRef) -> int:
    """Size of the encoded image as stored, without reading it."""
    if image.member is None:
        return os.stat(image.container).st_size
    with open_lmdb(image.container).begin(buffers=True) as txn:
        value = txn.get(image.member.encode())
    if value is None:
        raise KeyError(f"LMDB has no key {image.member!r}")
    return len(value)


def _estimated_tar_bytes(size: int) -> int:
    # image header + data padded to a block + json header + json (about one block)
    return 3 * BLOCK + -(-size // BLOCK) * BLOCK


@dataclass(frozen=True, slots=True)
class PreviousPlan:
    """What the last ingest into a folder planned (from its ``plan.parquet``)."""

    table: pa.Table  # the file's content (write_plan compares against it instead of reading it again)
    shard_of: dict[str, int]  # key -> shard index
    num_shards: int
    video_of: dict[str, int]  # key -> video_id (single-camera images only)
    pid: dict[tuple[str, str], int]  # (dataset, source_pid) -> pid
    camid: dict[tuple[str, str], int]  # (dataset, source_camid) -> camid

    def fixed_maps(self, samples: list[RawSample]) -> dict[str, dict] | None:
        """The earlier ids for :meth:`IdentityMaps.build`, or None when they are not one-to-one
        (then the folder is planned afresh). Videos are matched through the keys of their images."""
        video: dict[tuple[str, str], int] = {}
        for s in samples:
            vid = self.video_of.get(s.key)
            if s.source_video is not None and vid is not None:
                if video.setdefault((s.dataset, s.source_video), vid) != vid:
                    return None
        fixed = {"pid": self.pid, "camid": self.camid, "video": video}
        if any(len(set(m.values())) != len(m) for m in fixed.values()):
            return None
        return fixed


def read_previous_plan(out_dir: str | Path, *, max_bytes: int, max_count: int) -> PreviousPlan | None:
    """The plan of the last ingest into ``out_dir``, if it used the same shard limits (else None)."""
    path = storage.join(out_dir, PLAN_NAME)
    if not storage.exists(path):
        return None
    try:
        table = storage.read_table(path)
    except storage.StorageError:  # the store is unusable: say so instead of silently planning afresh
        raise
    except (OSError, pa.ArrowException):  # unreadable (edited, or not ours): plan afresh; shards are checked by digest
        return None
    meta = table.schema.metadata or {}
    if meta.get(b"shard_max_bytes") != str(max_bytes).encode() or meta.get(b"shard_max_count") != str(max_count).encode():
        return None
    table = table.cast(PLAN_SCHEMA)
    c = table.to_pydict()
    pid, camid = {}, {}
    for ds, spid, p, scam, cam in zip(c["dataset"], c["source_pid"], c["pid"], c["source_camid"], c["camid"]):
        if p != -1 and pid.setdefault((ds, spid), p) != p or camid.setdefault((ds, scam), cam) != cam:
            return None  # one source id with two ids: not a plan this code wrote
    return PreviousPlan(table=table, shard_of=dict(zip(c["key"], c["shard"])),
                        num_shards=max(c["shard"], default=-1) + 1,
                        video_of={k: v for k, v in zip(c["key"], c["video_id"]) if v != -1},
                        pid=pid, camid=camid)


def write_plan(plans: list["ShardPlan"], path: str | Path, previous: PreviousPlan | None, *, max_bytes: int,
               max_count: int) -> None:
    """``plan.parquet``, atomically and only when it differs from ``previous`` (what
    :func:`read_previous_plan` read from the same file with the same limits; None: write)."""
    def shard_table(p: ShardPlan) -> pa.Table:  # one shard at a time: no Python row list of the whole plan
        records = [r for r, _, _ in p.samples]
        columns = [[r.key for r in records], [r.dataset for r in records], [p.index] * len(records),
                   [r.pid for r in records], [r.camid for r in records], [r.video_id for r in records],
                   [r.source_pid for r in records], [r.source_camid for r in records]]
        return pa.table([pa.array(c, f.type) for c, f in zip(columns, PLAN_SCHEMA)], schema=PLAN_SCHEMA)

    table = pa.concat_tables([shard_table(p) for p in plans]).combine_chunks() if plans else PLAN_SCHEMA.empty_table()
    if previous is not None and previous.table.equals(table):
        return
    write_table_atomic(table.replace_schema_metadata({"shard_max_bytes": str(max_bytes),
                                                      "shard_max_count": str(max_count)}), path)


def _pack(units: list[list[tuple[Record, ImageRef, int]]], first_index: int, *, max_bytes: int,
          max_count: int) -> list[ShardPlan]:
    """Fill shards from ``first_index`` on with whole units, in order."""
    plans: list[ShardPlan] = []
    current: list[tuple[Record, ImageRef, int]] = []
    current_bytes = 0
    for members in units:
        unit_bytes = sum(_estimated_tar_bytes(size) for _, _, size in members)
        if current and (len(current) + len(members) > max_count or current_bytes + unit_bytes > max_bytes):
            plans.append(ShardPlan(first_index + len(plans), current))
            current, current_bytes = [], 0
        current.extend(members)
        current_bytes += unit_bytes
    if current:
        plans.append(ShardPlan(first_index + len(plans), current))
    return plans


def plan_shards(
    samples: list[RawSample], maps: IdentityMaps, report: InputReport, *, max_bytes: int, max_count: int,
    previous: PreviousPlan | None = None,
) -> list[ShardPlan]:
    """Pack ``samples`` (in their given, sorted order) into shard plans.

    Units are whole videos for single-camera samples (all images of a ``(dataset, video)``, in
    sample order) and single images otherwise; a shard is closed when the next unit would push it
    past ``max_count`` images or ``max_bytes`` estimated bytes. A sample whose image cannot be found
    is rejected here. Stored sizes are part of the plan, so replacing an input by a file of another
    size (a fixed image) makes its shard's plan differ and the shard be rewritten.

    With ``previous``, a unit whose earlier images all lay in one shard stays there (a video that
    grew stays whole in its shard); the other units fill new shards after the earlier ones. If an
    earlier shard would be left empty, everything is packed afresh."""
    units: dict[tuple, list[tuple[Record, ImageRef, int]]] = {}
    for s in samples:
        try:
            size = _stored_bytes(s.image)
        except (OSError, KeyError) as exc:
            report.reject(_where(s.image), f"missing file: {exc}")
            continue
        unit = ("video", s.dataset, s.source_video) if s.source_video is not None else ("image", s.key)
        units.setdefault(unit, []).append((maps.record(s), s.image, size))
    if previous is not None:
        kept: dict[int, list[tuple[Record, ImageRef, int]]] = {}
        new_units = []
        for members in units.values():
            earlier = {previous.shard_of[r.key] for r, _, _ in members if r.key in previous.shard_of}
            if len(earlier) == 1:
                kept.setdefault(earlier.pop(), []).extend(members)
            else:
                new_units.append(members)
        if sorted(kept) == list(range(previous.num_shards)):
            return [ShardPlan(i, kept[i]) for i in range(previous.num_shards)] + _pack(
                new_units, previous.num_shards, max_bytes=max_bytes, max_count=max_count)
    return _pack(list(units.values()), 0, max_bytes=max_bytes, max_count=max_count)


# ------------------------------------------------------------------------------------------- writing


def _finished_shard(plan: ShardPlan, out_dir: str | Path) -> dict | None:
    """The metadata of ``plan``'s shard when it is already written from this very plan and nothing
    was rejected from it (None: it has to be written)."""
    meta = read_shard_metadata(_shard_path(out_dir, plan.index))
    if meta is not None and meta.get("plan_digest") == plan.digest and meta.get("num_rejected") == "0":
        return meta
    return None


def _shard_path(out_dir: str | Path, index: int) -> str | Path:
    """Where shard ``index`` goes: a path in a local folder, a URI on an object store."""
    return storage.join(out_dir, shard_name(index)) if storage.is_remote(out_dir) else Path(out_dir) / shard_name(index)


def write_planned_shard(item: dict, out_dir: str) -> dict:
    """Write (or skip, when already finished) one planned shard; the Ray Data ``map`` function.

    Returns a row ``{index, written, num_samples, tar_bytes, problems}`` (``problems`` = JSON list of
    ``[path, reason]``). Inputs that cannot be read or do not fully decode are left out of the shard
    and reported; the shard then records them (``num_rejected``) so the next run retries it."""
    plan = ShardPlan.from_item(item)
    tar_path = _shard_path(out_dir, plan.index)
    digest = plan.digest
    meta = _finished_shard(plan, out_dir)
    if meta is not None:
        return {"index": plan.index, "written": False, "num_samples": int(meta["num_samples"]),
                "tar_bytes": int(meta["tar_bytes"]), "problems": "[]"}
    report = InputReport()  # strict mode is applied by the driver, which sees every shard's problems
    with ShardWriter(tar_path) as writer:
        for record, image, _ in plan.samples:
            try:
                data = image.read_bytes()
            except (OSError, KeyError) as exc:
                report.reject(_where(image), f"missing file: {exc}")
                continue
            problem = image_problem(data)
            if problem is not None:
                report.reject(_where(image), problem)
                continue
            writer.add(record, data, sniff_format(data))  # the bytes as stored, whatever the file name says
        info = writer.commit({"plan_digest": digest, "num_rejected": str(len(report))})
    return {"index": plan.index, "written": True, "num_samples": info.num_samples, "tar_bytes": info.tar_bytes,
            "problems": json.dumps([[p.path, p.reason] for p in report.problems])}


def _run_local(plans: list[ShardPlan], out_dir: str) -> Iterator[dict]:
    for plan in plans:
        yield write_planned_shard(plan.to_item(), str(out_dir))


def _run_ray(plans: list[ShardPlan], out_dir: str, cfg: IngestConfig) -> Iterator[dict]:
    import ray

    from pipelines.console import quiet_ray_libraries, ray_init_kwargs

    started_here = not ray.is_initialized()
    if started_here:
        if cfg.address:
            ray.init(address=cfg.address, **ray_init_kwargs())
        else:  # 4 logical CPUs: on a 2-core box the defaults starve Ray Data's tasks (docs/stack.md)
            ray.init(num_cpus=4, include_dashboard=False, **ray_init_kwargs())
    try:
        quiet_ray_libraries()  # the driver shows one bar, in images
        ds = ray.data.from_items([p.to_item() for p in plans], override_num_blocks=len(plans))
        # an object store is reached by URI from every node (with that node's AWS_* variables)
        target = out_dir if storage.is_remote(out_dir) else str(Path(out_dir).resolve())
        ds = ds.map(write_planned_shard, fn_kwargs={"out_dir": target}, num_cpus=1,
                    compute=ray.data.TaskPoolStrategy(size=cfg.workers))
        yield from ds.iter_rows()
    finally:
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------------------------------ finishing


def _remove_outdated_shards(out_dir: str, num_shards: int) -> list[str]:
    """Delete shards numbered beyond the current plan (left by an earlier plan of this folder)."""
    removed = []
    for name in sorted(storage.listdir(out_dir)):
        match = _SHARD_RE.fullmatch(name)
        if match and int(match[1]) >= num_shards:
            storage.delete(storage.join(out_dir, name))
            removed.append(storage.join(out_dir, name))
    return removed


def _dataset_manifest(out_dir: str, num_shards: int) -> pa.Table:
    tables = []
    for index in range(num_shards):
        table = read_shard_manifest(_shard_path(out_dir, index))
        tables.append(table.append_column("shard", pa.array([shard_name(index)] * table.num_rows, pa.string())))
    return pa.concat_tables(tables).cast(DATASET_SCHEMA)


def _summary(cfg: IngestConfig, fmt: str, manifest: pa.Table, out_dir: str, num_shards: int,
             report: InputReport) -> dict:
    def distinct(column: str) -> int:  # distinct (dataset, id) pairs, -1 (none) excluded
        known = manifest.filter(pc.field(column) != -1)
        return known.group_by(["dataset", column]).aggregate([]).num_rows

    sizes = storage.listdir(out_dir)  # one listing instead of a request per shard on an object store
    missing = [shard_name(i) for i in range(num_shards) if shard_name(i) not in sizes]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:3]} vanished during the ingest; re-run it")
    shard_bytes = [sizes[shard_name(i)] for i in range(num_shards)]
    return {
        "format": fmt,
        "root": str(cfg.root),
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
    samples = parse_source(fmt, cfg.root, report, dataset=cfg.dataset, **cfg.options)
    limits = cfg.shard_limits
    previous = read_previous_plan(str(cfg.out), **limits)
    fixed = previous.fixed_maps(samples) if previous is not None else None
    maps = IdentityMaps.build(samples, fixed)
    plans = plan_shards(samples, maps, report, **limits, previous=previous if fixed is not None else None)
    return fmt, why, previous, plans


def run_ingest(cfg: IngestConfig, *, progress: bool = True) -> IngestResult:
    """Run (or resume) one ingest; raises :class:`BadInputError` in strict mode at the first bad input."""
    start = time.perf_counter()
    if storage.is_remote(cfg.out):
        storage.makedirs(cfg.out)  # a missing bucket or unreachable store fails before the source is listed
    report = InputReport(strict=cfg.strict)
    fmt, why, previous, plans = plan_ingest(cfg, report)
    out_dir = str(cfg.out)
    storage.makedirs(out_dir)  # a local folder (an object store has no folders to create)
    if not storage.is_remote(out_dir):
        remove_stale_tmp(Path(out_dir))  # (an object store never holds temporary objects: uploads are whole)
    write_plan(plans, storage.join(out_dir, PLAN_NAME), previous, **cfg.shard_limits)  # first: a resumed run plans the same shards

    # a re-run over an unchanged source has nothing to write: check here instead of starting Ray
    all_done = all(_finished_shard(p, out_dir) is not None for p in plans)
    results = _run_local(plans, out_dir) if cfg.workers == 0 or all_done else _run_ray(plans, out_dir, cfg)
    written = 0
    with tqdm(total=sum(len(p.samples) for p in plans), unit="img", desc="ingest",
              disable=not progress or all_done) as bar:  # nothing to write: no bar, the summary says so
        for row in results:
            for path, reason in json.loads(row["problems"]):
                report.reject(path, reason)  # raises here in strict mode
            written += bool(row["written"])
            bar.update(len(plans[row["index"]].samples))

    _remove_outdated_shards(out_dir, len(plans))
    manifest = _dataset_manifest(out_dir, len(plans))
    summary = _summary(cfg, fmt, manifest, out_dir, len(plans), report)
    _write_text_if_changed(json.dumps(summary, indent=2) + "\n", storage.join(out_dir, SUMMARY_NAME))
    manifest_path = storage.join(out_dir, MANIFEST_NAME)
    if not (storage.exists(manifest_path) and storage.read_table(manifest_path, schema=DATASET_SCHEMA).equals(manifest)):
        write_table_atomic(manifest, manifest_path)  # last: its presence marks a finished ingest
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

