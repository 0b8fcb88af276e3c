"""The HTML training report and the terminal summary table."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from pipelines.report import print_summary_table, retrieval_strip_png, write_report

#: a demo summary (the keys ``dynamix demo`` writes), and the values as a reader should see them, by hand:
#: retrieval metrics in percent (as the console and the README give them), fractions with 3 decimals,
#: counts as integers even when stored as floats, ratios with an "x"
SUMMARY = {"mAP": 0.3412, "mINP": 0.0712, "rank1": 0.3348, "rank5": 0.5813, "images_per_s": 41.37,
           "data_wait_fraction": 0.0312, "label_wait_fraction": 0.0004, "steps": 12000.0, "chance_mAP": 0.0402,
           "colour_hist_mAP": 0.2571, "mAP_x_chance": 8.49, "mAP_minus_colour_points": 8.41, "label_F_before": 0.8951,
           "label_purity_after": 0.9733, "label_versions": 62.0, "wall_minutes": 11.43, "recipe": "dynamix"}
SUMMARY_SHOWN = {"mAP": "34.1%", "mINP": "7.1%", "rank1": "33.5%", "rank5": "58.1%", "images_per_s": "41.4",
                 "data_wait_fraction": "0.031", "label_wait_fraction": "0.000", "steps": "12,000", "chance_mAP": "4.0%",
                 "colour_hist_mAP": "25.7%", "mAP_x_chance": "8.5x", "mAP_minus_colour_points": "+8.4",
                 "label_F_before": "0.895", "label_purity_after": "0.973", "label_versions": "62", "wall_minutes": "11.4",
                 "recipe": "dynamix"}
RELABEL = [{"round": 1, "num_splits": 40, "num_merges": 12, "noise_rate": 0.18, "pair_f_score": 0.81},
           {"round": 2, "num_splits": 25, "num_merges": 9, "noise_rate": 0.12, "pair_f_score": 0.86}]


def _labeling_reports(rounds: int = 60) -> list[dict]:
    """Rounds as the labeling coordinator reports them (services/labeling_pool.py): the quality
    module's statistics of random labelings, counts stored as floats, 25 columns."""
    from dynamix_core.labeling import quality

    rng = np.random.default_rng(0)
    out = []
    for version in range(1, rounds + 1):
        truth = rng.integers(0, 50, 2000)
        after = np.where(rng.random(2000) < 0.9, truth, rng.integers(0, 60, 2000))
        after[rng.random(2000) < 0.05] = -1
        before = np.where(rng.random(2000) < 0.8, truth, rng.integers(0, 60, 2000))
        row = {**quality.cluster_stats(after), "num_splits": float(rng.integers(0, 40)),
               "num_merges": float(rng.integers(0, 20)), "num_dropped": float(rng.integers(0, 3000))}
        row |= quality.pairwise_scores(after, truth)
        row |= {f"before_{k}": v for k, v in quality.pairwise_scores(before, truth).items()}
        row |= {"version": float(version), "step": float(80 + 10 * version), "weights_step": float(70 + 10 * version),
                "num_videos": 32.0, "num_images": 2000.0, "round_seconds": float(rng.uniform(1, 30))}
        out.append(row)
    return out


def _person(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    """A 128x64 'person': a coloured torso and dark legs on a noisy background."""
    img = rng.integers(150, 230, size=(128, 64, 3), dtype=np.uint8)
    img[20:70, 14:50] = colour
    img[70:120, 18:46] = (40, 40, 60)
    img[4:20, 24:40] = (220, 180, 150)
    return img


def _retrieval(num_queries: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 90, 200), (40, 160, 60), (230, 200, 40), (140, 60, 170)]
    # 10 correct matches out of 30: lopsided on purpose, so swapped frame colours would show in the pixel counts
    flags = ["1101000000", "0100110001", "1000010100"]
    rows = []
    for q in range(num_queries):
        correct = [c == "1" for c in flags[q]]
        gallery = [_person(rng, colours[q] if ok else colours[(q + 1 + j % 3) % len(colours)])
                   for j, ok in enumerate(correct)]
        rows.append({"query": _person(rng, colours[q]), "gallery": gallery, "correct": correct})
    return rows


