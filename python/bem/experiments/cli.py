"""`bem run`: the command-line front of bem.experiments (argument checks, logging set-up, the
acceptance table printed at the end)."""
from __future__ import annotations

import argparse
import logging
import sys

from bem.experiments.config import VARIANTS, RunConfig
from bem._console import log_to_stderr, refuse_with_resume, seed_arg

log = logging.getLogger("bem")


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list drawn from {','.join(VARIANTS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"duplicate variant in {text!r}")
    return names


def register(sub) -> None:
    p = sub.add_parser("run", help="train, evaluate and validate the variants against a "
                       "budget-matched baseline on the embedded default; write a report",
                       description="Pre-train (or load from the cache) bem's tiny base model, "
                       "train the static-LoRA baseline and V1-V4 and the full stack with equal "
                       "budgets and seeds, evaluate them on held-out examples, validate and "
                       "write results.json, report.md and plots into a run folder.")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast configuration (about 3 minutes on 2 CPU cores)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--variants", type=_variants, default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--seed", type=seed_arg, default=None, help="training seed (default 0)")
    p.add_argument("--out", default=None,
                   help="run folder (default: a new folder under ./bem-runs)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="FOLDER",
                   help="continue an interrupted run: FOLDER, --out, or the latest unfinished "
                   "run under ./bem-runs; it keeps the options it was started with")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--suite", choices=("default", "multimodal"), default="default",
                   help="default: the adaptation domains (above); multimodal: image-aware systems "
                   "against a text-only baseline on the embedded image task (docs/multimodal.md)")
    p.set_defaults(func=_cmd_run, parser=p)


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bem.experiments.runner import execute_logged, prepare_run, resolve_device

    if getattr(args, "suite", "default") == "multimodal":
        from bem.multimodal.cli import cmd_run

        return cmd_run(args)
    parser = args.parser
    config = None
    if args.resume:
        refuse_with_resume(parser, args, ("quick", "variants", "seed"))
    else:
        overrides = {k: v for k, v in (("variants", args.variants), ("seed", args.seed))
                     if v is not None}
        config = RunConfig.preset("quick" if args.quick else "default", **overrides)
    log_to_stderr(log)
    try:
        device = resolve_device(args.device)
        run = prepare_run(config, out=args.out, resume=args.resume)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with logging_redirect_tqdm(loggers=[log]):
            outcome = execute_logged(run, device=device, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("bem run: interrupted; the run folder holds every completed stage; continue with "
              "`bem run --resume`", file=sys.stderr)
        return 130
    print(acceptance_table(outcome.report))
    print(f"\nrun folder: {outcome.folder}\nresults:    {outcome.results_path}\n"
          f"report:     {outcome.report_path}")
    return 0


def acceptance_table(report) -> str:
    """The verdict of each variant with its reasons, as a Markdown table."""
    lines = [f"Acceptance ({report.n_examples} held-out examples, primary metric "
             f"{report.primary_metric}, {report.n_hypotheses} hypotheses under "
             f"{report.thresholds.fdr_method.upper()} FDR {report.thresholds.fdr_alpha}):", "",
             "| variant | decision | Δ primary [CI] | reasons |", "|---|---|---|---|"]
    for v in report.variants:
        m = next(r for r in v.metrics if r.primary)
        lines.append(f"| {v.name} | {v.decision} | {m.mean_improvement:+.3f} "
                     f"[{m.ci_lower:+.3f}, {m.ci_upper:+.3f}] | {'; '.join(v.reasons) or '—'} |")
    return "\n".join(lines)
