"""Dataset parsers for the real on-disk formats (SPEC 1.2).

    report = InputReport(strict=False)
    samples = parse_source("market1501", "/data/Market-1501-v15.09.15", report)
    print(report.summary())

A parser lists and validates names, list files and keys; it never decodes an image (ingest does).
It returns :class:`RawSample` rows sorted by key, with unique dot-free keys, carrying the dataset's
own identity and camera names; bad input is rejected into the :class:`InputReport` (or raises in
strict mode) and a root without the expected folders/files raises :class:`BadInputError`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import pyarrow as pa

from dynamix_core.data.parsers._common import unique_sorted
from dynamix_core.data.parsers.detect import detect_format, detect_format_why
from dynamix_core.data.parsers.luperson import parse_luperson, parse_luperson_nl
from dynamix_core.data.parsers.manifest import parse_manifest
from dynamix_core.data.parsers.market import MARKET1501, parse_cuhk03np, parse_dukemtmc, parse_market1501
from dynamix_core.data.parsers.msmt17 import parse_msmt17
from dynamix_core.data.parsers.randperson import parse_randperson
from dynamix_core.data.records import BadInputError, InputReport, RawSample
from dynamix_core.data.sample_table import samples_to_table, sort_unique, table_to_samples

#: ``parser(root: Path, report: InputReport, *, dataset: str, **options) -> list[RawSample] | pa.Table``
#: (the LMDB stores, LUPerson-sized, return a :data:`~dynamix_core.data.sample_table.SAMPLE_SCHEMA` table)
ParserFn = Callable[..., "list[RawSample] | pa.Table"]

#: format name -> parser. The format name is also the default dataset name.
FORMATS: dict[str, ParserFn] = {
    "market1501": parse_market1501,
    "dukemtmc": parse_dukemtmc,
    "msmt17": parse_msmt17,
    "cuhk03np": parse_cuhk03np,
    "luperson": parse_luperson,
    "luperson_nl": parse_luperson_nl,
    "randperson": parse_randperson,
    "manifest": parse_manifest,
}

#: format -> the source pid its data sets give distractors: images of no identity (``.cls`` -1)
DISTRACTOR_PIDS: dict[str, str] = {"market1501": MARKET1501.distractor_pid}

__all__ = ["DISTRACTOR_PIDS", "FORMATS", "ParserFn", "detect_format", "detect_format_why", "format_options", "parse_source",
           "parse_source_table"]


def format_options(fmt: str) -> list[str]:
    """The option names ``fmt``'s parser accepts (e.g. ``["variant"]`` for cuhk03np)."""
    params = inspect.signature(FORMATS[fmt]).parameters
    return [name for name in params if name not in ("root", "report", "dataset")]


def parse_source(fmt: str, root: str | Path, report: InputReport, *, dataset: str | None = None,
                 **options) -> list[RawSample]:
    """The samples of the ``fmt`` data set at ``root``, sorted by key.

    ``dataset`` names the set (default: the format name); ``options`` are the format's own
    (cuhk03np ``variant``, msmt17 ``version``, manifest ``domain``). Raises :class:`BadInputError`
    when ``root`` lacks the expected layout or no usable image is left."""
    samples = _parse(fmt, root, report, dataset, options)
    if isinstance(samples, pa.Table):
        samples = table_to_samples(samples)
    return samples


def parse_source_table(fmt: str, root: str | Path, report: InputReport, *, dataset: str | None = None,
                       **options) -> pa.Table:
    """:func:`parse_source` as a :data:`~dynamix_core.data.sample_table.SAMPLE_SCHEMA` table: what
    ingest plans from (a Python object per image would cost ~10x the memory at LUPerson scale)."""
    samples = _parse(fmt, root, report, dataset, options)
    return samples if isinstance(samples, pa.Table) else samples_to_table(samples)


def _parse(fmt: str, root: str | Path, report: InputReport, dataset: str | None,
           options: dict) -> "list[RawSample] | pa.Table":
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)} "
                         f"(detect_format(root) recognises them)")
    unknown = sorted(set(options) - set(format_options(fmt)))
    if unknown:
        raise ValueError(f"format {fmt!r} has no option(s) {unknown}; its options are {format_options(fmt)}")
    root = Path(root)
    parsed = FORMATS[fmt](root, report, dataset=dataset or fmt, **options)
    samples = sort_unique(parsed, report) if isinstance(parsed, pa.Table) else unique_sorted(parsed, report)
    if len(samples) == 0:
        raise BadInputError(f"{root}: no usable image found as {fmt}\n{report.summary(limit=5)}")
    return samples