def _history() -> list[dict]:
    rows = []
    for step in range(0, 1000, 50):
        row = {"step": step, "loss/instance": 3.0 * np.exp(-step / 400), "loss/centroid": 2.0 * np.exp(-step / 600)}
        if step % 200 == 0:
            row |= {"eval/mAP": 0.1 + step / 3000, "eval/rank1": 0.2 + step / 2500}
        rows.append(row)
    return rows


def test_report_holds_the_tables_and_one_image_per_plot(tmp_path):
    out = write_report(tmp_path / "sub" / "report.html", summary=SUMMARY, history=_history(),
                       relabel_rounds=RELABEL, retrieval=_retrieval(), title="SynthReID <smoke>")
    text = out.read_text()
    assert "<title>SynthReID &lt;smoke&gt;</title>" in text
    for key, shown in SUMMARY_SHOWN.items():
        assert f"<td>{key}</td><td{' class=num' if key != 'recipe' else ''}>{shown}</td>" in text
    for shown in ("40", "9", "0.180", "0.860"):
        assert f"<td class=num>{shown}</td>" in text

    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', text)
    # loss group, eval group, relabel statistics, retrieval strip
    assert [alt for alt, _ in images] == ["loss terms over steps", "target-domain retrieval over steps", "relabel statistics",
                                          "retrieval examples"]
    assert text.count("<img ") == 4
    for _, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as png:
            assert png.format == "PNG" and png.width > 300
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_without_history_relabel_or_retrieval(tmp_path):
    text = write_report(tmp_path / "r.html", summary={"steps": 0}, history=[], relabel_rounds=[],
                        retrieval=None).read_text()
    assert "<img " not in text
    assert "No training history" in text and "No relabeling round" in text and "Retrieval" not in text


def test_summary_table_is_aligned():
    lines = print_summary_table(SUMMARY).splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert set(lines[1]) == {"-", " "}
    assert [line.split() for line in lines[2:]] == [[k, v] for k, v in SUMMARY_SHOWN.items()]
    assert len({len(line) for line in lines}) == 1  # values right-aligned to one column
    key_width = max(len(k) for k in SUMMARY)
    assert all(line[key_width:key_width + 2] == "  " for line in lines)


def test_retrieval_strip_frames_correct_green_and_wrong_red():
    retrieval = _retrieval()
    png_bytes = retrieval_strip_png(retrieval)
    with open("/tmp/report_strip.png", "wb") as f:  # for a human look
        f.write(png_bytes)
    with Image.open(io.BytesIO(png_bytes)) as png:
        rgb = np.asarray(png.convert("RGB")).astype(int)
    # frames are solid colour: pure frame-green / frame-red pixels occur iff some match is correct / wrong
    num_green = np.all(rgb == (34, 170, 68), axis=-1).sum()
    num_red = np.all(rgb == (214, 39, 40), axis=-1).sum()
    num_correct = sum(sum(r["correct"]) for r in retrieval)
    assert num_correct == 10 and num_green > 0 and num_red > 0
    # every frame covers the same area, so the green:red pixel ratio follows the correct:wrong count ratio
    assert 0.5 < (num_green / num_correct) / (num_red / (30 - num_correct)) < 2.0

    retrieval[1]["correct"] = retrieval[1]["correct"][:-1]
    with pytest.raises(ValueError, match="retrieval row 1: 10 gallery images but 9"):
        retrieval_strip_png(retrieval)


