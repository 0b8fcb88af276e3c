"""Fabricate tiny data set trees in the real on-disk formats (SPEC 1.2) for tests.

Image files hold a few placeholder bytes: parsers only list and validate names, they never decode.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterable, Mapping

import lmdb

#: Bytes of a minimal JPEG (SOI + EOI markers): enough for anything that does not decode.
FAKE_JPEG = b"\xff\xd8\xff\xd9"


def touch(folder: Path, names: Iterable[str], data: bytes = FAKE_JPEG) -> list[Path]:
    """Create ``folder/name`` for every name (parents too); returns the paths."""
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def market_tree(root: Path, *, train: Iterable[str] = (), gallery: Iterable[str] = (),
                query: Iterable[str] = ()) -> Path:
    """A Market-style tree: ``bounding_box_train/``, ``bounding_box_test/``, ``query/`` (each created
    only when given names)."""
    for folder, names in (("bounding_box_train", train), ("bounding_box_test", gallery), ("query", query)):
        names = list(names)
        if names:
            touch(root / folder, names)
    return root


def msmt17_tree(root: Path, version: str, lists: Mapping[str, Iterable[str]], *,
                absent: Iterable[str] = ()) -> Path:
    """An MSMT17 tree: ``lists`` maps a list file name to its lines (``"<rel path> <label>"``); every
    listed image is created under the version's train/test folder except those in ``absent``."""
    folders = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}[version]
    absent = set(absent)
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (root / folder).mkdir(exist_ok=True)
    for list_name, lines in lists.items():
        lines = list(lines)
        (root / list_name).write_text("".join(line + "\n" for line in lines))
        folder = folders[0] if list_name in ("list_train.txt", "list_val.txt") else folders[1]
        for line in lines:
            fields = line.split()
            if len(fields) == 2 and fields[0] not in absent and ".." not in fields[0]:
                touch(root / folder, [fields[0]])
    return root


def lmdb_store(root: Path, keys_content: object, values: Mapping[str, bytes]) -> Path:
    """An LMDB image store: ``keys.pkl`` = pickled ``keys_content``, ``lmdb/`` = ``values``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "keys.pkl").write_bytes(pickle.dumps(keys_content))
    env = lmdb.open(str(root / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode(), value)
    env.close()
    return root
