"""``dynamix experiment`` bookkeeping that needs no training: what each seed sets, the paired
differences with t-intervals of the mixing suite (against scipy), the JSON and the command line.
The training runs themselves are the `dynamix train` path tested elsewhere."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


#: target mAP a faked training run reports, by method and seed
FAKE_MAP = {"multicam": [0.30, 0.25, 0.28, 0.31, 0.27], "remix": [0.29, 0.27, 0.27, 0.30, 0.30],
            "dynamix": [0.33, 0.26, 0.32, 0.35, 0.28]}


def _capture_runs(monkeypatch, tmp_path):
    """run_suite with the data preparation skipped and every training recorded instead of run."""
    import pipelines.experiment as experiment
    import pipelines.train.driver as driver

    seen = []

    def fake_training(cfg):
        seen.append(cfg)
        return SimpleNamespace(metrics={"eval/mAP": FAKE_MAP[cfg.method][cfg.run.seed], "eval/rank1": 0.2})

    monkeypatch.setattr(experiment, "prepare_data", lambda out, **kw: None)
    monkeypatch.setattr(driver, "run_training", fake_training)
    (tmp_path / "experiments").mkdir()
    return seen


def test_each_seed_varies_the_data_order_as_well_as_the_init(monkeypatch, tmp_path):
    from pipelines.experiment import run_suite

    seen = _capture_runs(monkeypatch, tmp_path)
    run_suite("mixing", tmp_path, steps=3, seeds=3)
    assert len(seen) == 9
    for cfg in seen:
        assert cfg.sampler.seed == cfg.run.seed  # one seed sets the init and the batches
    assert sorted({(c.method, c.sampler.seed) for c in seen}) == sorted(
        (m, s) for m in ("multicam", "remix", "dynamix") for s in (0, 1, 2))


def test_each_pretraining_ablation_seed_sets_the_sampler_seed(monkeypatch, tmp_path):
    import pipelines.experiment_pretraining as ablation

    seen = _capture_runs(monkeypatch, tmp_path)
    monkeypatch.setattr(ablation, "prepare_data", lambda out, **kw: None)
    monkeypatch.setattr(ablation, "_pretrained_backbone", lambda cfg: (tmp_path / "backbone.pt", {}))
    ablation.run_ablation(tmp_path, steps=3, seeds=2)
    assert len(seen) == 12 and {c.sampler.seed for c in seen} == {0, 1}
    assert all(c.sampler.seed == c.run.seed for c in seen)


# t quantiles t_{0.975, df} from a printed table (not computed by the code under test)
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


@pytest.mark.parametrize("values", [[0.01, 0.05], [0.04, -0.01, 0.02], [0.03, -0.02, 0.04, 0.04, 0.01]])
def test_t_interval_matches_the_closed_form(values):
    from pipelines.experiment import t_interval

    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    got = t_interval(values)
    assert got[0] == pytest.approx(mean)
    assert got[1] == pytest.approx(mean - T975[n - 1] * sd / n ** 0.5, abs=1e-5)
    assert got[2] == pytest.approx(mean + T975[n - 1] * sd / n ** 0.5, abs=1e-5)
    assert t_interval([0.3])[1:] == (float("-inf"), float("inf"))


def test_mixing_suite_writes_per_seed_maps_and_paired_differences(monkeypatch, tmp_path):
    from pipelines.experiment import run_suite

    _capture_runs(monkeypatch, tmp_path)
    path = tmp_path / "measurements" / "mixing-real.json"
    run_suite("mixing", tmp_path, steps=5, seeds=5, preset="real", json_path=path)
    got = json.loads(path.read_text())
    assert (got["preset"], got["steps"], got["seeds"]) == ("real", 5, [0, 1, 2, 3, 4])
    assert got["target_mAP"] == {"multi_only": FAKE_MAP["multicam"], "remix": FAKE_MAP["remix"],
                                 "dynamix": FAKE_MAP["dynamix"]}
    diff = got["paired_differences"]["dynamix - multi_only"]
    per_seed = [0.03, 0.01, 0.04, 0.04, 0.01]  # by hand from FAKE_MAP
    assert diff["per_seed"] == pytest.approx(per_seed)
    mean = sum(per_seed) / 5
    sd = (sum((d - mean) ** 2 for d in per_seed) / 4) ** 0.5
    assert diff["mean"] == pytest.approx(0.026)
    assert diff["ci95"] == pytest.approx([mean - 2.7764 * sd / 5 ** 0.5, mean + 2.7764 * sd / 5 ** 0.5], abs=1e-5)
    assert got["paired_differences"]["remix - multi_only"]["per_seed"] == pytest.approx([-0.01, 0.02, -0.01, -0.01, 0.03])
    assert got["paired_differences"]["dynamix - remix"]["per_seed"] == pytest.approx([0.04, -0.01, 0.05, 0.05, -0.02])
    table = (tmp_path / "experiments" / "mixing_real_5_5seeds.md").read_text()
    assert "| dynamix - multi_only | +2.6 |" in table


def test_the_experiment_command_takes_preset_and_json():
    from pipelines.cli import build_parser

    args = build_parser("experiment").parse_args(["experiment", "mixing", "--preset", "real", "--seeds", "5",
                                                  "--steps", "800", "--json", "out.json"])
    assert (args.suite, args.preset, args.seeds, args.steps, args.json_path, args.out) == \
        ("mixing", "real", 5, 800, "out.json", None)


@pytest.mark.parametrize("recipe, mask", [("remix_demo.yaml", False), ("remix.yaml", False),
                                          ("dynamix_demo.yaml", True), ("dynamix.yaml", True)])
def test_only_dynamix_masks_its_own_videos_centroids(recipe, mask, monkeypatch, tmp_path):
    """ReMix (SPEC 2.2) has no same-video mask; DynaMix's is optional (SPEC 2.3b) and on."""
    from dynamix_core.config import load_config
    from pipelines.recipes import RECIPES_DIR
    from pipelines.train.config import TrainConfig

    monkeypatch.setenv("DYNAMIX_STORAGE_URI", str(tmp_path))
    assert load_config(TrainConfig, RECIPES_DIR / recipe, []).centroids.mask_same_video is mask