def test_pretraining_report_plots_the_knn_monitor_and_has_no_relabel_section(tmp_path):
    history = [{"step": 0, "knn/synth_target/mAP": 0.03, "knn/synth_target/rank1": 0.05}]
    history += [{"step": s, "loss/contrastive": 2.5 - s / 100, "pretrain/accuracy": s / 100} for s in (10, 20, 30)]
    history[-1] |= {"knn/synth_target/mAP": 0.09, "knn/synth_target/rank1": 0.15}
    text = write_report(tmp_path / "r.html", summary={"knn/synth_target/mAP_after": 0.09}, history=history,
                        relabel_rounds=None, retrieval=None).read_text()
    alts = re.findall(r'<img alt="([^"]*)"', text)
    assert sorted(alts) == ["instance discrimination accuracy (pre-training) over steps",
                            "kNN monitor: bare backbone (pre-training) over steps", "loss terms over steps"]
    assert "Relabeling" not in text


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """``(header, rows of cells)`` of every table in the report."""
    out = []
    for table in re.findall(r"<table>(.*?)</table>", text, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        header = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th>(.*?)</th>", rows[0], re.S)]
        out.append((header, [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows[1:]]))
    return out


def test_relabeling_tables_read_counts_as_integers_and_each_column_in_one_format(tmp_path):
    reports = _labeling_reports(5)
    text = write_report(tmp_path / "r.html", summary={}, history=[], relabel_rounds=reports, retrieval=None).read_text()
    columns: dict[str, list[str]] = {}
    for header, rows in _tables(text)[1:]:  # the summary is the first table
        assert len(header) <= 12  # narrow enough to read without scrolling sideways
        for i, name in enumerate(header):
            columns.setdefault(name, [])
            columns[name] += [row[i] for row in rows] if name not in ("version", "round") or not columns[name] else []
    assert set(columns) == set(reports[0])  # every statistic is shown
    for name in ("version", "step", "num_splits", "num_dropped", "num_images", "num_clusters", "size_max"):
        assert columns[name] == [f"{int(r[name]):,}" for r in reports], name  # 3,000 not 3000.0 nor 3.0000
    for name in ("noise_rate", "pair_f_score", "before_purity"):
        assert columns[name] == [f"{r[name]:.3f}" for r in reports], name
    for name, cells in columns.items():  # one number of decimals per column
        assert len({len(c.rpartition(".")[2]) if "." in c else 0 for c in cells}) == 1, (name, cells)


def test_retrieval_metrics_read_in_percent_in_the_plots_too():
    from pipelines.report import _history_groups

    history = _history()
    groups = _history_groups(history)
    maps = dict(groups["target-domain retrieval"]["eval/mAP"])
    assert maps == {row["step"]: pytest.approx(100 * row["eval/mAP"]) for row in history if "eval/mAP" in row}
    assert dict(groups["loss terms"]["loss/instance"])[50] == pytest.approx(3.0 * np.exp(-50 / 400))  # not scaled


def _chromium() -> str | None:
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


def browser_layout(html_path, width: int = 1280) -> dict:
    """``{"scrollWidth", "innerWidth"}`` of the page in headless Chromium with a ``width`` px viewport."""
    import json
    import subprocess

    probe = html_path.with_name(html_path.stem + ".probe.html")
    script = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe'; "
              "p.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth, "
              "innerWidth: window.innerWidth}); document.body.appendChild(p); });</script>")
    probe.write_text(html_path.read_text().replace("</body>", script + "</body>"))
    out = subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout)
    assert found, out.stderr[-2000:]
    return json.loads(html.unescape(found[1]))


@pytest.mark.skipif(_chromium() is None, reason="needs a Chromium (apt-get install chromium)")
def test_a_demo_sized_report_fits_a_1280px_screen_in_a_browser(tmp_path):
    out = write_report(tmp_path / "report.html", summary=SUMMARY, history=_history(), relabel_rounds=_labeling_reports(),
                       retrieval=_retrieval(), title="DynaMix demo: dynamix on SynthReID")
    layout = browser_layout(out)
    assert layout["innerWidth"] == 1280
    assert layout["scrollWidth"] <= 1280, layout  # no sideways scroll of the page
