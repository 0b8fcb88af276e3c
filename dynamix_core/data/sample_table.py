"""Parsed samples as one Arrow table: the columnar form of :class:`RawSample` that ingest plans from.

A list of :class:`RawSample` costs about 1 KB per image in Python objects (the sample, its
:class:`ImageRef`, their strings); LUPerson-scale sources have 10M+ images. The LMDB parsers
therefore build this table batch by batch, and :func:`pipelines.ingest.plan_shards` works on it with
Arrow and numpy: per image it holds the strings that differ per image (key, LMDB member, tracklet)
and small integer codes for the rest (dataset, split, camera, video, container, ... are
dictionary-encoded).

    table = samples_to_table(samples)            # list[RawSample] -> table
    builder = SampleTableBuilder(); builder.add({...}); table = builder.finish()   # batch by batch
    samples = table_to_samples(table)            # and back
    codes, values = column_codes(table.column("source_video"))   # per-row int codes, -1 = null
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamix_core.data.records import IdentityMap, IdentityMaps, ImageRef, InputReport, RawSample

_DICT = pa.dictionary(pa.int32(), pa.string())
#: one parsed image per row; repeated strings are dictionary-encoded
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("dataset", _DICT), ("split", _DICT), ("source_pid", _DICT),
    ("source_camid", _DICT), ("container", _DICT), ("member", pa.string()), ("ext", _DICT),
    ("domain", _DICT), ("source_video", _DICT), ("source_tracklet", pa.string()), ("frame", pa.int64()),
])


class Same:
    """A column whose every row holds ``value`` (no per-row list is built for it)."""

    __slots__ = ("value",)

    def __init__(self, value: object):
        self.value = value


class SampleTableBuilder:
    """A :data:`SAMPLE_SCHEMA` table built batch by batch. Each dictionary column keeps one growing
    dictionary (value -> code) for all batches, so batches are encoded straight into int32 codes (no
    plain string array per batch) and the finished table needs no dictionary unification (no copy)."""

    def __init__(self) -> None:
        self._codes: dict[str, dict] = {f.name: {} for f in SAMPLE_SCHEMA if f.type == _DICT}
        self._chunks: dict[str, list] = {f.name: [] for f in SAMPLE_SCHEMA}

    def add(self, columns: dict[str, "Sequence | Same"]) -> None:
        """One batch: per column a sequence (``None`` = null) or a :class:`Same`."""
        n = len(columns["key"])
        for f in SAMPLE_SCHEMA:
            values = columns[f.name]
            if f.type != _DICT:
                values = [values.value] * n if isinstance(values, Same) else values
                self._chunks[f.name].append(pa.array(values, f.type))
                continue
            codes = self._codes[f.name]
            if isinstance(values, Same):
                code = -1 if values.value is None else codes.setdefault(values.value, len(codes))
                indices = np.full(n, code, np.int32)
            else:
                indices = np.fromiter((-1 if v is None else codes.setdefault(v, len(codes)) for v in values),
                                      np.int32, count=n)
            self._chunks[f.name].append(indices)

    def finish(self) -> pa.Table:
        columns = []
        for f in SAMPLE_SCHEMA:
            chunks = self._chunks[f.name]
            if f.type == _DICT:
                dictionary = pa.array(list(self._codes[f.name]), pa.string())
                chunks = [pa.DictionaryArray.from_arrays(pa.array(c, mask=c < 0), dictionary) for c in chunks]
            columns.append(pa.chunked_array(chunks, f.type))
        self._chunks = {name: [] for name in self._chunks}
        return pa.table(columns, schema=SAMPLE_SCHEMA)


def samples_to_table(samples: Iterable[RawSample], batch: int = 1 << 16) -> pa.Table:
    """``samples`` as a :data:`SAMPLE_SCHEMA` table, converted ``batch`` samples at a time."""
    builder, chunk = SampleTableBuilder(), []

    def flush() -> None:
        builder.add({
            "key": [s.key for s in chunk], "dataset": [s.dataset for s in chunk],
            "split": [s.split for s in chunk], "source_pid": [s.source_pid for s in chunk],
            "source_camid": [s.source_camid for s in chunk], "container": [s.image.container for s in chunk],
            "member": [s.image.member for s in chunk], "ext": [s.image.ext for s in chunk],
            "domain": [s.domain for s in chunk], "source_video": [s.source_video for s in chunk],
            "source_tracklet": [s.source_tracklet for s in chunk], "frame": [s.frame for s in chunk],
        })
        chunk.clear()

    for s in samples:
        chunk.append(s)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return builder.finish()


def table_to_samples(table: pa.Table, batch: int = 1 << 16) -> list[RawSample]:
    """The rows of a :data:`SAMPLE_SCHEMA` table as :class:`RawSample` objects, in order."""
    samples = []
    for start in range(0, table.num_rows, batch):
        for r in table.slice(start, batch).to_pylist():
            samples.append(RawSample(
                dataset=r["dataset"], split=r["split"], source_pid=r["source_pid"], source_camid=r["source_camid"],
                image=ImageRef(r["container"], r["member"], r["ext"]), key=r["key"], domain=r["domain"],
                source_video=r["source_video"], source_tracklet=r["source_tracklet"], frame=r["frame"],
            ))
    return samples


def where(container: str, member: str | None) -> str:
    """Where an image lives, for reports: the file path, or ``<lmdb dir>[<key>]``."""
    return container if member is None else f"{container}[{member}]"


def sort_unique(table: pa.Table, report: InputReport) -> pa.Table:
    """``table`` sorted by key; of several rows with one key, the one whose image location sorts first
    is kept and the others are rejected ("duplicate key"), whatever the input order (the columnar
    :func:`dynamix_core.data.parsers._common.unique_sorted`)."""
    order = pc.sort_indices(table, [("key", "ascending")])
    if not np.array_equal(order.to_numpy(), np.arange(table.num_rows)):  # sorted already (as stores often are): no copy
        table = table.take(order)
    del order
    if table.num_rows < 2:
        return table
    keys = table.column("key")
    same = pc.equal(keys.slice(1), keys.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return table
    dup = np.flatnonzero(same) + 1  # rows equal to their predecessor
    first = np.unique(np.concatenate([dup - 1, dup]))  # every row of a run of equal keys
    rows = table.select(["key", "container", "member"]).take(pa.array(first)).to_pylist()
    runs: dict[str, list[tuple[str, int]]] = {}  # key -> (location, row) of its rows, keys in sorted order
    for index, r in zip(first.tolist(), rows):
        runs.setdefault(r["key"], []).append((where(r["container"], r["member"]), index))
    drop = []
    for key, run in runs.items():
        run.sort()
        for location, row in run[1:]:
            report.reject(location, f"duplicate key: {key} (also from {run[0][0]})")
            drop.append(row)
    keep = np.ones(table.num_rows, bool)
    keep[drop] = False
    return table.filter(pa.array(keep))


def column_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """Per row an int64 code into ``values`` (the distinct non-null values), -1 for null."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_dictionary(column.type):
        if column.num_chunks == 0:
            return np.zeros(0, np.int64), []
        first = column.chunk(0).dictionary
        if not all(c.dictionary is first or c.dictionary.equals(first) for c in column.chunks):
            column = pa.table({"c": column}).unify_dictionaries().column("c")
        values = column.chunk(0).dictionary.to_pylist()
        codes = [c.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) for c in column.chunks]
        return np.concatenate(codes), values
    uniques = pc.unique(pc.drop_null(column))
    codes = pc.index_in(column, value_set=uniques).fill_null(-1)
    return codes.to_numpy().astype(np.int64), uniques.to_pylist()


