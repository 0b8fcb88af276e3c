"""The chunked keys.pkl reader against pickle itself: whatever it reads equals ``pickle.load``, and
whatever it cannot read it refuses (the parsers then unpickle the file whole)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dynamix_core.data import pickle_stream
from dynamix_core.data.pickle_stream import PickleLists, UnsupportedPickle


def streamed(path, chunk=7):
    lists = PickleLists(path, chunk=chunk)
    out: dict = {}
    for name, items in lists:
        assert 0 < len(items) <= chunk + 1000  # a chunk, plus at most one pickler batch
        out.setdefault(name, []).extend(items)
    return lists, out


def random_key(rng) -> str:
    n = int(rng.choice([3, 23, 300]))  # 300 > 255: BINUNICODE instead of SHORT_BINUNICODE
    alphabet = list("0123456789_abcXYZ") + ["é", "人"]
    return "".join(rng.choice(alphabet, n))


def random_int(rng) -> int:
    return int(rng.choice([rng.integers(0, 256), rng.integers(256, 65536), rng.integers(-2**31, 2**31),
                           rng.integers(2**40, 2**62), -int(rng.integers(2**40, 2**62)) * 10**3]))


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", [0, 1, 2, 999, 1000, 1001, 2500])
def test_lists_and_dicts_of_lists_read_as_pickle_reads_them(tmp_path, protocol, length):
    rng = np.random.default_rng(length * 10 + protocol)
    keys = [random_key(rng) for _ in range(length)]
    pids = [random_int(rng) for _ in range(length)]
    for content in (keys, {"keys": keys, "pids": pids}, {"pids": pids, "keys": keys, "version": 3, "note": "x"}):
        path = tmp_path / "keys.pkl"
        path.write_bytes(pickle.dumps(content, protocol=protocol))
        if protocol == 1 and isinstance(content, dict) and any(not -2**31 <= p < 2**31 for p in pids):
            with pytest.raises(UnsupportedPickle):  # protocol 1 writes such ints as text (LONG)
                streamed(path)
            continue
        lists, out = streamed(path)
        if isinstance(content, list):
            assert lists.top == "list" and out.get(None, []) == content
        else:
            assert lists.top == "dict"
            assert {k: out.get(k, []) for k in ("keys", "pids")} == {"keys": keys, "pids": pids}
            assert set(out) <= {"keys", "pids"}


def test_a_file_larger_than_the_read_block(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_stream, "_BLOCK", 64)  # strings and ints straddle every block edge
    rng = np.random.default_rng(0)
    content = {"keys": [random_key(rng) for _ in range(3000)], "pids": [random_int(rng) for _ in range(3000)]}
    (tmp_path / "k.pkl").write_bytes(pickle.dumps(content, protocol=4))
    assert streamed(tmp_path / "k.pkl", chunk=500)[1] == content


@pytest.mark.parametrize("content, protocol", [
    (["a", None, "b"], 4),  # None
    (["a", 1.5], 4),  # float
    ([("a", 1)], 4),  # tuple
    ([["a"], ["b"]], 4),  # nested lists
    ({"keys": {"a": 1}}, 4),  # nested dict
    ("just a string", 4),
    (["a", "b"], 0),  # text protocol
    ({"keys": ["a", "b"], "pids": [True, 2]}, 4),  # bools are not ints here
])
def test_anything_else_is_refused(tmp_path, content, protocol):
    path = tmp_path / "k.pkl"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    with pytest.raises(UnsupportedPickle):
        streamed(path)


def test_an_object_referenced_twice_and_a_truncated_file_are_refused(tmp_path):
    shared = "00001_000001_0000001_00"
    path = tmp_path / "k.pkl"
    path.write_bytes(pickle.dumps([shared, shared], protocol=4))  # the second is a memo reference
    with pytest.raises(UnsupportedPickle):
        streamed(path)
    same = ["a", "b"]
    path.write_bytes(pickle.dumps({"keys": same, "other": same}, protocol=4))
    with pytest.raises(UnsupportedPickle):
        streamed(path)
    path.write_bytes(pickle.dumps(["a" * 10] * 3 + ["b"], protocol=4)[:-5])
    with pytest.raises(UnsupportedPickle):
        streamed(path)
