"""Faults a demanding user meets around a run, injected on purpose: each ends in one line that names
the path or key and what to do, before anything is damaged or any minute is wasted.

Settings checked at load (before data or workers), YAML that does not parse, a refused or full disk
(no temporary shard left), one writer per run folder (a second run refuses before touching it, a
dead run's lease is taken over), the settings of an interrupted attempt, labelling failures with
their plain cause, and deterministic errors that Ray Train does not retry. No test here starts Ray.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = "dynamix_demo"


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """``dynamix ARGV``: the exit code and the lines of its standard error."""
    from pipelines.cli import main

    code = main(list(argv))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- settings checked when loaded ----------------------------------------------------------------


@pytest.mark.parametrize("override, named", [
    ("run.max_steps=-5", "run.max_steps: -5 must be >= 1"),
    ("scaling.num_workers=0", "scaling.num_workers: 0 must be >= 1"),
    ("run.log_every=0", "run.log_every: 0 must be >= 1"),
    ("labeling.pool_size=0", "labeling.pool_size: 0 must be >= 1"),
    ("scaling.max_failures=-1", "scaling.max_failures: -1 must be >= 0"),
])
def test_a_value_out_of_range_fails_at_print_config(capsys, override, named):
    code, err = _cli(capsys, "train", "--config", DEMO, "--set", override, "--print-config")
    assert code == 2 and len(err) == 1
    assert err[0] == f"dynamix train: error: --set {override}: {named}"


def test_a_value_out_of_range_in_the_recipe_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path(REPO / "recipes" / "dynamix_demo.yaml").read_text() + "\nrun: {max_steps: -5}\n")
    code, err = _cli(capsys, "train", "--config", str(recipe), "--print-config")
    assert code == 2 and err == [f"dynamix train: error: {recipe}: run.max_steps: -5 must be >= 1"]


def test_multicam_without_its_schedule_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "mc.yaml"
    lines = (REPO / "recipes" / "multicam_baseline_demo.yaml").read_text().splitlines()
    recipe.write_text("\n".join(ln for ln in lines if not ln.startswith("sampler:")) + "\n")
    code, err = _cli(capsys, "train", "--config", str(recipe), "--print-config")
    assert code == 2 and len(err) == 1
    assert "sampler.schedule: method=multicam has no single-camera data" in err[0]
    assert "multi_fraction: 1.0" in err[0] and str(recipe) in err[0]
    code, _ = _cli(capsys, "train", "--config", "multicam_baseline_demo", "--print-config")
    assert code == 0  # the shipped recipe has its schedule


def test_yaml_that_does_not_parse_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  max_steps: [1, 2\nmethod: dynamix\n")
    code, err = _cli(capsys, "train", "--config", str(bad), "--print-config")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"dynamix train: error: config file {bad}, line 3, column 7: not valid YAML")
    assert "fix the file" in err[0]


def test_demo_checks_its_settings_before_generating_data(tmp_path, monkeypatch):
    import pipelines.demo as demo
    from dynamix_core.config import ConfigError

    generated = []
    monkeypatch.setattr(demo, "prepare_data", lambda *a, **k: generated.append(a))
    with pytest.raises(ConfigError, match="run.checkpoint_every=25 must be a multiple of run.log_every"):
        demo.run_demo(tmp_path, overrides=["run.checkpoint_every=25"])
    with pytest.raises(ConfigError, match="run.max_steps: -5 must be >= 1"):
        demo.run_demo(tmp_path, overrides=["run.max_steps=-5"])
    assert generated == []


# --- refused and full disks ----------------------------------------------------------------------


@pytest.mark.parametrize("code, advice", [
    (errno.EACCES, "permission denied; choose a folder you can write to, or fix its permissions"),
    (errno.EROFS, "the file system is read-only; choose a writable output folder"),
    (errno.ENOSPC, "no space left on the device; free space there or choose another output folder"),
])
def test_a_refused_write_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path, code, advice):
    import pipelines.commands.synth as synth

    target = tmp_path / "out" / "data"

    def refuse(args):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(synth, "run", refuse)
    status, err = _cli(capsys, "synth", "--out", str(tmp_path / "out"))
    assert status == 1 and err == [f"dynamix synth: error: cannot write {target}: {advice}"]


def test_a_full_disk_through_ray_still_says_space(monkeypatch, capsys, tmp_path):
    """Ray wraps a worker's error (and Ray Data's retries keep only its text): the line still says
    that the disk is full, and where."""
    from ray.exceptions import RayTaskError

    import pipelines.commands.ingest as ingest

    shard = str(tmp_path / "shards" / "train" / "shard-000000.tar")
    wrapped = RayTaskError("write_shard", "Traceback ...", OSError(errno.ENOSPC, "No space left on device", shard))
    text_only = RuntimeError(f"Failed to write after 3 retry attempts: OSError: [Errno 28] No space left on device: "
                             f"'{shard}'")
    for exc in (wrapped, text_only):
        monkeypatch.setattr(ingest, "run", lambda args, exc=exc: (_ for _ in ()).throw(exc))
        status, err = _cli(capsys, "ingest", "--root", str(tmp_path), "--out", str(tmp_path / "shards"))
        assert status == 1 and err == [f"dynamix ingest: error: cannot write {shard}: no space left on the device; "
                                       "free space there or choose another output folder"]


def test_a_full_disk_leaves_no_temporary_shard(tmp_path):
    from dynamix_core.data.records import Record
    from dynamix_core.data.shards import ShardWriter

    tar = tmp_path / "train" / "shard-000000.tar"
    with pytest.raises(OSError) as failed:
        with ShardWriter(tar) as writer:
            writer._fh.close()
            writer._fh = open("/dev/full", "wb", buffering=2**20)  # every flush: ENOSPC
            writer.add(Record(key="a_0001", pid=1, camid=0, dataset="d", split="train"), b"\xff\xd8" * 100, "jpg")
            writer.commit({})
    assert failed.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tar.parent.iterdir()) == []  # no .shard-000000.tar.tmp-PID, no tar
