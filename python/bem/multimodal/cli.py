"""`bem run --suite multimodal`: the command-line front of bem.multimodal.suite (selected by
--suite in bem.experiments.cli; the default suite's path is unchanged)."""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path
from bem._console import log_to_stderr

log = logging.getLogger("bem")


def _folder(out: str | None, seed: int) -> Path:
    if out is not None:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path("bem-runs") / f"multimodal-{stamp}-seed{seed}"
    n = 1
    while folder.exists():
        n += 1
        folder = Path("bem-runs") / f"multimodal-{stamp}-seed{seed}-{n}"
    return folder


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bem.experiments.cli import acceptance_table
    from bem.experiments.runner import resolve_device
    from bem.multimodal.suite import MultimodalConfig, run_multimodal

    parser = args.parser
    if args.variants is not None:
        parser.error("--variants: the multimodal suite runs its own systems (text_only, "
                     "image_lora, image_routed); do not pass --variants with --suite multimodal")
    if args.resume:
        parser.error("--resume: not supported by --suite multimodal (a run takes minutes; start "
                     "it again)")
    overrides = {"seed": args.seed} if args.seed is not None else {}
    config = MultimodalConfig.preset("quick" if args.quick else "default", **overrides)
    log_to_stderr(log)
    folder = _folder(args.out, config.seed)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if folder.exists() and any(folder.iterdir()):
        parser.error(f"--out: {folder} exists and is not empty")
    try:
        with logging_redirect_tqdm(loggers=[log]):
            outcome = run_multimodal(config, folder, device=args.device,
                                     progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"bem run: interrupted; {folder} holds the files written so far", file=sys.stderr)
        return 130
    print(acceptance_table(outcome.report))
    print(f"\nrun folder: {outcome.folder}\nresults:    {outcome.results_path}\n"
          f"report:     {outcome.report_path}")
    return 0