def test_an_interrupted_suite_continues_elsewhere_from_its_json_alone(monkeypatch, tmp_path):
    """The JSON is rewritten after each run; a later sitting with only that file (another machine: no
    run folders) trains just the runs it does not record, and the final differences equal one sitting's."""
    import pipelines.train.driver as driver
    from pipelines.experiment import run_suite

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    seen = _capture_runs(monkeypatch, first)
    trained = driver.run_training

    def dies_after_four(cfg):
        if len(seen) == 4:
            raise KeyboardInterrupt
        return trained(cfg)

    monkeypatch.setattr(driver, "run_training", dies_after_four)
    path = tmp_path / "mixing-real.json"
    with pytest.raises(KeyboardInterrupt):
        run_suite("mixing", first, steps=5, seeds=2, preset="real", json_path=path)
    partial = json.loads(path.read_text())
    assert partial["finished"] is False and partial["seeds_planned"] == 2
    assert len(partial["runs"]) == 4  # multicam, remix, dynamix of seed 0, multicam of seed 1
    assert partial["seeds"] == [0]  # only seed 0 has all three arms
    assert partial["target_mAP"]["dynamix"] == [FAKE_MAP["dynamix"][0]]

    seen = _capture_runs(monkeypatch, second)
    run_suite("mixing", second, steps=5, seeds=2, preset="real", json_path=path)
    assert [(c.method, c.run.seed) for c in seen] == [("remix", 1), ("dynamix", 1)]
    done = json.loads(path.read_text())
    assert done["finished"] is True and done["seeds"] == [0, 1] and len(done["runs"]) == 6
    assert done["target_mAP"]["multi_only"] == FAKE_MAP["multicam"][:2]
    assert done["paired_differences"]["dynamix - remix"]["per_seed"] == pytest.approx([0.04, -0.01])

    with pytest.raises(ValueError, match="preset 'real' and 5 steps"):
        run_suite("mixing", second, steps=6, seeds=2, preset="real", json_path=path)
