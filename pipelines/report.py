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
relabeling rounds as a table and two plots (integer columns such as splits and merges; fractional
ones such as noise rate and pairwise F; no section when ``relabel_rounds`` is None); and a
retrieval strip: each query next to its top-k gallery images, correct matches framed green, wrong
ones red. Matplotlib is used through ``Figure`` objects (Agg canvas), never pyplot, so no global
backend state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import os
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
table { border-collapse: collapse; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; text-align: left; } img { max-width: 100%; display: block; margin: 0.5em 0; }
p.note { color: #777; }
"""


def format_value(value: Any) -> str:
    """How a number reads in the report and in the terminal: 4 decimals below 10, else 1, ints as they are."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"


def print_summary_table(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text two-column table, aligned for the terminal (returned, not printed)."""
    rows = [(str(key), format_value(value)) for key, value in summary.items()]
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
    matches every key with that prefix); missing and non-numeric values are skipped."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in history:
        for key, value in row.items():
            if value is None or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            for group, patterns in PLOT_GROUPS.items():
                if any(key == p or (p.endswith("/") and key.startswith(p)) for p in patterns):
                    groups.setdefault(group, {}).setdefault(key, []).append((row["step"], float(value)))
    return groups


def _history_figure(group: str, series: Mapping[str, list[tuple[float, float]]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
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


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            cells.append(f'<td{" class=num" if numeric else ""}>{html.escape(format_value(value))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(out_html: str | Path, *, summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                 relabel_rounds: Sequence[Mapping[str, Any]] | None, retrieval: Sequence[Mapping[str, Any]] | None,
                 title: str = "DynaMix training report") -> str | Path:
    """Write the report (atomically: temp file + os.replace; on an object store one upload);
    returns its path, or ``out_html`` itself when that is a URI (``s3://bucket/runs/r1/report.html``)."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>",
             _html_table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"])]

    parts.append("<h2>Training curves</h2>")
    groups = _history_groups(history)
    parts += [_img_tag(_history_figure(group, series), f"{group} over steps") for group, series in groups.items()]
    if not groups:
        parts.append('<p class="note">No training history was recorded.</p>')

    if relabel_rounds is not None:  # None: a run without a labeling pool (pre-training), no section
        parts.append("<h2>Relabeling rounds</h2>")
        if relabel_rounds:
            columns = list(dict.fromkeys(key for row in relabel_rounds for key in row))
            parts += [_html_table(relabel_rounds, columns), _img_tag(_relabel_figure(relabel_rounds), "relabel statistics")]
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
