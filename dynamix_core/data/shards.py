"""WebDataset tar shards with parquet manifests (SPEC 1.3): writing, completeness checks, reading.

One shard = ``shard-NNNNNN.tar`` holding ``<key>.jpg`` (or ``.png``, the bytes as stored), then
``<key>.json`` (every :class:`Record` field) and ``<key>.cls`` (the global identity, decimal, see
:func:`~dynamix_core.data.records.global_identity`; -1 = none) per sample, plus its manifest
``shard-NNNNNN.parquet``: one row per sample with the record fields, the image's extension, and the
byte ``offset``/``size`` of its data inside the tar (random access without scanning). The parquet's
schema metadata records the tar's size and what the writer was asked to write, so a later run can
tell a finished shard from a stale or partial one.

A shard set (what ``dynamix ingest`` writes) keeps the tars of each split alone in a folder of their
own, so any WebDataset reader takes a split folder as it is (``ray.data.read_webdataset(ROOT/train)``,
``webdataset.WebDataset(sorted(glob(ROOT/train/*.tar)))``), and everything else beside them::

    ROOT/train/shard-000000.tar ...           ROOT/manifests/train/shard-000000.parquet ...
    ROOT/query/shard-000007.tar ...           ROOT/manifests/query/shard-000007.parquet ...
    ROOT/gallery/shard-000009.tar ...         ROOT/manifests/gallery/shard-000009.parquet ...
    ROOT/manifest.parquet  ROOT/identities.parquet  ROOT/plan.parquet  ROOT/ingest.json

Shard numbers run over the whole set (one series, each split a contiguous part of it on a fresh
ingest). The dataset manifest's ``shard`` column names each tar relative to ``ROOT``
(``train/shard-000000.tar``); a set written before the split folders (tars and their manifests in
``ROOT`` itself, ``shard`` = ``shard-000000.tar``) reads the same way.

The tar is plain ustar (PAX ``path`` records for names over 100 bytes), written and read by the
small codec below rather than :mod:`tarfile`, whose per-member overhead is several times higher;
``tarfile`` and WebDataset read the shards unchanged (tests/test_shards.py).

Writes are atomic: the tar and then the manifest go to temporary names (the tar's in a folder of the
writer's choosing on the same file system, the set's root for an ingest, so a split folder never
holds one) and are ``os.replace``d into place, so a killed writer never leaves a partial file under a
final name, and a manifest under its final name implies its tar is complete. A shard set can also
live on an object store (``s3://bucket/prefix``, :mod:`dynamix_core.storage`): the tar is written to
a local temporary file and uploaded whole, the manifest after it, and members are read with ranged GETs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dynamix_core import storage
from dynamix_core.data.records import RECORD_FIELDS, SPLITS, InputReport, Record

IMAGE_EXTS = ("jpg", "png")
#: the dataset-level files of a shard set: one row per image (written last), the ingest summary, and
#: the identities with their global ids (``cls, dataset, source_pid, pid, images``)
MANIFEST_NAME = "manifest.parquet"
SUMMARY_NAME = "ingest.json"
IDENTITIES_NAME = "identities.parquet"
#: the folder of a shard set that holds the per-shard manifests (by split, as the tars)
MANIFESTS_DIR = "manifests"
TMP_MARK = ".tmp-"  # temporary files are ``.<final name>.tmp-<pid>``
BLOCK = 512  # tar block size
_IO_BUFFER = 4 * 2**20  # shard reads and writes are sequential: large buffered I/O

_INT_FIELDS = {"pid", "camid", "video_id", "tracklet_id", "frame", "offset", "size"}
#: Columns of a per-shard manifest; the dataset manifest adds ``shard``.
SHARD_COLUMNS = (*RECORD_FIELDS, "ext", "offset", "size")
SHARD_SCHEMA = pa.schema([(c, pa.int64() if c in _INT_FIELDS else pa.string()) for c in SHARD_COLUMNS])
DATASET_SCHEMA = SHARD_SCHEMA.append(pa.field("shard", pa.string()))


def shard_name(index: int) -> str:
    """``shard-000042.tar`` for index 42."""
    return f"shard-{index:06d}.tar"


def shard_relpath(split: str, index: int) -> str:
    """Where shard ``index`` of ``split`` lies in a shard set: ``train/shard-000042.tar``."""
    return f"{split}/{shard_name(index)}"


def shard_manifest_path(tar_path: str | Path) -> str | Path:
    """The per-shard parquet manifest next to ``tar_path`` (a path or a URI), where a lone shard (and
    a shard set written before the split folders) keeps it."""
    return storage.with_suffix(tar_path, ".parquet")


def set_shard_paths(root: str | Path, relpath: str) -> tuple[str | Path, str | Path]:
    """``(tar, manifest)`` of the shard at ``relpath`` (the dataset manifest's ``shard``) of the set at
    ``root``: ``ROOT/train/shard-N.tar`` and ``ROOT/manifests/train/shard-N.parquet``; for a flat name
    (a set written before the split folders) the manifest beside the tar. Paths stay Paths locally."""
    tar = storage.join(root, relpath) if storage.is_remote(root) else Path(root) / relpath
    if "/" not in relpath:
        return tar, shard_manifest_path(tar)
    manifest = storage.with_suffix(relpath, ".parquet")
    return tar, (storage.join(root, MANIFESTS_DIR, manifest) if storage.is_remote(root)
                 else Path(root) / MANIFESTS_DIR / manifest)


def shard_sizes(root: str | Path, relpaths: Iterable[str]) -> dict[str, int]:
    """``relpath -> bytes`` of the shards of the set at ``root`` that exist, listing each folder once
    (one LIST per folder on an object store, not a request per shard)."""
    out: dict[str, int] = {}
    by_folder: dict[str, list[str]] = {}
    for rel in relpaths:
        folder, _, _ = rel.rpartition("/")
        by_folder.setdefault(folder, []).append(rel)
    for folder, rels in by_folder.items():
        sizes = storage.listdir(storage.join(root, folder) if folder else root)
        out.update({rel: sizes[storage.name(rel)] for rel in rels if storage.name(rel) in sizes})
    return out


def no_manifest_error(root: str | Path) -> FileNotFoundError:
    """The one-line error for a ``root`` without ``manifest.parquet``: a split folder of a shard set
    (``ROOT/train``, what WebDataset readers take) is named as such, anything else is an unfinished ingest."""
    text = str(root).rstrip("/")
    parent = text.rpartition("/")[0] if storage.is_remote(text) else str(Path(text).parent)
    if storage.name(text) in SPLITS and parent and storage.exists(storage.join(parent, MANIFEST_NAME)):
        return FileNotFoundError(f"{root} is the {storage.name(text)!r} split folder of the shard set {parent}; "
                                 f"pass the set's folder ({parent}) instead")
    return FileNotFoundError(f"{storage.join(root, MANIFEST_NAME)} not found: {root} is not a finished ingest "
                             f"(run or re-run `dynamix ingest --out {root}`)")


def tmp_path(final: Path) -> Path:
    """A temporary sibling of ``final`` (same folder, so ``os.replace`` is atomic), unique per process."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by killed writers; returns what was removed."""
    stale = sorted(p for p in folder.glob(f".*{TMP_MARK}*") if p.is_file())
    for p in stale:
        p.unlink()
    return stale


#: rows per parquet row group of the manifests: a reader streaming a manifest in record batches
#: (the run index builder) decodes one row group at a time, so this bounds what it holds
ROW_GROUP_ROWS = 65536


def write_table_atomic(table: pa.Table, path: str | Path) -> None:
    """Write a parquet file under a temporary name, then move it into place (on an object store:
    serialise it, then upload it in one piece)."""
    if storage.is_remote(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS)
        storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
        return
    path = Path(path)
    tmp = tmp_path(path)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def record_row(record: Record) -> dict:
    """``record`` as a plain dict in :data:`RECORD_FIELDS` order (``dataclasses.asdict`` deep-copies
    and costs ~40x more, which shows at millions of samples)."""
    return {name: getattr(record, name) for name in RECORD_FIELDS}


def _ustar_header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
    """A 512-byte ustar header with fixed metadata (mode 644, owner 0, mtime 0), so the same samples
    always give byte-identical shards. Written by hand: ``tarfile.addfile`` costs ~4x more per member."""
    header = bytearray(BLOCK)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member_header(name: str) -> bytes:
    """Header block(s) for a member named ``name``: plain ustar, or a PAX ``path`` record first when
    the name does not fit the 100-byte name field."""
    encoded = name.encode()
    if len(encoded) <= 100:
        return b""
    record = b" path=" + encoded + b"\n"
    length = len(record) + len(str(len(record)))
    length += len(str(length)) - len(str(len(record)))  # the length counts its own digits
    pax = str(length).encode() + record
    return _ustar_header(b"././@PaxHeader", len(pax), b"x") + pax + bytes(-len(pax) % BLOCK)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What a :class:`ShardWriter` committed."""

    tar_path: str | Path
    num_samples: int
    tar_bytes: int


class ShardWriter:
    """Writes one shard at ``tar_path`` (and its manifest, by default beside it) atomically.

        with ShardWriter(path) as writer:
            for record, data, ext, cls in samples:
                writer.add(record, data, ext, cls)
            info = writer.commit({"plan_digest": digest})

    Nothing appears under the final names before :meth:`commit`; leaving the block without
    committing (an exception) deletes the temporary tar, which is written in ``tmp_dir`` (default:
    the tar's folder; it must be on the same file system). For an object-store ``tar_path`` the tar
    is built in a local temporary file and uploaded whole by :meth:`commit`."""

    def __init__(self, tar_path: str | Path, manifest_path: str | Path | None = None,
                 tmp_dir: str | Path | None = None):
        self.remote = storage.is_remote(tar_path)
        self.tar_path = tar_path if self.remote else Path(tar_path)
        self.manifest_path = manifest_path if manifest_path is not None else shard_manifest_path(self.tar_path)
        if self.remote:
            fd, tmp = tempfile.mkstemp(prefix=f".{storage.name(tar_path)}{TMP_MARK}", suffix=".tar")
            os.close(fd)
            self._tmp = Path(tmp)
        else:
            self.tar_path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = tmp_path(self.tar_path if tmp_dir is None else Path(tmp_dir) / self.tar_path.name)
        self._fh = open(self._tmp, "wb", buffering=_IO_BUFFER)
        self._committed = False
        self._sha256 = hashlib.sha256()
        self._offset = 0
        self._rows: list[dict] = []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._committed:
            return
        try:  # a full disk fails the close too (its buffer cannot be flushed): the file goes all the same
            self._fh.close()
        except OSError:
            if exc_info[0] is None:
                raise
        finally:
            self._tmp.unlink(missing_ok=True)

    def _write_member(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its data."""
        header = _member_header(name) + _ustar_header(name.encode()[:100], len(data))
        for part in (header, data, bytes(-len(data) % BLOCK)):
            self._fh.write(part)
            self._sha256.update(part)
        data_offset = self._offset + len(header)
        self._offset = data_offset + len(data) + -len(data) % BLOCK
        return data_offset

    def add(self, record: Record, data: bytes, ext: str, cls: int | None = None) -> None:
        """Append ``<key>.<ext>`` (the image bytes as given), ``<key>.json`` (the record) and, given
        ``cls``, ``<key>.cls`` (the global identity as a decimal number, WebDataset's label member)."""
        if ext not in IMAGE_EXTS:
            raise ValueError(f"{record.key}: image extension {ext!r} is not one of {IMAGE_EXTS}")
        row = record_row(record)
        offset = self._write_member(f"{record.key}.{ext}", data)
        self._rows.append({**row, "ext": ext, "offset": offset, "size": len(data)})
        self._write_member(f"{record.key}.json", json.dumps(row, sort_keys=True).encode())
        if cls is not None:
            self._write_member(f"{record.key}.cls", str(int(cls)).encode())

    def commit(self, metadata: dict[str, str]) -> ShardInfo:
        """Move the tar into place, then write the manifest (the completion mark) with
        ``metadata`` plus ``tar_bytes``, ``tar_sha256`` and ``num_samples`` in its schema metadata."""
        self._fh.write(bytes(2 * BLOCK))  # end-of-archive marker
        self._sha256.update(bytes(2 * BLOCK))
        self._fh.close()
        tar_bytes = self._tmp.stat().st_size
        if self.remote:
            try:
                storage.upload_file(self._tmp, self.tar_path)
            finally:
                self._tmp.unlink()
        else:
            os.replace(self._tmp, self.tar_path)
        self._committed = True
        table = pa.Table.from_pylist(self._rows, schema=SHARD_SCHEMA).replace_schema_metadata(
            {**metadata, "tar_bytes": str(tar_bytes), "tar_sha256": self._sha256.hexdigest(),
             "num_samples": str(len(self._rows))}
        )
        if not storage.is_remote(self.manifest_path):
            Path(self.manifest_path).parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(table, self.manifest_path)
        return ShardInfo(self.tar_path, len(self._rows), tar_bytes)


def read_shard_metadata(tar_path: str | Path, manifest: str | Path | None = None) -> dict[str, str] | None:
    """The metadata a finished shard was written with, or ``None`` when its manifest (default: beside
    it) is missing or its tar is missing or of a different size than the manifest records (a stale pair)."""
    manifest = shard_manifest_path(tar_path) if manifest is None else manifest
    if not storage.exists(manifest) or not storage.exists(tar_path):
        return None
    raw = storage.read_schema(manifest).metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}
    if meta.get("tar_bytes") != str(storage.size(tar_path)):
        return None
    return meta


def tar_sha256(tar_path: str | Path) -> str:
    """SHA-256 of a shard's bytes (read in one stream)."""
    digest = hashlib.sha256()
    with storage.open_input(tar_path, buffer_size=_IO_BUFFER) as fh:
        while chunk := fh.read(_IO_BUFFER):
            digest.update(chunk)
    return digest.hexdigest()


def shard_damage(tar_path: str | Path, meta: dict[str, str]) -> str | None:
    """Why the tar at ``tar_path`` is not the one its manifest metadata ``meta`` describes (size,
    then the SHA-256 a shard is written with), or None. A shard written before digests were
    recorded is checked by size only."""
    size = storage.size(tar_path)
    if meta.get("tar_bytes") != str(size):
        return f"{size} bytes, its manifest records {meta.get('tar_bytes')}"
    if "tar_sha256" in meta and tar_sha256(tar_path) != meta["tar_sha256"]:
        return "its bytes changed since it was written (SHA-256 differs from its manifest's)"
    return None


def read_shard_manifest(tar_path: str | Path, manifest: str | Path | None = None) -> pa.Table:
    """The per-shard manifest table (without schema metadata); ``manifest`` default: beside the tar."""
    manifest = shard_manifest_path(tar_path) if manifest is None else manifest
    return storage.read_table(manifest, schema=SHARD_SCHEMA).replace_schema_metadata(None)


# ---------------------------------------------------------------------------------------------- read


class TarFormatError(ValueError):
    """A tar stream ends early or holds a corrupt header; the message is the report reason."""


def _octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarFormatError(f"corrupt tar: header {what} field {field!r} is not octal") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """``key=value`` records of a PAX extended header: each is ``"<length> <key>=<value>"`` plus a
    newline, the length counting the whole record."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("corrupt tar: malformed PAX header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _read_exact(fh, size: int, what: str) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise TarFormatError(f"truncated tar: unexpected end of data in {what} ({len(data)} of {size} bytes)")
    return data


class StaleShardError(OSError):
    """A (tar, offset, size) taken from a manifest no longer points at that member: the shard was
    rewritten (a re-ingest of a grown source) after the manifest was read."""


def _member_at(header: bytes, data_size: int, key: str | None) -> str | None:
    """Why ``header`` (the 512 bytes before a member's data) is not the header of a regular file of
    ``data_size`` bytes named ``<key>.<ext>``, or None when it is."""
    if len(header) != BLOCK or header[156:157] not in (b"0", b"\0"):
        return "no regular-file tar header before the data"
    stored = bytearray(header)
    stored[148:156] = b" " * 8
    try:
        if sum(stored) != _octal(header[148:156], "checksum") or _octal(header[124:136], "size") != data_size:
            return "the tar header before the data does not match (checksum or size)"
    except TarFormatError as exc:
        return str(exc)
    name = header[:100].rstrip(b"\0")
    if key is not None and not (name.startswith(key.encode()[:100]) and name[len(key):len(key) + 1] in (b".", b"")):
        return f"the member there is {name.decode('utf-8', 'replace')!r}, not {key}"
    return None


def read_members(tar_path: str | Path, offsets: Iterable[int], sizes: Iterable[int],
                 keys: Iterable[str] | None = None, **read_options) -> list[bytes]:
    """The data of the members at ``offsets`` (manifest ``offset``/``size`` columns) of one shard.

    Each read also takes the 512-byte tar header in front of the data and checks it (checksum, size,
    and the member name when ``keys`` are given): a shard rewritten since its manifest was read
    raises :class:`StaleShardError` instead of handing out another image's bytes. ``tar_path`` may
    be a URI: header and data are one ranged read, and nearby members share one GET
    (``read_options``: ``gap`` and ``threads`` of :func:`dynamix_core.storage.read_ranges`)."""
    offsets, sizes = list(offsets), list(sizes)
    names = list(keys) if keys is not None else [None] * len(offsets)
    if len(sizes) != len(offsets) or len(names) != len(offsets):
        raise ValueError(f"{tar_path}: {len(offsets)} offsets, {len(sizes)} sizes and {len(names)} keys")
    for offset in offsets:
        if offset < BLOCK:
            raise StaleShardError(f"{tar_path}: offset {offset} leaves no room for a tar header")
    blocks = storage.read_ranges(tar_path, [(offset - BLOCK, BLOCK + size) for offset, size in zip(offsets, sizes)],
                                 **read_options)
    out = []
    for block, offset, size, key in zip(blocks, offsets, sizes, names):
        if len(block) != BLOCK + size:
            raise StaleShardError(f"{tar_path}: truncated at offset {offset}; re-read the shard set's manifest "
                                  f"(the shard was rewritten?)")
        problem = _member_at(block[:BLOCK], size, key)
        if problem is not None:
            raise StaleShardError(f"{tar_path}: at offset {offset}: {problem}; the shard changed after its "
                                  f"manifest was read: re-read the shard set (restart the reader)")
        out.append(block[BLOCK:])
    return out


def _iter_tar_members(fh) -> Iterator[tuple[str, bool, bytes]]:
    """``(name, is_regular_file, data)`` of each member of a ustar/PAX/GNU tar stream.

    A minimal sequential parser instead of :mod:`tarfile`: tarfile's per-member Python overhead was
    ~40% of the decode time of a 128x64 JPEG (benchmarks/bench_data.py), and shards hold millions
    of such small members. Raises :class:`TarFormatError` on a truncated or corrupt stream."""
    block = BLOCK
    long_name: str | None = None
    while True:
        header = fh.read(block)
        if not header or header == bytes(block):  # end of archive (a stream may omit the zero blocks)
            return
        if len(header) != block:
            raise TarFormatError(f"truncated tar: unexpected end of data in a header ({len(header)} of {block} bytes)")
        checksum = _octal(header[148:156], "checksum")
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:  # checksum field counted as spaces
            raise TarFormatError("corrupt tar: header checksum mismatch")
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size, kind = _octal(header[124:136], "size"), header[156:157]
        data = _read_exact(fh, size, f"member {name!r}")
        _read_exact(fh, -size % block, f"padding of {name!r}")
        if kind == b"x":  # PAX header of the next member (long or non-ASCII name)
            long_name = _pax_records(data).get("path", long_name)
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind != b"g":  # b"g" = PAX global header: nothing a shard reader needs
            yield (long_name or name), kind in (b"0", b"\0"), data
            long_name = None


_MEMBER_EXTS = (*IMAGE_EXTS, "json", "cls")  # the record is the json; the cls (global identity) is for other readers


def _sample_key(name: str) -> tuple[str, str]:
    """``(key, ext)`` by the WebDataset convention: the key ends at the first dot of the base name.
    (String methods rather than posixpath: this runs twice per sample.)"""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def _member_problem(name: str, is_file: bool, ext: str) -> str | None:
    if name.startswith("/") or (".." in name and ".." in name.split("/")):
        return "unsafe tar member path: absolute or containing '..'"
    if not is_file:
        return "unexpected tar member: not a regular file"
    if ext not in _MEMBER_EXTS:
        return f"unexpected tar member: extension {ext!r} is not one of {_MEMBER_EXTS}"
    return None


def _finish_sample(
    tar_path: str | Path, key: str, parts: dict[str, bytes], report: InputReport
) -> tuple[Record, bytes, str] | None:
    where = f"{tar_path}:{key}"
    exts = [e for e in IMAGE_EXTS if e in parts]
    if "json" not in parts or len(exts) != 1:
        report.reject(where, f"incomplete sample: members {sorted(parts)}, expected one image and a json")
        return None
    try:
        fields = json.loads(parts["json"])
        record = Record(**fields)
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; TypeError = wrong fields
        report.reject(where, f"malformed json: {exc}")
        return None
    if record.key != key:
        report.reject(where, f"malformed json: key {record.key!r} does not match the member name")
        return None
    return record, parts[exts[0]], exts[0]


def iter_tar_samples(tar_path: str | Path, report: InputReport) -> Iterator[tuple[Record, bytes, str]]:
    """Stream ``(record, image bytes, ext)`` from one shard in tar order, validating as it goes.

    A member with an absolute or ``..`` path, an unexpected member, a sample without its json or
    image, a malformed json, and a truncated or corrupt tar are rejected through ``report`` (raising
    in strict mode); everything valid before and after a bad member is still yielded."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with storage.open_input(tar_path, buffer_size=_IO_BUFFER) as fh:
            for name, is_file, data in _iter_tar_members(fh):
                member_key, ext = _sample_key(name)
                problem = _member_problem(name, is_file, ext)
                if problem is not None:
                    report.reject(f"{tar_path}:{name}", problem)
                    continue
                if member_key != key:
                    if key is not None and (sample := _finish_sample(tar_path, key, parts, report)):
                        yield sample
                    key, parts = member_key, {}
                parts[ext] = data
    except TarFormatError as exc:
        truncated = exc
    else:
        truncated = None
    # the pending sample's members were all read whole; after a truncation it counts only if complete
    complete = "json" in parts and any(e in parts for e in IMAGE_EXTS)
    if key is not None and (truncated is None or complete):
        if sample := _finish_sample(tar_path, key, parts, report):
            yield sample
    if truncated is not None:
        report.reject(str(tar_path), str(truncated))
