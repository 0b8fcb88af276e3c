"""Run every ``benchmarks/bench_*.py`` (each compares against its reference *in the same run*).

    make bench                       # all of them, default sizes
    .venv/bin/python benchmarks/run_all.py --only eval --quick

Each benchmark prints a markdown table and writes it to ``bench_results/<name>.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="run only benchmarks whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run of the harness)")
    ap.add_argument("--out", default="bench_results", help="folder for the markdown reports")
    args = ap.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(k in s.stem for k in args.only)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        cmd = [sys.executable, str(script), "--out", str(Path(args.out) / f"{script.stem}.md")]
        if args.quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"--- {script.stem}: rc={rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(script.stem)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
