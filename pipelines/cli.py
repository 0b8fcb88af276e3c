"""The ``dynamix`` command line.

    dynamix synth   --out data/synthreid            # generate the SynthReID data set (real on-disk formats)
    dynamix ingest  --format market1501 --root data/synthreid/multi/synth_a --out data/shards/synth_a
    dynamix inspect data/shards/synth_a              # summary of an ingested shard set
    dynamix --version

Subcommand modules are imported lazily (``pipelines.commands.<name>``) so ``--help`` stays fast and
Ray/MLflow are only imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: name -> one-line summary. The module ``pipelines.commands.<name>`` implements it.
COMMANDS: dict[str, str] = {
    "demo": "the main job on embedded defaults: SynthReID -> ingest -> train DynaMix -> evaluate -> register -> report",
    "synth": "generate the SynthReID data set in the real on-disk formats (Market folders, LUPerson-NL LMDB)",
    "ingest": "convert a source data set into WebDataset shards + parquet manifests (Ray Data)",
    "inspect": "summarise an ingested shard set (images, identities, cameras, videos, shards)",
    "train": "train DynaMix / ReMix / the multi-camera baseline on Ray Train (resumes a run of the same name)",
    "pretrain": "self-supervised pre-training (MoCo v3) of a backbone on unlabeled single-camera video crops, on Ray Train",
    "experiment": "train several recipes under one budget on SynthReID and print a mAP / Rank-1 table",
    "runs": "list the training runs under a storage root: status, last step, checkpoints, label versions, metrics",
    "evaluate": "evaluate a trained encoder on target query/gallery sets (cross-dataset), table + JSON",
    "register": "register a trained momentum encoder as an MLflow pyfunc embedding model (with ONNX export)",
    "promote": "evaluate a registered version against the champion; move the champion alias if it wins",
    "retrain": "scheduled retraining cycle: ingest new single-camera data, continue from the champion, evaluate, register, promote",
    "submit": "submit a dynamix command as a job to a Ray cluster (KubeRay or any Ray head)",
    "status": "status of a submitted job",
    "logs": "logs of a submitted job (--follow to stream)",
    "stop": "stop a submitted job",
}


def package_version() -> str:
    """The installed distribution's version (``pyproject.toml``'s, once installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dynamix")
    except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
        return "unknown (not installed)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw descriptions; "(default: X)" only where it tells something: not for None, False or an
    empty list, and not when the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default in (None, False, [], "", argparse.SUPPRESS) or "default" in text
        if silent or action.option_strings == [] or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others' summaries come from COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="dynamix",
        description="DynaMix: distributed training of generalizable person re-identification models on Ray.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dynamix {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, summary in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        module = importlib.import_module(f"pipelines.commands.{name}")
        p = sub.add_parser(
            name, help=summary, description=(module.__doc__ or summary).strip(), formatter_class=_Formatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    # imported after parsing: `dynamix --help` should not pay for importing torch
    from dynamix_core.config import ConfigError
    from dynamix_core.data.records import BadInputError
    from dynamix_core.errors import StopRun, os_error_line
    from dynamix_core.model import WeightsError
    from dynamix_core.storage import StorageError

    from pipelines.console import describe_failure, quiet_libraries

    quiet_libraries()
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except BrokenPipeError:  # `dynamix ... | head` stopped reading: end quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except (ConfigError, BadInputError, WeightsError, FileNotFoundError, StorageError, StopRun) as exc:
        print(f"dynamix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Ray, MLflow and refused writes end in one line; anything else keeps its traceback
        line = os_error_line(exc) or describe_failure(exc)
        if line is None or os.environ.get("DYNAMIX_TRACEBACK"):
            raise
        print(f"dynamix {args.command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dynamix {args.command}: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
