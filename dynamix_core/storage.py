"""Storage by URI: local paths, ``file://``, ``s3://`` and ``gs://``, through :mod:`pyarrow.fs` (the
filesystem layer Ray Data itself reads and writes with, so one URI means the same thing to both).

    data = read_range("s3://bucket/shards/shard-000000.tar", offset, size)   # one ranged GET
    write_bytes_atomic("s3://bucket/shards/manifest.parquet", payload)        # one upload, visible whole

S3 and S3-compatible stores (MinIO, Ceph, moto) are configured by the standard variables: the
endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``), the
region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` (else looked up from the bucket on AWS), the
credentials by the AWS SDK's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance metadata). ``gs://`` uses Google's
default credentials (``GOOGLE_APPLICATION_CREDENTIALS``), or an emulator without credentials when
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` is set (the tests run one on loopback). Buckets are never created here.

Local paths keep plain-file semantics (``open``, ``os.replace`` after an fsync). On an object store
an object appears only when its upload completes, so every write here is one whole-object upload:
a killed writer leaves the old object or none, never half of one. Errors are one line naming the
URI and what to do (:class:`StorageError`; a missing object stays a :class:`FileNotFoundError`).
"""

from __future__ import annotations

import datetime
import functools
import os
import posixpath
import re
from pathlib import Path
from typing import BinaryIO, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dynamix_core.atomic import write_atomic

REMOTE_SCHEMES = ("s3", "gs", "gcs")
#: S3 requests are retried by the AWS SDK's standard strategy (exponential backoff) this many times
S3_MAX_ATTEMPTS = 3
#: GCS requests are retried for this many seconds at most
GCS_RETRY_S = 30.0
#: ranged reads of one object closer than this are fetched by one GET (tar members of a video are
#: separated by their json member, one or two 512-byte blocks)
COALESCE_GAP = 256 * 2**10
COALESCE_MAX = 64 * 2**20  # ... up to this many bytes per GET
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(OSError):
    """An object store could not be used (missing bucket, no access, endpoint unreachable); the
    message is one line naming the URI and what to do."""


def scheme(uri: str | Path) -> str:
    """``"s3"``, ``"gs"``, ``"file"``, or ``""`` for a plain path."""
    match = _SCHEME_RE.match(str(uri))
    return match[1].lower() if match else ""


def is_remote(uri: str | Path) -> bool:
    """Whether ``uri`` names an object store rather than the local file system."""
    return scheme(uri) in REMOTE_SCHEMES


def local_path(uri: str | Path) -> str:
    """The file system path of a local ``uri`` (a plain path or ``file://``)."""
    text = str(uri)
    if scheme(text) == "file":
        return text[len("file://"):]
    if scheme(text):
        raise ValueError(f"{text}: not a local path")
    return text


def join(uri: str | Path, *parts: str) -> str:
    """``uri`` with ``parts`` appended (``/``-separated on object stores)."""
    text = str(uri)
    if not scheme(text):
        return os.path.join(text, *parts)
    return posixpath.join(text.rstrip("/") if not text.endswith("://") else text, *parts)


def name(uri: str | Path) -> str:
    """The last component of ``uri`` (``shard-000000.tar``)."""
    return posixpath.basename(str(uri).rstrip("/"))


def with_suffix(uri: str | Path, suffix: str) -> str | Path:
    """``uri`` with its extension replaced (a :class:`Path` stays a Path)."""
    if isinstance(uri, Path):
        return uri.with_suffix(suffix)
    head, sep, base = str(uri).rpartition("/")
    dot = base.rfind(".")
    return head + sep + (base[:dot] if dot > 0 else base) + suffix


# ------------------------------------------------------------------------------------- file systems


def _split_bucket(uri: str) -> tuple[str, str]:
    """``("bucket", "bucket/key")`` of ``s3://bucket/key``."""
    path = str(uri).split("://", 1)[1].strip("/")
    if not path:
        raise StorageError(f"{uri}: no bucket in the URI; expected {scheme(uri)}://BUCKET/PREFIX")
    return path.split("/", 1)[0], path


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=None)
def _bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:  # no access to the lookup: let the SDK's default region apply
        return None


