"""Print the logs of a submitted job (``--follow`` streams until it ends)."""

from __future__ import annotations

import sys

from pipelines.commands._jobs_common import add_address


def add_arguments(p) -> None:
    add_address(p)
    p.add_argument("job_id", help="the id printed by dynamix submit")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming new output until the job ends")


def run(args) -> int:
    from services.jobs import JobError, follow_logs, job_logs

    try:
        if args.follow:
            for chunk in follow_logs(args.address, args.job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(job_logs(args.address, args.job_id))
    except JobError as exc:
        print(f"dynamix logs: error: {exc}", file=sys.stderr)
        return 2
    return 0