def combined_codes(columns: Sequence[pa.ChunkedArray]) -> tuple[np.ndarray, list[tuple]]:
    """Per row a dense code of the tuple of ``columns``' values (-1 where any is null) and the
    distinct tuples, sorted by code."""
    codes, values = column_codes(columns[0])
    tuples = [(v,) for v in values]
    for column in columns[1:]:
        more, more_values = column_codes(column)
        width = max(len(more_values), 1)
        both = np.where((codes >= 0) & (more >= 0), codes * width + more, -1)
        present, dense = np.unique(both, return_inverse=True)
        offset = 1 if present.size and present[0] == -1 else 0
        codes = dense.astype(np.int64) - offset
        present = present[offset:]
        tuples = [tuples[int(p) // width] + (more_values[int(p) % width],) for p in present]
    return codes, tuples


def fill_null(column: pa.ChunkedArray, value: str) -> pa.ChunkedArray:
    """``column`` with its nulls replaced by ``value``. For a dictionary column the chunks keep sharing
    one dictionary (``pc.fill_null`` gives every chunk its own copy: ~1 GB for 150 chunks of a 430K-entry
    dictionary)."""
    if not pa.types.is_dictionary(column.type) or column.null_count == 0:
        return pc.fill_null(column, value) if column.null_count else column
    codes, values = column_codes(column)
    if value in values:
        filler = values.index(value)
    else:
        values, filler = values + [value], len(values)
    dictionary = pa.array(values, pa.string())
    chunks, start = [], 0
    for chunk in column.chunks:
        part = codes[start:start + len(chunk)]
        chunks.append(pa.DictionaryArray.from_arrays(pa.array(np.where(part < 0, filler, part).astype(np.int32)),
                                                     dictionary))
        start += len(chunk)
    return pa.chunked_array(chunks, column.type)


def ids_by_row(columns: Sequence[pa.ChunkedArray], lookup: Callable[[tuple], int]) -> np.ndarray:
    """``lookup(values)`` for each row's tuple of ``columns`` values (int64, -1 where any is null),
    computed once per distinct tuple."""
    codes, tuples = combined_codes(columns)
    table = np.array([lookup(t) for t in tuples] + [-1], np.int64)  # code -1 -> the last entry
    return table[codes]


def identity_maps(table: pa.Table, fixed: dict | None = None) -> IdentityMaps:
    """:meth:`IdentityMaps.build` of the samples in ``table``, from their distinct id pairs."""
    fixed = fixed or {}

    def pairs(*names: str) -> list[tuple]:
        return combined_codes([table.column(n) for n in names])[1]

    return IdentityMaps(
        pid=IdentityMap(pairs("dataset", "source_pid"), fixed.get("pid")),
        camid=IdentityMap(pairs("dataset", "source_camid"), fixed.get("camid")),
        video=IdentityMap(pairs("dataset", "source_video"), fixed.get("video")),
        tracklet=IdentityMap((ds, f"{video}/{trk}") for ds, video, trk in
                             pairs("dataset", "source_video", "source_tracklet")),
    )
