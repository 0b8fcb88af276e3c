"""Evaluate a registered version against the current champion and move the `champion` alias if it wins.

    dynamix promote --name dynamix-reid --version 7 --suite data/synthreid/target/synth_target
    dynamix promote --name dynamix-reid --version 7 --suite /data/Market-1501 --metric rank1 --margin 0.01

Both versions are loaded from the registry and evaluated now on the same query/gallery set
(--suite, read with the --suite-format parser). The challenger becomes `champion` when its score
exceeds the champion's by more than --margin (or when there is no champion); the replaced version
gets the alias `previous-champion`. The decision and both scores are recorded as `promotion.*`
tags on the challenger. A failure (a version that does not load, unreadable images) changes no
alias, is recorded as promotion.decision=error, and exits with status 1.
"""

from __future__ import annotations

import argparse

from pipelines.commands.register import add_tracking_uri, resolve_tracking_uri

METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="registered model name, e.g. dynamix-reid")
    parser.add_argument("--version", required=True, help="the challenger: a version number of --name")
    parser.add_argument("--suite", required=True,
                        help="evaluation data set root with query and gallery images (e.g. a Market-1501 folder "
                             "with query/ and bounding_box_test/, or the SynthReID target domain)")
    parser.add_argument("--suite-format", default="market1501",
                        help="parser of --suite (market1501, dukemtmc, cuhk03np, msmt17, manifest)")
    parser.add_argument("--metric", default="mAP", choices=METRICS, help="the metric that decides")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="the challenger must beat the champion by more than this (same units as --metric, 0-1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_tracking_uri(parser)


def run(args: argparse.Namespace) -> int:
    from services.promotion import ImageSetSuite, promote

    tracking_uri = resolve_tracking_uri(args.tracking_uri)  # first: a missing store is the cheaper error
    suite = ImageSetSuite(args.suite, fmt=args.suite_format, batch_size=args.batch_size)
    decision = promote(args.name, args.version, suite, tracking_uri=tracking_uri,
                       metric=args.metric, margin=args.margin)
    print(decision.table())
    return 1 if decision.decision == "error" else 0
