"""The HTML training report and the terminal summary table."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from pipelines.report import print_summary_table, retrieval_strip_png, write_report

SUMMARY = {"eval/mAP": 0.4123, "eval/rank1": 0.6345, "pseudo_label_f/before": 0.71, "pseudo_label_f/after": 0.8312,
           "images_per_s": 812.3, "data_wait_frac": 0.031, "label_wait_frac": 0.0024, "steps": 12000,
           "wall_time_s": 3605.5, "recipe": "dynamix"}
# the same values as a reader should see them, written out by hand
SUMMARY_SHOWN = {"eval/mAP": "0.4123", "eval/rank1": "0.6345", "pseudo_label_f/before": "0.7100",
                 "pseudo_label_f/after": "0.8312", "images_per_s": "812.3", "data_wait_frac": "0.0310",
                 "label_wait_frac": "0.0024", "steps": "12,000", "wall_time_s": "3,605.5", "recipe": "dynamix"}
RELABEL = [{"round": 1, "num_splits": 40, "num_merges": 12, "noise_rate": 0.18, "pair_f_score": 0.81},
           {"round": 2, "num_splits": 25, "num_merges": 9, "noise_rate": 0.12, "pair_f_score": 0.86}]


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
    for shown in ("40", "9", "0.1800", "0.8600"):
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
