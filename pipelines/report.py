"""The end-of-training report: one self-contained HTML file (plots inlined as base64 PNGs), plus a terminal table.

    write_report("runs/r1/report.html", summary={"eval/mAP": 0.41, "eval/rank1": 0.63, "images_per_s": 812.0},
                 history=[{"step": 100, "loss/instance": 2.1, "eval/mAP": 0.12}, ...],
                 relabel_rounds=[{"round": 1, "splits": 40, "merges": 12, "noise_rate": 0.18, "pairwise_f": 0.81}],
                 retrieval=[{"query": q_HW3, "gallery": [g_HW3, ...], "correct": [True, False, ...]}],
                 title="DynaMix on SynthReID")
    print(print_summary_table(summary))

Sections: the summary table (whatever keys ``summary`` holds, in its order); one plot per metric group
of ``history`` (keys grouped by the prefix before "/", e.g. all ``loss/*`` terms in one plot and all
``eval/*`` in another, against ``step``; a pre-training run's kNN monitor ``knn/<set>/*``); the
relabeling rounds as a few narrow tables (what each round changed, cluster sizes, label quality
before and after) and two plots (integer columns such as splits and merges; fractional ones such as
noise rate and pairwise F; no section when ``relabel_rounds`` is None); and a retrieval strip: each
query next to its top-k gallery images, correct matches framed green, wrong ones red. Matplotlib is
used through ``Figure`` objects (Agg canvas), never pyplot, so no global backend state is touched.

Numbers read by kind (:func:`format_column`), in the tables, the terminal and the plots alike:
retrieval metrics (mAP, Rank-k, mINP) in percent, as the console and the README give them; fractions
(wait fractions, rates, precision, recall, F, purity) with 3 decimals; whole numbers (counts, steps,
versions, even when stored as floats) as integers; other numbers with one number of decimals per
column. The page fits a 1,280 px screen: tables are narrow, and each scrolls inside its own box.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dynamix_core.storage import is_remote, write_bytes_atomic

TOP_K = 10
_GREEN = (34, 170, 68)
_RED = (214, 39, 40)
_GREY = (110, 110, 110)
_FRAME_PX = 4

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin: 1.2em 0 0.4em; }
div.scroll { max-width: 100%; overflow-x: auto; } div.tall { max-height: 30em; overflow-y: auto; }
table { border-collapse: collapse; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; text-align: left; position: sticky; top: 0; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note { color: #777; }
"""

#: retrieval metrics: ``mAP``, ``rank1``, ``mINP``, and names built on them (``chance_mAP``, ``knn/x/mAP_after``)
_PERCENT = re.compile(r"(.*_)?(mAP|mINP|rank\d+)(_.*)?")
#: name parts of a value in [0, 1]
_FRACTION_PARTS = {"fraction", "frac", "rate", "precision", "recall", "purity", "accuracy", "F"}


def metric_kind(key: str) -> str:
    """How the values of metric ``key`` read: ``percent`` (retrieval metrics), ``ratio`` (``*_x_chance``),
    ``points`` (``*_points``, percentage points), ``fraction``, or ``number``."""
    name = str(key).rsplit("/", 1)[-1]
    if name.endswith("_x_chance"):
        return "ratio"
    if name.endswith("_points"):
        return "points"
    if _PERCENT.fullmatch(name):
        return "percent"
    if _FRACTION_PARTS & set(name.split("_")) or "f_score" in name:
        return "fraction"
    return "number"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def format_column(key: str, values: Sequence[Any]) -> list[str]:
    """The values of metric ``key`` (a table column, or one summary row) as a reader sees them, one
    format for the whole column: percent with 1 decimal for retrieval metrics, fractions with 3,
    ratios as ``8.5x``, percentage points signed, whole numbers as integers, other numbers with
    2 decimals below 10, 1 below 1,000, else none. Non-numbers as they are."""
    numbers = [float(v) for v in values if _is_number(v) and np.isfinite(v)]
    kind = metric_kind(key)
    if kind == "number" and all(v.is_integer() for v in numbers):
        kind = "integer"
    largest = max((abs(v) for v in numbers), default=0.0)
    decimals = 2 if largest < 10 else 1 if largest < 1000 else 0
    spec = {"percent": "{:.1f}%", "fraction": "{:.3f}", "ratio": "{:.1f}x", "points": "{:+.1f}", "integer": "{:,.0f}",
            "number": f"{{:,.{decimals}f}}"}[kind]
    scale = 100.0 if kind == "percent" else 1.0
    return [spec.format(scale * float(v)) if _is_number(v) and np.isfinite(v) else str(v) for v in values]


def format_value(key: str, value: Any) -> str:
    """One value of metric ``key`` as a reader sees it (:func:`format_column`)."""
    return format_column(key, [value])[0]


