"""The Ray Train worker of the clustering recipes (Cluster-Contrast, DomainMix, CALR): the loop is
:func:`pipelines.train.clustering.run_clustering` on the engine; Ray provides the rank, the model
wrapping, the restored checkpoint and the reporter (:mod:`pipelines.train.worker`)."""

from __future__ import annotations


def train_loop_per_worker(config: dict) -> None:
    from pipelines.train.clustering import run_clustering
    from pipelines.train.worker import RayReporter, ray_runtime, restored_checkpoint, start_step_of

    job = config["job"]
    cfg = job.cfg
    rt = ray_runtime(cfg.run.seed)
    with restored_checkpoint() as restore_dir:
        reporter = RayReporter(job, rt.rank, start_step_of(restore_dir))
        run_clustering(cfg, rt, reporter=reporter, restore_dir=restore_dir)
