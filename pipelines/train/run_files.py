"""Old import path of the run files, which live in :mod:`pipelines.runs.files`. Kept only while the
training and pre-training workers still import them from here; new code imports the new path."""

from pipelines.runs.files import (MetricHistory, load_json, load_tensors, local_run_dir,  # noqa: F401
                                  read_jsonl, record_start, rng_state, save_json, set_rng_state)