def print_summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text two-column table, aligned for the terminal (returned, not printed)."""
    rows = [(str(key), format_value(key, value)) for key, value in summary.items()]
    key_width = max([len("metric")] + [len(k) for k, _ in rows])
    value_width = max([len("value")] + [len(v) for _, v in rows])
    lines = [f"{'metric':<{key_width}}  {'value':>{value_width}}", f"{'-' * key_width}  {'-' * value_width}"]
    lines += [f"{key:<{key_width}}  {value:>{value_width}}" for key, value in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots


def _png_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img_tag(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_base64(fig)}">'


#: the training curves a person looks at, by plot; other history keys stay in MLflow and history.jsonl
PLOT_GROUPS: dict[str, tuple[str, ...]] = {
    "loss terms": ("loss/",),
    "target-domain retrieval": ("eval/mAP", "eval/rank1", "eval/rank5", "eval/mINP"),
    "kNN monitor: bare backbone (pre-training)": ("knn/",),
    "instance discrimination accuracy (pre-training)": ("pretrain/accuracy",),
    "throughput (images/s)": ("images_per_s",),
    "time fractions": ("data_wait_fraction", "label_wait_fraction", "compute_fraction"),
    "label version": ("label_version",),
}


def _history_groups(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """plot -> key -> [(step, value)] for the keys of :data:`PLOT_GROUPS` (a pattern ending in "/"
    matches every key with that prefix); missing and non-numeric values are skipped, retrieval
    metrics are in percent."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in history:
        for key, value in row.items():
            if value is None or not _is_number(value):
                continue
            scale = 100.0 if metric_kind(key) == "percent" else 1.0
            for group, patterns in PLOT_GROUPS.items():
                if any(key == p or (p.endswith("/") and key.startswith(p)) for p in patterns):
                    groups.setdefault(group, {}).setdefault(key, []).append((row["step"], scale * float(value)))
    return groups


def _history_figure(group: str, series: Mapping[str, list[tuple[float, float]]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    if all(metric_kind(key) == "percent" for key in series):
        ax.set_ylabel("%")
    ax.set_xlabel("step")
    ax.set_title(group)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


RELABEL_COUNTS = ("num_splits", "num_merges", "num_dropped", "num_clusters", "num_videos")
RELABEL_RATES = ("pair_f_score", "before_pair_f_score", "purity", "before_purity", "noise_rate")


def _relabel_figure(relabel_rounds: Sequence[Mapping[str, Any]]):
    """Two panels over rounds: integer columns (splits, merges, ...) and fractional ones (noise rate, F, ...)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [row.get("round", i + 1) for i, row in enumerate(relabel_rounds)]
    columns = list(dict.fromkeys(key for row in relabel_rounds for key in row if key != "round"))
    counts = [k for k in RELABEL_COUNTS if k in columns]
    rates = [k for k in RELABEL_RATES if k in columns]
    fig = Figure(figsize=(10, 3.4))
    for position, (keys, title) in enumerate(((counts, "counts per round"), (rates, "rates per round")), start=1):
        ax = fig.add_subplot(1, 2, position)
        for key in keys:
            ax.plot(x, [row[key] for row in relabel_rounds], marker="o", markersize=3, label=key)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    return fig


def _framed(img_HW3: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The image inside a solid frame of ``colour`` (uint8 HxWx3)."""
    out = np.empty((img_HW3.shape[0] + 2 * _FRAME_PX, img_HW3.shape[1] + 2 * _FRAME_PX, 3), np.uint8)
    out[:] = colour
    out[_FRAME_PX:-_FRAME_PX, _FRAME_PX:-_FRAME_PX] = img_HW3
    return out


def _check_retrieval(retrieval: Sequence[Mapping[str, Any]]) -> None:
    for i, row in enumerate(retrieval):
        if len(row["gallery"]) != len(row["correct"]):
            raise ValueError(f"retrieval row {i}: {len(row['gallery'])} gallery images but "
                             f"{len(row['correct'])} 'correct' flags; give one flag per gallery image")
        for name, img in [("query", row["query"])] + [(f"gallery[{j}]", g) for j, g in enumerate(row["gallery"])]:
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"retrieval row {i} {name}: expected an HxWx3 uint8 image, "
                                 f"got shape {img.shape} dtype {img.dtype}")


def retrieval_figure(retrieval: Sequence[Mapping[str, Any]], top_k: int = TOP_K):
    """One row per query: the query (grey frame), then its first ``top_k`` gallery images framed green
    (correct match) or red (wrong)."""
    from matplotlib.figure import Figure

    _check_retrieval(retrieval)
    num_cols = 1 + min(top_k, max(len(row["gallery"]) for row in retrieval))
    fig = Figure(figsize=(1.05 * num_cols, 2.2 * len(retrieval)))
    axes = fig.subplots(len(retrieval), num_cols, squeeze=False)
    for row, ax_row in zip(retrieval, axes):
        ax_row[0].imshow(_framed(np.asarray(row["query"]), _GREY))
        ax_row[0].set_title("query", fontsize=9)
        ranked = list(zip(row["gallery"], row["correct"]))[:top_k]
        for rank, (ax, (img, correct)) in enumerate(zip(ax_row[1:], ranked), start=1):
            ax.imshow(_framed(np.asarray(img), _GREEN if correct else _RED))
            ax.set_title(f"{rank}", fontsize=9, color="#228844" if correct else "#d62728")
        for ax in ax_row:
            ax.axis("off")
    fig.subplots_adjust(wspace=0.08, hspace=0.25)
    return fig


def retrieval_strip_png(retrieval: Sequence[Mapping[str, Any]], top_k: int = TOP_K) -> bytes:
    """The retrieval strip alone, as PNG bytes (for a quick look or an MLflow artifact)."""
    buffer = io.BytesIO()
    retrieval_figure(retrieval, top_k).savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- html


def _cell(text: str, numeric: bool) -> str:
    return f'<td{" class=num" if numeric else ""}>{html.escape(text)}</td>'


def _html_table(head: Sequence[str], body: Sequence[Sequence[str]], tall: bool = False) -> str:
    """A table (``body``: rows of ready ``<td>`` cells) in a box of its own that scrolls sideways
    (and, ``tall``, down) instead of widening the page; header names may break after "_"."""
    heads = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in head)
    rows = "".join(f"<tr>{''.join(cells)}</tr>" for cells in body)
    return f'<div class="scroll{" tall" if tall else ""}"><table><tr>{heads}</tr>{rows}</table></div>'


