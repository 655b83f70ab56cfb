"""`bem online`: the command-line front of bem.online.experiment (argument checks, logging, the
headline numbers printed at the end)."""
from __future__ import annotations

import argparse
import logging
import sys
from bem._console import log_to_stderr, refuse_with_resume, seed_arg

log = logging.getLogger("bem")


def register(sub) -> None:
    p = sub.add_parser("online", help="learn an adapter online from a drifting, partly poisoned "
                       "feedback stream behind a canary gate; write a report",
                       description="Load (or pre-train) bem's tiny base, attach a LoRA adapter and "
                       "learn online from a stream over the adaptation domains with a poisoned "
                       "segment and a gradual drift: EWC + proximal updates, drift detectors, a "
                       "canary judge before every release and rollback to the last good "
                       "checkpoint, against an unguarded learner and EWC vs no EWC.")
    p.add_argument("--quick", action="store_true", help="a small configuration (a few minutes)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_arg, default=None, help="stream and training seed (default 0)")
    p.add_argument("--out", default=None, help="run folder (default: a new folder under ./bem-runs)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="FOLDER",
                   help="continue an interrupted run (FOLDER, --out, or the latest unfinished "
                   "online run under ./bem-runs) from its checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_online, parser=p)


def headline(results: dict) -> str:
    g, u, f = results["guarded"], results["unguarded"], results["forgetting"]
    sel = results["selection"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    lines = [f"regressions shipped: guarded {g['regressions_shipped']}, unguarded "
             f"{u['regressions_shipped']}",
             f"guarded: {g['released']} released, {g['rejected']} rejected ({g['rollbacks']} "
             f"rollbacks); poisoned rounds released {g['poison_rounds_released']}/"
             f"{g['poison_rounds']}",
             f"shadow: {results['shadow']['released']} released, {results['shadow']['rejected']} "
             f"rejected, {results['shadow']['regressions_shipped']} regressions shipped",
             f"EWC λ = {sel['lambda']:g} ("
             + ("given" if sel.get("given") else "chosen on the validation stream") + ")",
             f"forgetting: no EWC {f['plain']['mean']:.3f} (plasticity {f['plain']['plasticity']:.3f}),"
             f" EWC {f['ewc']['mean']:.3f} (plasticity {f['ewc']['plasticity']:.3f}), replay "
             f"{f['replay']['mean']:.3f} (plasticity {f['replay']['plasticity']:.3f}); EWC removes "
             f"{pct(f['ewc_reduction'])}, replay {pct(f['replay_reduction'])}"]
    for name, d in results["detectors"]["per_detector"].items():
        lines.append(f"{name}: delays {d['delays']}, {len(d['unmatched_alarms'])} unmatched alarms")
    return "\n".join(lines)


def _cmd_online(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bem.experiments.runner import resolve_device
    from bem.online.experiment import OnlineConfig, execute, prepare_run

    parser = args.parser
    config = None
    if args.resume:
        refuse_with_resume(parser, args, ("quick", "seed"))
    else:
        overrides = {"seed": args.seed} if args.seed is not None else {}
        config = OnlineConfig.preset("quick" if args.quick else "default", **overrides)
    log_to_stderr(log)
    try:
        device = resolve_device(args.device)
        run = prepare_run(config, out=args.out, resume=args.resume)
    except ValueError as exc:
        parser.error(str(exc))
    log.info("bem online: run folder %s", run.folder)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            results = execute(run, device=device, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"bem online: interrupted; {run.folder} holds the checkpoints; continue with "
              f"`bem online --resume {run.folder}`", file=sys.stderr)
        return 130
    print(headline(results))
    print(f"\nrun folder: {run.folder}\nreport:     {run.folder / 'report.md'}")
    return 0
