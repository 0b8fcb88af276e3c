"""Show the status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from pipelines.commands._jobs_common import add_address


def add_arguments(p) -> None:
    add_address(p)
    p.add_argument("job_id", help="the id printed by dynamix submit")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def run(args) -> int:
    from services.jobs import JobError, job_status

    try:
        report = job_status(args.address, args.job_id)
    except JobError as exc:
        print(f"dynamix status: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"{report.job_id}  {report.status}  {report.entrypoint}" + (f"\n  {report.message}" if report.message else ""))
    return 0