def _summary_table(summary: Mapping[str, Any]) -> str:
    body = [[_cell(str(key), False), _cell(format_value(key, value), _is_number(value))] for key, value in summary.items()]
    return _html_table(["metric", "value"], body)


#: the relabeling statistics, by table (each led by the round's ``round`` or ``version``); columns of
#: no group follow in a table of their own
RELABEL_TABLES: dict[str, tuple[str, ...]] = {
    "what each round changed": ("step", "weights_step", "num_videos", "num_images", "num_clusters", "num_splits",
                                "num_merges", "num_dropped", "noise_rate", "round_seconds"),
    "cluster sizes": ("size_mean", "size_median", "size_min", "size_max"),
    "label quality against the ground truth (before this round, after it)": (
        "before_pair_precision", "pair_precision", "before_pair_recall", "pair_recall", "before_pair_f_score",
        "pair_f_score", "before_purity", "purity", "before_fragmentation", "fragmentation"),
}


def _relabel_tables(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rounds for key in row))
    lead = [c for c in ("round", "version") if c in columns][:1]
    grouped = {name: [c for c in keys if c in columns] for name, keys in RELABEL_TABLES.items()}
    rest = [c for c in columns if c not in lead and not any(c in keys for keys in grouped.values())]
    if rest:
        grouped["other statistics"] = rest
    parts = []
    for name, keys in grouped.items():
        if not keys:
            continue
        shown = lead + keys
        cells = {c: format_column(c, [row.get(c, "") for row in rounds]) for c in shown}
        body = [[_cell(cells[c][i], _is_number(row.get(c))) for c in shown] for i, row in enumerate(rounds)]
        parts += [f"<h3>{html.escape(name)}</h3>", _html_table(shown, body, tall=len(rounds) > 15)]
    return parts


def write_report(out_html: str | Path, *, summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                 relabel_rounds: Sequence[Mapping[str, Any]] | None, retrieval: Sequence[Mapping[str, Any]] | None,
                 title: str = "DynaMix training report") -> str | Path:
    """Write the report (atomically: temp file + os.replace; on an object store one upload);
    returns its path, or ``out_html`` itself when that is a URI (``s3://bucket/runs/r1/report.html``)."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", _summary_table(summary)]

    parts.append("<h2>Training curves</h2>")
    groups = _history_groups(history)
    parts += [_img_tag(_history_figure(group, series), f"{group} over steps") for group, series in groups.items()]
    if not groups:
        parts.append('<p class="note">No training history was recorded.</p>')

    if relabel_rounds is not None:  # None: a run without a labeling pool (pre-training), no section
        parts.append("<h2>Relabeling rounds</h2>")
        if relabel_rounds:
            parts += [*_relabel_tables(relabel_rounds), _img_tag(_relabel_figure(relabel_rounds), "relabel statistics")]
        else:
            parts.append('<p class="note">No relabeling round ran.</p>')

    if retrieval:
        parts += ["<h2>Retrieval examples</h2>",
                  f'<p class="note">Each query, then its top-{TOP_K} gallery images: '
                  "green frame = same identity, red = wrong.</p>",
                  _img_tag(retrieval_figure(retrieval), "retrieval examples")]

    document = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(parts) + "\n</body></html>\n")
    if is_remote(out_html):
        write_bytes_atomic(out_html, document.encode("utf-8"))
        return str(out_html)
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(out_html.name + ".tmp")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, out_html)
    return out_html
