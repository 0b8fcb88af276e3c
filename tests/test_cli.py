"""The command line as a person meets it: help without noise, config keys with their help, and one
clear line (not a traceback) when Ray or MLflow fails."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from pipelines.cli import COMMANDS, build_parser, main
from pipelines.console import describe_failure

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_no_empty_or_doubled_defaults(command):
    parser = build_parser(command)
    sub = next(a for a in parser._subparsers._group_actions).choices[command]  # noqa: SLF001
    text = sub.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert not re.search(r"default[^()]*\) \(default:", text)


def test_help_config_lists_keys_with_help(capsys):
    assert main(["train", "--help-config", "centroids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("centroids.") for line in lines)
    row = next(line for line in lines if line.startswith("centroids.loss_mode"))
    assert row.split()[1] == "all" and "sharded" in row.split("#", 1)[1]
    assert main(["train", "--help-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(keys) > 100 and "run.max_steps" in keys and "cluster_method.images_per_id" in keys
    assert main(["train", "--help-config", "nope"]) == 2
    assert "sections are" in capsys.readouterr().err
    assert main(["train"]) == 2  # neither a recipe nor --help-config
    assert "--config RECIPE is required" in capsys.readouterr().err


def test_print_config_shows_help_beside_values_and_stays_yaml(capsys):
    assert main(["train", "--config", "recipes/dynamix_demo.yaml", "--set", "run.max_steps=7", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["run"]["max_steps"] == 7
    assert "  max_steps: 7  # optimizer steps of the whole run" in text.splitlines()


def test_ray_and_mlflow_failures_are_one_line():
    import mlflow.exceptions
    import ray.exceptions

    line = describe_failure(mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no such model"))
    assert line.startswith("MLflow: RESOURCE_DOES_NOT_EXIST: no such model -- check the tracking URI")
    worker = ray.exceptions.RaySystemError("Traceback (most recent call last):\n  File x\nValueError: bad shard")
    line = describe_failure(worker)
    assert line.startswith("Ray: RaySystemError: ValueError: bad shard -- check the cluster") and "\n" not in line
    assert describe_failure(ValueError("ours")) is None  # our own bugs keep their traceback


def test_an_mlflow_failure_ends_the_command_in_one_line(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("backbone: test_vit\n")
    argv = ["register", "--weights", str(tmp_path / "w.safetensors"), "--config", str(tmp_path / "c.yaml"),
            "--name", "n", "--tracking-uri", "nosuchscheme://x", "--no-onnx"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynamix register: error: MLflow: ") and "nosuchscheme" in err[0]


def _run_folder(root, name, history, *, checkpoints=0, versions=0, result=None):
    import json
    import os

    run = root / name
    (run / "labels").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: %s}\n" % name)
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    for i in range(checkpoints):
        (run / f"checkpoint_2026-11-25_00-00-0{i}.000000").mkdir()
    if versions:  # the label store's files: version 0 whole, later ones as deltas, old ones retired
        (run / "labels" / "v00000000.snap.npy").write_bytes(b"")
        (run / "labels" / f"v{versions - 1:08d}.delta.npz").write_bytes(b"")
        (run / "labels" / f"v{versions - 1:08d}.centroids.npz").write_bytes(b"")
    (run / "labels" / "index.parquet").write_bytes(b"")  # not a label version
    (run / "labels" / "v00000009.delta.npz.corrupt-20261126T000000").write_bytes(b"")  # set aside: not one either
    if result is not None:
        (run / "result.json").write_text(json.dumps({"metrics": result, "labeling": {}}))
        os.utime(run / "history.jsonl", (1000, 1000))  # the result was written after the last report
    return run


def test_runs_lists_status_steps_checkpoints_labels_and_metrics(tmp_path, capsys):
    import json
    import os

    reports = [{"step": 10, "images_per_s": 50.0}, {"step": 20, "images_per_s": 70.0, "eval/mAP": 0.25}]
    _run_folder(tmp_path, "a-finished", reports, checkpoints=2, versions=3,
                result={"eval/mAP": 0.375, "eval/rank1": 0.5, "images_per_s": 60.0})
    _run_folder(tmp_path, "b-interrupted", reports[:1], checkpoints=1)
    resumed = _run_folder(tmp_path, "c-resumed", reports, result={"eval/mAP": 0.1})
    os.utime(resumed / "result.json", (500, 500))  # an older run's result; training went on after it
    (tmp_path / "not-a-run").mkdir()
    assert main(["runs", "--storage", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["status"], r["last_step"], r["checkpoints"], r["label_versions"]) for r in rows] == [
        ("a-finished", "finished", 20, 2, 3), ("b-interrupted", "unfinished", 10, 1, 0),
        ("c-resumed", "unfinished", 20, 0, 0)]
    assert rows[0]["metrics"] == {"eval/mAP": 0.375, "eval/rank1": 0.5, "images_per_s": 60.0}
    assert rows[2]["metrics"] == {"eval/mAP": 0.25, "images_per_s": 70.0}  # from its reports, not the old result
    assert main(["runs", "--storage", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "status", "last", "step", "checkpoints", "label", "versions", "mAP", "Rank-1",
                                "img/s"]
    assert table[1].split() == ["a-finished", "finished", "20", "2", "3", "37.5", "50.0", "60"]
    assert main(["runs", "--storage", str(tmp_path / "nowhere")]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_quiet_console_drops_mlflow_advice_even_inside_its_own_warning_filters():
    """MLflow wraps model logging in ``catch_warnings(); simplefilter("once", UserWarning)``, which
    puts its own filter in front of ours: the coloured "Add type hints" advice still reached the
    console of ``make demo`` three times. Other warnings must still show."""
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "from pipelines.console import quiet_libraries\n"
        "quiet_libraries()\n"
        "from mlflow.utils.annotations import filter_user_warnings_once\n"
        "from mlflow.utils.warnings_utils import color_warning\n"
        "@filter_user_warnings_once\n"
        "def log():\n"
        "    color_warning('Add type hints to the `predict` method to enable data validation', stacklevel=1, "
        "color='yellow')\n"
        "    warnings.warn('a warning the user must see', UserWarning)\n"
        "log()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DYNAMIX_RAY_LOGS_TO_CONSOLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a warning the user must see" in out.stderr
    assert "type hints" not in out.stderr, out.stderr


def test_progress_lines_of_a_clustering_recipe_have_no_label_version(tmp_path, capsys):
    """Cluster-Contrast / CALR / DomainMix report epochs and clusters, not label versions: the
    console line leaves the field out instead of killing the printer thread (KeyError seen in
    `dynamix experiment recipes`)."""
    from pipelines.train.driver import ProgressPrinter

    printer = ProgressPrinter(tmp_path / "history.jsonl", max_steps=400)
    row = {"step": 50, "loss/total": 3.2, "lr": 3.5e-4, "images_per_s": 41.0, "data_wait_fraction": 0.1,
           "epoch": 2.0, "cluster/num_clusters": 77.0, "eval/mAP": 0.25}
    line = printer.format(row)
    assert line.startswith("[train] step     50/400  loss 3.200")
    assert "clusters 77" in line and "mAP 25.0" in line
    assert "labels" not in line
    with_labels = printer.format({**row, "label_version": 3.0})
    assert "labels v3" in with_labels


def test_progress_prints_every_row_written_before_training_returns(tmp_path, capsys):
    """A short job finishes within one look of the printer (5 s on an object store): the rows
    written since the last look are printed when the printer stops, not dropped (a cluster job's
    log once had no `[train] step` line at all). Rows from an earlier attempt are not repeated."""
    from pipelines.runs.files import MetricHistory
    from pipelines.train.driver import ProgressPrinter

    row = {"loss/total": 3.2, "lr": 3.5e-4, "images_per_s": 41.0, "data_wait_fraction": 0.1}
    history = MetricHistory(tmp_path / "history.jsonl")
    history.append({"step": 4, **row})  # the interrupted attempt's
    printer = ProgressPrinter(tmp_path / "history.jsonl", max_steps=12)
    printer.interval_s = 3600.0  # no look while the job runs
    with printer:
        for step in (8, 12):
            history.append({"step": step, **row})
    history.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[train] continuing the run (recorded up to step 4)")
    assert [line.split()[2] for line in out[1:]] == ["8/12", "12/12"]


# ----------------------------------------------------------------------- behaving like its peers


def test_version_prints_the_package_version(capsys):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dynamix {version}"


def test_output_into_a_closed_pipe_ends_quietly():
    """`dynamix train --print-config | head -1`: the reader leaves before the printing ends. The read end
    of the pipe is closed before the command starts, so its first write fails, every time."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--config", "dynamix_demo",
                               "--print-config"], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141


