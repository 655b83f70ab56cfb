"""Helpers shared by bem's commands (`bem run`, `bem online`, `bem serve`, …)."""
from __future__ import annotations

import argparse
import logging
import sys


def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def log_to_stderr(log: logging.Logger, level: int | str | None = logging.INFO) -> None:
    """Send `log`'s records to stderr as ``bem: message`` unless a real handler is attached
    already (an application's own logging configuration wins); set its level when given."""
    if not any(not isinstance(h, logging.NullHandler) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bem: %(message)s"))
        log.addHandler(handler)
    if level is not None:
        log.setLevel(level)


def refuse_with_resume(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       names: tuple[str, ...]) -> None:
    """--resume keeps a run's options: exit with a usage error naming any of `names` given."""
    given = [f"--{n}" for n in names if getattr(args, n, None) not in (None, False)]
    if given:
        parser.error(f"--resume keeps the options the run was started with; do not pass "
                     f"{', '.join(given)}")
