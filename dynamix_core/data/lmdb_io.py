"""Read-only access to LMDB image stores (LUPerson / LUPerson-NL layout), one cached handle per path."""

from __future__ import annotations

import os
from functools import lru_cache

import lmdb


@lru_cache(maxsize=16)
def _open(path: str, pid: int) -> lmdb.Environment:
    # keyed on the process id too: an LMDB handle must not cross a fork
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=os.path.isdir(path))


def open_lmdb(path: str) -> lmdb.Environment:
    return _open(str(path), os.getpid())


def read_lmdb_value(path: str, key: str) -> bytes:
    env = open_lmdb(path)
    with env.begin(buffers=False) as txn:
        value = txn.get(key.encode())
    if value is None:
        raise KeyError(f"{path}: LMDB has no key {key!r}")
    return bytes(value)
