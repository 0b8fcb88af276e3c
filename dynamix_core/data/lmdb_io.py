"""Read-only access to LMDB image stores (LUPerson / LUPerson-NL layout), one cached handle per path."""

from __future__ import annotations

import os

import lmdb

#: (path, process id) -> handle; keyed on the process id too: an LMDB handle must not cross a fork
_handles: dict[tuple[str, int], lmdb.Environment] = {}


def open_lmdb(path: str) -> lmdb.Environment:
    key = (str(path), os.getpid())
    env = _handles.get(key)
    if env is None:
        env = _handles[key] = lmdb.open(key[0], readonly=True, lock=False, readahead=False, meminit=False,
                                        subdir=os.path.isdir(key[0]))
    return env


def close_lmdb_handles() -> None:
    """Close this process's cached handles. LMDB allows one handle per store and process, so a store
    that is rebuilt in place (a growing source) must be reopened."""
    for key in [k for k in _handles if k[1] == os.getpid()]:
        _handles.pop(key).close()


def read_lmdb_value(path: str, key: str) -> bytes:
    env = open_lmdb(path)
    with env.begin(buffers=False) as txn:
        value = txn.get(key.encode())
    if value is None:
        raise KeyError(f"{path}: LMDB has no key {key!r}")
    return bytes(value)