@functools.lru_cache(maxsize=None)
def _s3_filesystem(endpoint: str | None, region: str | None, _credentials: tuple) -> pafs.S3FileSystem:
    # _credentials only keys the cache: a process whose variables change gets a fresh client
    return pafs.S3FileSystem(
        endpoint_override=endpoint, region=region, allow_bucket_creation=False, allow_bucket_deletion=False,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )


def gcs_endpoint() -> str | None:
    """A Google Cloud Storage emulator's endpoint from the environment (``CLOUD_STORAGE_EMULATOR_ENDPOINT``,
    the variable Google's C++ client reads, e.g. ``http://127.0.0.1:9023``; None: Google itself)."""
    return os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT") or None


@functools.lru_cache(maxsize=None)
def _gcs_filesystem(endpoint: str | None) -> pafs.GcsFileSystem:
    # requests are retried for GCS_RETRY_S at most (the client's default is many minutes: an
    # unreachable endpoint would look like a hang)
    retry = datetime.timedelta(seconds=GCS_RETRY_S)
    if endpoint is None:
        return pafs.GcsFileSystem(retry_time_limit=retry)
    scheme_, _, host = endpoint.rpartition("://")
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme_ or "http", endpoint_override=host.rstrip("/"),
                              retry_time_limit=retry)


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for ``uri``; the same filesystem object is reused per configuration."""
    kind = scheme(uri)
    if kind == "s3":
        bucket, path = _split_bucket(str(uri))
        endpoint = s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        if region is None and endpoint is None:
            region = _bucket_region(bucket)
        credentials = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_PROFILE"))
        return _s3_filesystem(endpoint, region, credentials), path
    if kind in ("gs", "gcs"):
        return _gcs_filesystem(gcs_endpoint()), _split_bucket(str(uri))[1]
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def _where(uri: str) -> str:
    if scheme(uri) == "s3":
        endpoint = s3_endpoint()
        variable = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        return f"the S3 endpoint {endpoint} ({variable})" if endpoint else "AWS S3"
    return "Google Cloud Storage"


def _error(uri: str, action: str, exc: OSError) -> OSError:
    """``exc`` from pyarrow as one line naming ``uri`` and what to do."""
    text = " ".join(str(exc).split())
    detail = text.split("; Details:")[0][-300:]
    if isinstance(exc, FileNotFoundError):
        return _not_found(uri)
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text:
        return _missing_bucket(uri)
    if "NETWORK_CONNECTION" in text or "Could not resolve" in text or "Could not connect" in text:
        hint = "check AWS_ENDPOINT_URL and the network" if scheme(uri) == "s3" else "check the network"
        return StorageError(f"{uri}: cannot {action}: {_where(uri)} is unreachable ({detail}); {hint}")
    if ("ACCESS_DENIED" in text or "HTTP status 403" in text or "InvalidAccessKeyId" in text
            or "SignatureDoesNotMatch" in text or "credentials" in text.lower()):
        fix = ("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" if scheme(uri) == "s3"
               else "set GOOGLE_APPLICATION_CREDENTIALS")
        return StorageError(f"{uri}: cannot {action}: access denied by {_where(uri)}; {fix} to credentials "
                            "allowed to use this bucket")
    return StorageError(f"{uri}: cannot {action}: {detail}")


def _missing_bucket(uri: str) -> StorageError:
    bucket = _split_bucket(uri)[0]
    return StorageError(f"{uri}: bucket {bucket!r} does not exist at {_where(uri)}; create it "
                        f"(e.g. `aws s3 mb {scheme(uri)}://{bucket}`) or fix the URI")


_known_buckets: set[tuple] = set()


def _check_bucket(uri: str) -> None:
    """Raise the missing-bucket error when ``uri``'s bucket does not exist (checked once per bucket)."""
    fs, _ = resolve(uri)
    bucket = _split_bucket(uri)[0]
    if (id(fs), bucket) in _known_buckets:
        return
    try:
        info = fs.get_file_info(bucket)
    except OSError:  # e.g. not allowed to list the bucket: cannot tell, the object call reports
        return
    if info.type == pafs.FileType.NotFound:
        raise _missing_bucket(uri)
    _known_buckets.add((id(fs), bucket))


def _not_found(uri: str) -> OSError:
    """A missing object: the missing-bucket error when that is why, else FileNotFoundError."""
    if is_remote(uri):
        try:
            _check_bucket(uri)
        except StorageError as exc:
            return exc
    return FileNotFoundError(f"{uri} not found")


