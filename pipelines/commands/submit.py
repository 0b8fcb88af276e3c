"""Submit a dynamix command as a Ray job to a cluster (e.g. a KubeRay RayCluster).

    dynamix submit --address http://HEAD:8265 --working-dir . -- train --config recipes/dynamix.yaml
    dynamix submit --address http://HEAD:8265 --image registry/dynamix-gpu:0.1.0 --wait -- retrain --config recipes/retrain.yaml

Everything after ``--`` is the dynamix command line the cluster runs. Prints the job id; follow it
with ``dynamix status|logs|stop JOB_ID``.
"""

from __future__ import annotations

import sys

from pipelines.commands._jobs_common import add_address


def add_arguments(p) -> None:
    add_address(p)
    p.add_argument("--working-dir", default=None, help="upload this folder as the job's working dir (.venv, runs, data excluded)")
    p.add_argument("--image", default=None, help="container image (pinned tag) for the job's processes")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    p.add_argument("--requirements", default=None, help="pinned requirements file to install into the job's environment")
    p.add_argument("--submission-id", default=None, help="job id to use (submitting an existing id fails: makes retries idempotent)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved for the entrypoint process itself")
    p.add_argument("--wait", action="store_true", help="stream the logs and wait for the job to end; exit 0 only if it succeeded")
    p.add_argument("dynamix_args", nargs="+", metavar="-- COMMAND ...", help="the dynamix command to run, e.g. train --config ...")


def run(args) -> int:
    from pipelines.cli import COMMANDS
    from services.jobs import JobError, JobRuntime, follow_logs, job_status, submit_job

    env = {}
    for item in args.env:
        if "=" not in item:
            raise SystemExit(f"dynamix submit: --env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    runtime = JobRuntime(working_dir=args.working_dir, image_uri=args.image, env_vars=env,
                         requirements=args.requirements, entrypoint_num_gpus=args.num_gpus)
    try:
        job_id = submit_job(args.address, args.dynamix_args, runtime, commands=COMMANDS,
                            submission_id=args.submission_id)
        print(job_id, flush=True)
        if not args.wait:
            print(f"follow with: dynamix logs --address {args.address} --follow {job_id}", file=sys.stderr)
            return 0
        for chunk in follow_logs(args.address, job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        report = job_status(args.address, job_id)
    except JobError as exc:
        print(f"dynamix submit: error: {exc}", file=sys.stderr)
        return 2
    print(f"job {job_id}: {report.status}" + (f" ({report.message})" if report.message else ""), file=sys.stderr)
    return 0 if report.status == "SUCCEEDED" else 1