def _train_error(capsys, *args: str) -> str:
    assert main(["train", "--config", "recipes/dynamix_demo.yaml", *args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dynamix train: error: ")
    return err


def test_set_errors_suggest_real_keys(capsys):
    err = _train_error(capsys, "--set", "run.max_step=5")
    assert "did you mean run.max_steps?" in err
    err = _train_error(capsys, "--set", "centroid.loss_mode=all")  # a misspelt section
    assert "did you mean centroids.loss_mode?" in err
    err = _train_error(capsys, "--set", "loss_mode=all")  # the key without its section
    assert "did you mean centroids.loss_mode?" in err
    # without "=": the example the message gives is a key the command accepts as it stands
    err = _train_error(capsys, "--set", "run.max_steps")
    example = re.search(r"e\.g\. --set (\S+)", err)[1]
    assert example.startswith("run.max_steps=")
    assert main(["train", "--config", "recipes/dynamix_demo.yaml", "--set", example, "--print-config"]) == 0
    capsys.readouterr()


def test_a_bad_set_value_is_blamed_on_set_and_a_bad_recipe_value_on_the_recipe(tmp_path, capsys):
    err = _train_error(capsys, "--set", "run.max_steps=many")
    assert err.startswith("dynamix train: error: --set run.max_steps=many: ") and "dynamix_demo.yaml" not in err
    err = _train_error(capsys, "--set", "run.storage=${DYNAMIX_NO_SUCH_VARIABLE}")
    assert err.startswith("dynamix train: error: --set run.storage=${DYNAMIX_NO_SUCH_VARIABLE}: ")
    err = _train_error(capsys, "--set", "data.multi=[${DYNAMIX_NO_SUCH_VARIABLE}]")  # YAML the value cannot be
    assert err.startswith("dynamix train: error: --set data.multi=[${DYNAMIX_NO_SUCH_VARIABLE}]: ")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((REPO / "recipes" / "dynamix_demo.yaml").read_text() + "\nsampling:\n  seed: many\n")
    assert main(["train", "--config", str(recipe), "--set", "run.max_steps=7", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dynamix train: error: {recipe}: ") and "--set" not in err


def test_shipped_recipes_are_in_the_installed_package_and_resolve_by_name(tmp_path):
    """Build the wheel as pip does, install it (unpack it) into a folder of its own, and run the
    command line from there in an empty working directory: recipes resolve by name and by their
    documented ``recipes/NAME.yaml`` path, from the package and not from a checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dynamix_core", "services", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("dynamix-*.whl")
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 10
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        shipped = {Path(n).name: zf.read(n) for n in zf.namelist() if n.endswith(".yaml")}
        zf.extractall(site)
    assert shipped == {p.name: p.read_bytes() for p in recipes}  # every recipe, one copy, the same bytes

    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import sys, pipelines; from pipelines.cli import main; print('FROM', pipelines.__file__); "
            "raise SystemExit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    for config in ("dynamix_demo", "recipes/dynamix_demo.yaml", "pretrain_demo.yaml"):
        command = "pretrain" if config.startswith("pretrain") else "train"
        out = subprocess.run([sys.executable, "-c", code, command, "--config", config, "--print-config"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        first, text = out.stdout.split("\n", 1)
        assert first == f"FROM {site / 'pipelines' / '__init__.py'}"
        assert yaml.safe_load(text)["run"]["max_steps"] > 0
    out = subprocess.run([sys.executable, "-c", code, "--version"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith("dynamix ")


def test_run_files_are_written_with_the_mode_of_any_other_file(tmp_path):
    """safetensors writes its files 0600; the weights of a run must read like its other files
    (0644 under the usual umask 022), whatever the umask."""
    import stat
    from contextlib import contextmanager

    import torch

    from dynamix_core.model import save_state_dict
    from pipelines.train.driver import WEIGHTS_FILE, _export_momentum

    class Checkpoint:  # what Ray Train hands the driver
        def __init__(self, folder):
            self.folder = folder

        @contextmanager
        def as_directory(self):
            yield str(self.folder)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"momentum": {"w": torch.ones(3)}}, ckpt / "trainer.pt")
    for mask in (0o022, 0o027):
        old = os.umask(mask)
        try:
            folder = tmp_path / f"umask{mask:o}"
            folder.mkdir()
            (folder / "plain.json").write_text("{}")  # how every other run file comes out
            save_state_dict({"w": torch.zeros(2)}, folder / "backbone.safetensors")
            _export_momentum(Checkpoint(ckpt), folder, folder)
        finally:
            os.umask(old)
        want = stat.S_IMODE((folder / "plain.json").stat().st_mode)
        assert want == 0o666 & ~mask
        for name in ("backbone.safetensors", WEIGHTS_FILE):
            assert stat.S_IMODE((folder / name).stat().st_mode) == want, (name, oct(mask))


@pytest.mark.parametrize("manifest", [b"garbage, not parquet\n", None], ids=["unreadable", "missing"])
def test_a_data_set_that_is_not_a_finished_ingest_is_one_line_naming_the_field_and_the_file(tmp_path, capsys, manifest):
    bad = tmp_path / "set"
    bad.mkdir()
    if manifest is not None:
        (bad / "manifest.parquet").write_bytes(manifest)
    code = main(["train", "--config", str(REPO / "recipes" / "multicam_baseline_demo.yaml"), "--set", f"data.multi=[{bad}]",
                 "--set", "data.target=null", "--set", f"run.storage={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("dynamix train: error: data.multi: ") and str(bad) in err and "dynamix ingest" in err