class _Errors:
    """``with _Errors(uri, "read"):`` turns pyarrow's OSErrors into one-line ones."""

    def __init__(self, uri: str, action: str):
        self.uri, self.action = uri, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise _error(self.uri, self.action, exc) from None
        return False


# -------------------------------------------------------------------------------------------- reads


def exists(uri: str | Path) -> bool:
    """Whether the file or object ``uri`` exists (a missing bucket raises :class:`StorageError`)."""
    if not is_remote(uri):
        return os.path.isfile(local_path(uri))
    fs, path = resolve(uri)
    with _Errors(str(uri), "look up"):
        found = fs.get_file_info(path).type == pafs.FileType.File
    if not found:
        _check_bucket(str(uri))
    return found


def size(uri: str | Path) -> int:
    """The size of the file or object ``uri`` in bytes."""
    if not is_remote(uri):
        return os.stat(local_path(uri)).st_size
    return _object_info(str(uri)).size


def _object_info(uri: str) -> pafs.FileInfo:
    """The store's information on the object ``uri``; FileNotFoundError naming it when it is missing."""
    fs, path = resolve(uri)
    with _Errors(uri, "look up"):
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise _not_found(uri)
    return info


def open_input(uri: str | Path, buffer_size: int = 4 * 2**20) -> BinaryIO:
    """``uri`` opened for sequential reading (``read(n)``), with ``buffer_size`` read ahead."""
    if not is_remote(uri):
        return open(local_path(uri), "rb", buffering=buffer_size)
    fs, path = resolve(uri)
    with _Errors(str(uri), "open"):
        return fs.open_input_stream(path, buffer_size=buffer_size)


def open_random(uri: str | Path) -> BinaryIO:
    """``uri`` opened for random access (``seek``/``read``: a parquet footer, then row groups); on an
    object store each read is a ranged GET."""
    if not is_remote(uri):
        return open(local_path(uri), "rb")
    fs, path = resolve(uri)
    with _Errors(str(uri), "open"):
        return fs.open_input_file(path)


def read_bytes(uri: str | Path) -> bytes:
    """The whole content of ``uri``."""
    if not is_remote(uri):
        return Path(local_path(uri)).read_bytes()
    fs, path = resolve(uri)
    with _Errors(str(uri), "read"):
        with fs.open_input_file(path) as fh:
            return fh.read()


def read_range(uri: str | Path, offset: int, length: int) -> bytes:
    """``length`` bytes of ``uri`` from ``offset`` (fewer at the end of the file): one ranged GET
    on an object store, not a download of the object."""
    return read_ranges(uri, [(offset, length)])[0]


def _coalesce(ranges: list[tuple[int, int]], gap: int = COALESCE_GAP) -> list[tuple[int, int, list[int]]]:
    """Spans ``(start, end, [range indices])`` covering ``ranges``, those at most ``gap`` bytes apart merged."""
    spans: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        start, end = ranges[i][0], ranges[i][0] + ranges[i][1]
        if spans and start - spans[-1][1] <= gap and max(end, spans[-1][1]) - spans[-1][0] <= COALESCE_MAX:
            s, e, members = spans[-1]
            spans[-1] = (s, max(e, end), members + [i])
        else:
            spans.append((start, end, [i]))
    return spans


def read_ranges(uri: str | Path, ranges: Iterable[tuple[int, int]], *, gap: int = COALESCE_GAP,
                threads: int = 1) -> list[bytes]:
    """The bytes of each ``(offset, length)`` of ``uri``, in the given order (shorter where the
    file ends first). On an object store ranges at most ``gap`` bytes apart share one ranged GET
    (fewer requests, at the price of the bytes between them), and ``threads`` GETs run at once."""
    ranges = list(ranges)
    if not is_remote(uri):
        out = []
        with open(local_path(uri), "rb") as fh:
            for offset, length in ranges:
                fh.seek(offset)
                out.append(fh.read(length))
        return out
    fs, path = resolve(uri)
    out: list[bytes] = [b""] * len(ranges)
    with _Errors(str(uri), "read"):
        with fs.open_input_file(path) as fh:
            total = fh.size()
            spans = _coalesce(ranges, gap)

            def fetch(span: tuple[int, int, list[int]]) -> bytes:
                lo, hi = min(span[0], total), min(span[1], total)
                return fh.read_at(hi - lo, lo) if hi > lo else b""  # Arrow's ReadAt is thread-safe

            if threads > 1 and len(spans) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(min(threads, len(spans))) as pool:
                    data = list(pool.map(fetch, spans))
            else:
                data = [fetch(span) for span in spans]
            for (start, _, members), span in zip(spans, data):
                for i in members:  # every member starts at or after the span's start
                    offset, length = ranges[i]
                    out[i] = span[offset - start:offset - start + length]
    return out


