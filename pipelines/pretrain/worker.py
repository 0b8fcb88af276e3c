"""The Ray Train worker of pre-training: the loop is :func:`pipelines.pretrain.run.run_pretrain`
on the engine; Ray provides the rank, the model wrapping, the restored checkpoint, the Ray Data
video stream and the reporter (:mod:`pipelines.train.worker`)."""

from __future__ import annotations


def pretrain_loop_per_worker(config: dict) -> None:
    import dynamix_core  # noqa: F401  (the torchvision shim, before anything imports timm)
    from pipelines.pretrain.run import has_step_zero, run_pretrain
    from pipelines.train.data import RankVideos, ray_video_stream
    from pipelines.train.worker import RayReporter, ray_runtime, restored_checkpoint, start_step_of

    job = config["job"]
    cfg = job.cfg
    rt = ray_runtime(cfg.run.seed)
    with restored_checkpoint() as restore_dir:
        reporter = RayReporter(job, rt.rank, start_step_of(restore_dir))

        def record_baseline(monitor) -> None:
            # once: a restart before the first checkpoint keeps the row it already recorded
            if rt.rank == 0 and not has_step_zero(job.run_dir):
                reporter.record({"step": 0, **monitor()}, 0)

        run_pretrain(cfg, rt, videos=RankVideos.load(job.index_path, rt.rank, rt.world), reporter=reporter,
                     restore_dir=restore_dir, video_stream=ray_video_stream,
                     videos_per_rank=job.videos_per_rank[rt.rank], record_baseline=record_baseline)
