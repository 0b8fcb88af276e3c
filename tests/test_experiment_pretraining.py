"""The pre-training ablation's bookkeeping (pipelines/experiment_pretraining.py): seed statistics
against numpy, the table, the plot, the command line. The runs themselves are the training and
pre-training jobs tested elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.experiment_pretraining import ROWS, aggregate, format_table, plot_rows


def test_rows_are_the_six_settings_of_remix_pretraining_ablation():
    assert [(r, pre) for r, _, _, pre in ROWS] == [("a", False), ("b", True), ("c", False), ("d", True),
                                                    ("e", False), ("f", True)]
    assert [recipe for _, _, recipe, _ in ROWS] == ["multicam_baseline_demo.yaml"] * 2 + ["remix_demo.yaml"] * 2 + \
        ["dynamix_demo.yaml"] * 2


def test_mean_and_sample_std_over_seeds_table_and_plot(tmp_path):
    maps, rank1s = [0.12, 0.18, 0.15], [0.30, 0.40, 0.20]
    row = aggregate("d", "pre-train + ReMix", [{"seed": s, "mAP": m, "rank1": r}
                                                for s, (m, r) in enumerate(zip(maps, rank1s))])
    assert row["mAP_mean"] == pytest.approx(np.mean(maps)) and row["mAP_std"] == pytest.approx(np.std(maps, ddof=1))
    assert row["rank1_std"] == pytest.approx(np.std(rank1s, ddof=1))
    single = aggregate("a", "multi-camera only", [{"seed": 0, "mAP": 0.1, "rank1": 0.2}])
    assert single["mAP_std"] == 0.0
    bare = [{"knn/synth_target/mAP_before": 0.03, "knn/synth_target/mAP_after": 0.09},
            {"knn/synth_target/mAP_before": 0.05, "knn/synth_target/mAP_after": 0.11}]
    table = format_table([single, row], bare, steps=150, seeds=3, backbone="resnet18", pretrain_steps=300, minutes=5)
    assert "| (d) | pre-train + ReMix | 15.0 ± 3.0 | 30.0 ± 10.0 | 12.0, 18.0, 15.0 |" in table
    assert "random init 4.0 ± 1.4, pre-trained 10.0 ± 1.4" in table
    png = plot_rows([single, row], tmp_path / "plot.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_experiment_command_offers_the_suite():
    from pipelines.cli import build_parser

    args = build_parser("experiment").parse_args(["experiment", "pretraining", "--steps", "20", "--seeds", "2",
                                                  "--pretrain-steps", "30", "--pretrain-set", "data.batch_size=16"])
    assert (args.suite, args.steps, args.seeds, args.pretrain_steps) == ("pretraining", 20, 2, 30)
    assert args.pretrain_overrides == ["data.batch_size=16"]


def test_run_names_change_with_the_settings_they_ran_with(tmp_path):
    """A re-run with other pre-training or training settings must not reuse finished runs of the old
    settings (they are skipped by name)."""
    from pipelines.experiment_pretraining import pretrain_config, training_run_name

    small = ["model.backbone=test_resnet", "data.batch_size=16"]
    names = {pretrain_config(tmp_path, 0, None, o, None).run.name for o in ([], small, small[:1])}
    assert len(names) == 3
    assert pretrain_config(tmp_path, 0, None, small, None).run.name == pretrain_config(tmp_path, 0, None, small[::-1],
                                                                                       None).run.name
    assert pretrain_config(tmp_path, 1, None, [], None).run.name != pretrain_config(tmp_path, 0, None, [], None).run.name
    assert pretrain_config(tmp_path, 0, 50, [], None).run.name != pretrain_config(tmp_path, 0, None, [], None).run.name
    base = training_run_name("b", 0, 200, overrides=[], pretrain_overrides=[], pretrain_steps=None)
    assert base != training_run_name("b", 0, 200, overrides=[], pretrain_overrides=small, pretrain_steps=None)
    assert base != training_run_name("b", 0, 200, overrides=[], pretrain_overrides=[], pretrain_steps=50)
    assert base != training_run_name("b", 0, 200, overrides=["optim.lr=0.1"], pretrain_overrides=[], pretrain_steps=None)
    assert base != training_run_name("b", 1, 200, overrides=[], pretrain_overrides=[], pretrain_steps=None)
    assert base == training_run_name("b", 0, 200, overrides=[], pretrain_overrides=[], pretrain_steps=None)
    assert base.startswith("pretraining-b-s0-200")