def listdir(uri: str | Path) -> dict[str, int]:
    """``name -> size`` of the files directly inside the folder ``uri`` (empty when it does not exist).
    One LIST request per 1000 objects on an object store."""
    if not is_remote(uri):
        folder = local_path(uri)
        if not os.path.isdir(folder):
            return {}
        sizes = {}
        for entry in os.scandir(folder):
            try:  # another process may rename or delete a file between the scan and its stat
                if entry.is_file():
                    sizes[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                continue
        return sizes
    fs, path = resolve(uri)
    with _Errors(str(uri), "list"):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    if not infos:
        _check_bucket(str(uri))
    return {posixpath.basename(i.path): i.size for i in infos if i.type == pafs.FileType.File}


def read_table(uri: str | Path, **kwargs) -> pa.Table:
    """A parquet file as a table (``kwargs`` go to :func:`pyarrow.parquet.read_table`). On an object
    store a read of some ``columns`` fetches the footer and those columns' chunks (ranged GETs), not
    the whole object; a whole table is one GET."""
    if not is_remote(uri):
        return pq.read_table(local_path(uri), **kwargs)
    if kwargs.get("columns") is not None:
        with open_random(uri) as fh:
            return pq.read_table(fh, **kwargs)
    return pq.read_table(pa.BufferReader(read_bytes(uri)), **kwargs)


def read_parquet_metadata(uri: str | Path) -> pq.FileMetaData:
    """The footer of a parquet file (schema, rows, row groups and their statistics): on an object
    store a few ranged GETs at the end of the object, whatever its size."""
    if not is_remote(uri):
        return pq.read_metadata(local_path(uri))
    with open_random(uri) as fh:
        return pq.ParquetFile(fh).metadata


def read_schema(uri: str | Path) -> pa.Schema:
    """The schema (with its metadata) of a parquet file (its footer only)."""
    if not is_remote(uri):
        return pq.read_schema(local_path(uri))
    return read_parquet_metadata(uri).schema.to_arrow_schema()


# ------------------------------------------------------------------------------------------- writes


def makedirs(uri: str | Path) -> None:
    """Create the folder ``uri`` (local); on an object store, check that the bucket exists
    (prefixes need no creating), so a wrong bucket fails before any work."""
    if not is_remote(uri):
        os.makedirs(local_path(uri), exist_ok=True)
        return
    _check_bucket(str(uri))


def write_bytes_atomic(uri: str | Path, data: bytes | str) -> None:
    """Replace ``uri`` with ``data``: readers and crashes see the old content or the new, never half
    (local: temp file + fsync + rename; object store: one upload, visible only once complete)."""
    data = data.encode() if isinstance(data, str) else data
    if not is_remote(uri):
        write_atomic(local_path(uri), data)
        return
    fs, path = resolve(uri)
    with _Errors(str(uri), "write"):
        # one write + close: the stream is never left for a destructor to complete half-written
        stream = fs.open_output_stream(path)
        stream.write(data)
        stream.close()


def upload_file(local: str | Path, uri: str | Path) -> None:
    """Copy the finished local file ``local`` to ``uri`` in one upload (the object appears only when
    the upload completes; pyarrow streams it in parts, so memory stays bounded)."""
    if not is_remote(uri):
        raise ValueError(f"{uri}: upload_file copies to an object store; use os.replace for local files")
    fs, path = resolve(uri)
    with _Errors(str(uri), "upload"):
        pafs.copy_files(os.path.abspath(local), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def delete(uri: str | Path, missing_ok: bool = True) -> None:
    """Remove the file or object ``uri``."""
    if not is_remote(uri):
        Path(local_path(uri)).unlink(missing_ok=missing_ok)
        return
    fs, path = resolve(uri)
    try:
        with _Errors(str(uri), "delete"):
            fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


# ------------------------------------------------------------------------------- local copies


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/dynamix/KIND`` (``~/.cache`` by default; the system temporary folder when
    that cannot be made): where local copies of objects are kept."""
    import tempfile

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for root in (base, Path(tempfile.gettempdir())):
        folder = root / "dynamix" / kind
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            continue
    raise OSError(f"no writable cache folder for {kind} (tried {base} and {tempfile.gettempdir()}); set XDG_CACHE_HOME")


def _cache_key(uri: str) -> str:
    import hashlib

    return f"{name(uri) or 'root'}-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:10]}"


def _tree_infos(uri: str | Path) -> dict[str, tuple[int, int | None]]:
    """``relative path -> (size, mtime in ns or None)`` of every file below the folder ``uri``."""
    if not is_remote(uri):
        folder = Path(local_path(uri))
        if not folder.is_dir():
            return {}
        infos = {}
        for p in folder.rglob("*"):
            try:  # a file renamed or deleted by another process after the walk saw it is not listed
                if p.is_file():
                    st = p.stat()
                    infos[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                continue
        return infos
    fs, path = resolve(str(uri).rstrip("/"))
    with _Errors(str(uri), "list"):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, path): (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}


def list_tree(uri: str | Path) -> dict[str, int]:
    """``relative path -> size`` of every file below the folder ``uri`` (``/``-separated; empty when
    there is none). On an object store one LIST request per 1000 objects."""
    return {rel: nbytes for rel, (nbytes, _) in _tree_infos(uri).items()}


def _cached_copy(uri: str, local: Path, nbytes: int, mtime_ns: int | None) -> None:
    """Make ``local`` a copy of the object ``uri`` (of ``nbytes`` bytes, modified at ``mtime_ns``):
    downloaded unless the copy already has that size and carries that modification time (set on
    the copy when it was downloaded), so an object replaced by one of the same size (new weights of
    the same architecture) is fetched again. A store that reports no time is always fetched."""
    if mtime_ns is not None and local.is_file():
        stat = local.stat()
        if stat.st_size == nbytes and stat.st_mtime_ns == mtime_ns:
            return
    download_file(uri, local)
    if mtime_ns is not None:
        os.utime(local, ns=(mtime_ns, mtime_ns))


def download_file(uri: str | Path, local: str | Path) -> Path:
    """Copy the object ``uri`` to the local file ``local``, atomically (a temporary file renamed)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part{os.getpid()}")
    fs, path = resolve(uri)
    with _Errors(str(uri), "download"):
        pafs.copy_files(path, str(tmp.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, local)
    return local


def local_file(uri: str | Path) -> Path:
    """A local path for the file ``uri``: itself when local, else a cached copy (downloaded again
    when the object's size or modification time changed). Raises FileNotFoundError naming the URI
    when it is missing."""
    if not is_remote(uri):
        return Path(local_path(uri))
    uri = str(uri)
    info = _object_info(uri)
    local = cache_dir("files") / _cache_key(uri) / name(uri)
    _cached_copy(uri, local, info.size, info.mtime_ns)
    return local


def local_tree(uri: str | Path) -> Path:
    """A local folder holding the tree under ``uri`` (a raw data set's folder on an object store, for
    the parsers that read a directory tree): itself when local, else a cached copy under
    :func:`cache_dir` ``("trees")``, where a file whose size and time did not change is not downloaded again
    and files gone from the store are removed. A prefix with no object raises FileNotFoundError."""
    if not is_remote(uri):
        return Path(local_path(uri))
    uri = str(uri).rstrip("/")
    files = _tree_infos(uri)
    if not files:
        _check_bucket(uri)
        raise FileNotFoundError(f"{uri}: no object under this prefix (upload the data set there, or fix the path)")
    root = cache_dir("trees") / _cache_key(uri)
    for rel, (nbytes, mtime_ns) in files.items():
        _cached_copy(join(uri, rel), root / rel, nbytes, mtime_ns)
    for local in [p for p in root.rglob("*") if p.is_file()]:
        if str(local.relative_to(root)) not in files:
            local.unlink()
    return root
