"""`bem validate RESULTS.json`: the acceptance gates of an experiment, PROMOTE / REJECT per variant."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `validate` subcommand to bem's command line."""
    p = subparsers.add_parser(
        "validate", help="acceptance gates over an experiment's results: PROMOTE or REJECT each variant",
        description="Reads a results file (schema bem.acceptance.results v1, see docs/stats.md), "
                    "runs every acceptance gate for every variant and prints a Markdown report. "
                    "Exit status 0 when the file was valid (whatever the decisions), 2 when not.")
    p.add_argument("results", help="results JSON file")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--markdown", dest="markdown_out", metavar="OUT",
                   help="also write the Markdown report to a file")
    p.add_argument("--thresholds", metavar="FILE",
                   help="JSON object overriding gate thresholds (e.g. {\"latency_ratio_max\": 1.1})")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from bem.stats.acceptance import load_thresholds, validate, write_report

    try:
        thresholds = load_thresholds(args.thresholds) if args.thresholds else None
        report = validate(args.results, thresholds)
        write_report(report, json_path=args.json_out, markdown_path=args.markdown_out)
    except (OSError, ValueError, TypeError) as exc:
        print(f"bem validate: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(report.to_markdown())
    return 0
