"""A training run's folder, ``run.storage/run.name`` on a local disk or an object store, and what is
written in it:

- :mod:`pipelines.runs.folder` - :class:`~pipelines.runs.folder.RunFolder` (made, written whole and
  atomically) and the MLflow run of a job (its tracking URI and artifact location);
- :mod:`pipelines.runs.files` - the crash-safe files a run writes (metric history, restarts) and
  the local folder of a run on an object store (checkpoints: :mod:`dynamix_core.engine.checkpoint`);
- :mod:`pipelines.runs.lease` - one writer per run folder: the lease a driver holds for its run;
- :mod:`pipelines.runs.listing` - the run folders under a storage root, as ``dynamix runs`` lists them.
"""
