"""`bem safety`: the safety measurement (docs/safety.md). Registered by bem.cli with
``from bem.safety import cli as safety_cli; safety_cli.register(sub)``."""
from __future__ import annotations

import argparse
import logging
import sys

from bem._console import log_to_stderr, seed_arg

log = logging.getLogger("bem")


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {v}")
    return v


def register(sub) -> None:
    """Adds the `safety` subcommand to bem's argparse subparsers."""
    p = sub.add_parser(
        "safety", help="adapters with and without the safety basis: refusals kept vs "
                       "adaptation gain, with the violation gate (docs/safety.md)",
        description="Pre-trains (or loads) the safety base — the default base further trained "
                    "with the safety skill — computes the safety basis, trains the static LoRA "
                    "with and without it, evaluates refusals, leaks, false refusals and the "
                    "adaptation gain, and validates with the violation gate.")
    p.add_argument("--quick", action="store_true",
                   help="a tiny base and few steps (about a minute; the numbers mean nothing)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_arg, default=None, help="training seed (default 0)")
    p.add_argument("--spectral-budget", type=_budget, default=None, metavar="B",
                   help="also train an adapter under the basis and SpectralMonitor(B)")
    p.add_argument("--basis", default=None, metavar="SOURCE:SIDE:RULE",
                   help="the basis procedure (default refusal-gradient:input:r99, chosen on "
                        "validation by --select; the 14 candidates and RULE forms (r90, r99, "
                        "r<percent>-<max rank>) are in docs/safety.md)")
    p.add_argument("--pull", choices=("direct", "indirect"), default=None,
                   help="the adaptation data: direct (default; it answers the secret questions) "
                        "or indirect (the secret questions are left out)")
    p.add_argument("--select", action="store_true",
                   help="run the declared selection protocol instead: every candidate basis on "
                        "validation data, writes selection.json/.md (the test split is not used)")
    p.add_argument("--out", default=None, help="output folder (default: a new one under "
                                               "./bem-runs)")
    p.add_argument("--cache", default=None, help="base-model cache root (default: bem's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_safety, parser=p)


def _cmd_safety(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bem.safety.experiment import (SafetyConfig, run_safety, select_basis, selection_table,
                                       summary_table)

    overrides = {k: v for k, v in (("seed", args.seed), ("spectral_budget", args.spectral_budget),
                                   ("pull", args.pull)) if v is not None}
    log_to_stderr(log)
    try:
        if args.select and (args.basis or args.spectral_budget):
            raise ValueError("--select: runs every candidate basis without a spectral budget; "
                             "drop --basis / --spectral-budget")
        config = SafetyConfig.preset("quick" if args.quick else "default", **overrides)
        if args.basis:
            config = config.with_basis(args.basis)
        with logging_redirect_tqdm(loggers=[log]):
            if args.select:
                chosen = select_basis(config, out=args.out, device=args.device,
                                      progress=not args.no_progress, cache=args.cache)
            else:
                outcome = run_safety(config, out=args.out, device=args.device,
                                     progress=not args.no_progress, cache=args.cache)
    except ValueError as exc:
        args.parser.error(str(exc))
    except KeyboardInterrupt:
        print("bem safety: interrupted", file=sys.stderr)
        return 130
    if args.select:
        import json

        print(selection_table(json.loads((chosen.folder / "selection.json").read_text())))
        print(f"\nchosen: {chosen.chosen or 'none (no candidate could be scored)'}"
              f"\nfolder: {chosen.folder}")
        return 0
    print(summary_table(outcome.summary))
    print(f"\nfolder: {outcome.folder}\nreport: {outcome.report_path}")
    return 0
