"""One writer per run folder: the driver of a run holds its *lease* for as long as it runs.

A second run on the same run folder (the same ``run.storage`` and ``run.name``, from this machine or
another) refuses before it writes anything there, in one line naming the holder: its host, process
and start time. A lease left by a run that died is taken over, with a warning naming it.

- A local run folder: ``RUN/lease.json`` locked with ``flock`` for the run's life. The kernel drops
  the lock when the holding process ends, however it ends, so a dead run's lease is free at once;
  the file says who holds (or last held) it.
- An object store: the object ``RUN/lease.json`` says who holds it and when it was last renewed; the
  holder renews it every ``ttl_s / 4`` seconds. It is taken over once it is ``ttl_s`` seconds old by
  the store's clock, or at once when its holder was a process of this host that no longer runs. On
  S3 the lease is created and renewed by conditional writes (``If-None-Match`` / ``If-Match``), so of
  two runs starting together exactly one gets it; a store without them (Google Cloud Storage here,
  an S3 implementation that refuses them) is written and read back instead, which leaves a window of
  a few milliseconds between two simultaneous starts.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from dynamix_core import storage
from dynamix_core.errors import StopRun

log = logging.getLogger("dynamix.lease")

LEASE_FILE = "lease.json"
#: seconds without a renewal after which an object-store lease counts as abandoned
DEFAULT_TTL_S = 60.0


class RunFolderBusy(StopRun):
    """The run folder is held by another run (the message names it)."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def this_holder(ttl_s: float) -> dict:
    """What a lease says about the process taking it."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "boot_id": _boot_id(), "started": now, "renewed": now, "ttl_s": ttl_s, "token": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    """``host H, pid P, started 2026-01-02 10:11:12 UTC``."""
    started = holder.get("started")
    when = (datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(started, (int, float)) else "?")
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def died_here(holder: dict) -> bool:
    """Whether ``holder`` was a process of this host (this boot) that no longer runs."""
    if holder.get("host") != socket.gethostname() or holder.get("boot_id") != _boot_id():
        return False
    pid = holder.get("pid")
    start = _process_start(pid) if isinstance(pid, int) else None
    return start is None or start != holder.get("process_start")  # gone, or its number reused since


def _busy(run_dir, holder: dict) -> RunFolderBusy:
    return RunFolderBusy(
        f"run folder {run_dir} is in use by another run ({describe(holder)}): one run writes a run folder at a "
        "time; wait for that run to end or stop it, or choose another run.name or run.storage")


class RunLease:
    """``with RunLease(run_dir):`` holds the run folder's lease (:class:`RunFolderBusy` when another
    run holds it)."""

    def __init__(self, run_dir: str | Path, ttl_s: float = DEFAULT_TTL_S):
        self.run_dir, self.ttl_s = run_dir, ttl_s
        self.path = storage.join(run_dir, LEASE_FILE)
        self.holder = this_holder(ttl_s)
        self.previous: dict | None = None  # the dead run's lease this one took over
        self._fd: int | None = None
        self._object: _ObjectLease | None = None

    def __enter__(self) -> "RunLease":
        if storage.is_remote(self.run_dir):
            self._object = _ObjectLease(self.path, self.holder, self.run_dir)
            self.previous = self._object.acquire()
        else:
            self._acquire_local()
        if self.previous:
            log.warning("%s: took over the lease of a run that is no longer running (%s)", self.run_dir,
                        describe(self.previous))
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire_local(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _busy(self.run_dir, holder) from None
        previous = _parse(os.pread(fd, 4096, 0))
        self.previous = previous if previous and not previous.get("released") else None
        _rewrite(fd, self.holder)
        self._fd = fd

    def release(self) -> None:
        """Give the lease up (the file keeps the last holder, marked released)."""
        if self._fd is not None:
            _rewrite(self._fd, {**self.holder, "released": time.time()})
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._object is not None:
            self._object.release()
            self._object = None


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data.decode(errors="replace") or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _rewrite(fd: int, holder: dict) -> None:
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


class _ObjectLease:
    """The lease object of a run folder on an object store, renewed by a background thread."""

    def __init__(self, uri: str, holder: dict, run_dir):
        self.uri, self.holder, self.run_dir = uri, holder, run_dir
        self.s3 = _S3Object(uri) if storage.scheme(uri) == "s3" else None
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> dict | None:
        """Take the lease; returns the dead run's lease it took over (None: it was free)."""
        previous = None
        for _ in range(3):
            current, age = self._read()
            if current is not None and not current.get("released"):
                if age < float(current.get("ttl_s", DEFAULT_TTL_S)) and not died_here(current):
                    raise _busy(self.run_dir, current)
                previous = current
            if self._write(if_absent=current is None, if_etag=None if current is None else current["_etag"]):
                break
        else:
            current, _ = self._read()
            raise _busy(self.run_dir, current or {})
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return {k: v for k, v in previous.items() if k != "_etag"} if previous else None

    def _read(self) -> tuple[dict | None, float]:
        """The lease object (with its ``_etag``) and its age in seconds; ``(None, inf)`` when there is none."""
        if self.s3 is not None:
            found = self.s3.get()
            if found is None:
                return None, float("inf")
            data, etag, age = found
            return {**_parse(data), "_etag": etag}, age
        try:
            data = storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None, float("inf")
        holder = _parse(data)
        return {**holder, "_etag": None}, time.time() - float(holder.get("renewed", 0))

    def _write(self, *, if_absent: bool, if_etag: str | None) -> bool:
        """Write this holder's lease under the condition; False when another writer won."""
        body = json.dumps(self.holder).encode()
        if self.s3 is not None:
            etag = self.s3.put(body, if_absent=if_absent, if_etag=if_etag)
            if etag is None:
                return False
            if etag is not _S3Object.UNCONDITIONAL:
                self.etag = etag
                return True
        else:
            storage.write_bytes_atomic(self.uri, body)
        time.sleep(0.2)  # no conditional write: the last of simultaneous writers wins; read back who
        current, _ = self._read()
        if current is not None and current.get("token") == self.holder["token"]:
            self.etag = current["_etag"]
            return True
        return False

    def _renew(self) -> None:
        every = max(0.5, float(self.holder["ttl_s"]) / 4)
        while not self._stop.wait(every):
            self.holder["renewed"] = time.time()
            try:
                if self.s3 is not None and self.etag is not None:
                    etag = self.s3.put(json.dumps(self.holder).encode(), if_absent=False, if_etag=self.etag)
                    if etag is None:
                        log.error("%s: the run folder's lease was taken over by another run; this run no longer "
                                  "holds it", self.run_dir)
                        return
                    if etag is not _S3Object.UNCONDITIONAL:
                        self.etag = etag
                else:
                    storage.write_bytes_atomic(self.uri, json.dumps(self.holder).encode())
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next renewal tries again
                log.warning("%s: could not renew the run folder's lease (%s); retrying", self.run_dir, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, _ = self._read()
        if current is not None and current.get("token") == self.holder["token"]:
            storage.delete(self.uri)


class _S3Object:
    """Conditional writes of one S3 object through boto3 (pyarrow's file system has none)."""

    #: returned by :meth:`put` when the store ignored or refused the condition and wrote anyway
    UNCONDITIONAL = object()

    def __init__(self, uri: str):
        import boto3
        from botocore.config import Config

        bucket_key = uri.split("://", 1)[1]
        self.bucket, self.key = bucket_key.split("/", 1)
        self.client = boto3.client(
            "s3", endpoint_url=storage.s3_endpoint(),
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            config=Config(retries={"max_attempts": storage.S3_MAX_ATTEMPTS, "mode": "standard"}))
        self.conditional = True

    def get(self) -> tuple[bytes, str, float] | None:
        """``(body, etag, age in seconds by the store's clock)``, or None when there is no object."""
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage.StorageError(f"s3://{self.bucket}/{self.key}: cannot read the run folder's lease: {exc}") from None
        server_now = _http_date(resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date"))
        age = (server_now or time.time()) - resp["LastModified"].timestamp()
        return resp["Body"].read(), resp["ETag"], age

    def put(self, body: bytes, *, if_absent: bool, if_etag: str | None):
        """The new ETag; None when the condition failed (another writer); :attr:`UNCONDITIONAL`
        when the store does not do conditional writes (written without one)."""
        from botocore.exceptions import ClientError

        condition = {} if not self.conditional else {"IfNoneMatch": "*"} if if_absent else \
            {"IfMatch": if_etag} if if_etag else {}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if status == 501 or code == "NotImplemented":
                self.conditional = False
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)
                return self.UNCONDITIONAL
            raise storage.StorageError(f"s3://{self.bucket}/{self.key}: cannot write the run folder's lease: "
                                       f"{exc}") from None
        return resp["ETag"] if self.conditional else self.UNCONDITIONAL


def _http_date(text: str | None) -> float | None:
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(text).timestamp() if text else None
    except (TypeError, ValueError):
        return None
