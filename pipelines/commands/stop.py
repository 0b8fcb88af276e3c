"""Stop a running job (its processes get SIGTERM, then SIGKILL)."""

from __future__ import annotations

import sys

from pipelines.commands._jobs_common import add_address


def add_arguments(p) -> None:
    add_address(p)
    p.add_argument("job_id", help="the id printed by dynamix submit")


def run(args) -> int:
    from services.jobs import JobError, stop_job

    try:
        stopped = stop_job(args.address, args.job_id)
    except JobError as exc:
        print(f"dynamix stop: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
