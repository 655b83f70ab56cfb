"""`bem serve`: the command-line front of bem.serve — build the served models (the embedded
default's pre-trained base, pre-trained first when it is not cached; adapters saved with
bem.serialization.save_pretrained; every deployment of the local registry, with its canary
rollout), then run the HTTP server until SIGTERM/SIGINT. `bem deploy`: deploy promoted variants of
a finished `bem run` into that registry (bem.deploy)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from bem._console import log_to_stderr

log = logging.getLogger("bem")


def _bounded(cast, lo: float, hi: float, what: str):
    """An argparse type: `cast(text)` within [lo, hi], else an error saying what was expected."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _bounded(int, 1, 2**31, "a positive integer")
_count = _bounded(int, 0, 2**31, "an integer >= 0")
_seconds = _bounded(float, 1e-3, 1e7, "a number of seconds in [0.001, 1e7]")
_port = _bounded(int, 1, 65535, "a port in [1, 65535]")


def _pair(form: str):
    """argparse type for KEY=VALUE arguments (both non-empty); `form` names them in the error."""
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
        return key, value
    return parse


_adapter = _pair("NAME=DIRECTORY")
_rename = _pair("VARIANT=NAME")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over bem's continuous-batching "
                       "engine (bem-base, plus saved adapters)",
                       description="Serve bem models over HTTP: /v1/completions, "
                       "/v1/chat/completions (stream: true for server-sent events), /v1/models, "
                       "/health and /metrics (Prometheus). Without options it serves the embedded "
                       "default's pre-trained base as `bem-base`, pre-training it first (minutes, "
                       "with progress) when it is not in bem's cache. SIGTERM or Ctrl-C lets "
                       "in-flight requests finish and answers 503 to new ones; a second signal "
                       "exits at once. Needs `pip install bem[serve]`.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--preset", choices=("default", "quick", "tiny"), default="default",
                   help="the base model: default (the `bem run` base, `bem-base`), quick (the "
                   "smaller `bem run --quick` base, `bem-base`), tiny (random-init, `bem-tiny`, "
                   "for tests)")
    p.add_argument("--adapter", type=_adapter, action="append", default=[],
                   metavar="NAME=DIR", help="also serve the adapter saved in DIR "
                   "(bem.serialization.save_pretrained) on the base, as model NAME; repeatable")
    p.add_argument("--registry", type=Path, default=None,
                   help="the deployment registry whose deployments are served too (default: "
                   "$BEM_DEPLOYMENTS, else bem's cache; see `bem deploy`)")
    p.add_argument("--no-registry", action="store_true",
                   help="serve no deployments from the registry")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--max-batch-size", type=_positive_int, default=32,
                   help="requests decoded together per model (default 32)")
    p.add_argument("--max-queue", type=_count, default=64,
                   help="requests that may wait for a batch slot; beyond that: 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=512,
                   help="prompt tokens computed per engine step (default 512)")
    p.add_argument("--request-timeout", type=_seconds, default=300.0,
                   help="seconds before an unfinished request is aborted with 504 (default 300)")
    p.add_argument("--drain-timeout", type=_seconds, default=60.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (default 60)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while pre-training")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(func=_cmd_serve, parser=p)
    _register_deploy(sub)


def _fraction_list(text: str) -> tuple[float, ...]:
    try:
        steps = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as "
                                         f"0.1,0.5,1, got {text!r}") from None
    return steps


def _register_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="deploy variants that a finished `bem run` promoted into the "
                       "local deployment registry (served by `bem serve`)",
                       description="Deploy the selected variants of a finished `bem run` folder. "
                       "Only variants its acceptance report PROMOTEd are deployed; any other is "
                       "refused with the report's reasons (exit status 1, nothing written). "
                       "Each deployment (model name bem-VARIANT) gets a new version, written "
                       "atomically with a manifest of SHA-256 digests and the acceptance "
                       "evidence. The first version is stable at once; a later one is rolled out "
                       "by `bem serve` as a canary in steps, judged on live metrics and rolled "
                       "back automatically when the canary gate fails. Prints the "
                       "DeploymentStatus as JSON.")
    p.add_argument("run", type=Path, help="the run folder (holds state.json and acceptance.json)")
    p.add_argument("variants", nargs="+", help="variant names, e.g. V1 V3")
    p.add_argument("--registry", type=Path, default=None,
                   help="the deployment registry (default: $BEM_DEPLOYMENTS, else bem's cache)")
    p.add_argument("--name", type=_rename, action="append", default=[], metavar="VARIANT=NAME",
                   help="deploy VARIANT under model name NAME (default bem-VARIANT); repeatable")
    p.add_argument("--acceptance", type=Path, default=None,
                   help="the acceptance report to obey (default: RUN/acceptance.json)")
    p.add_argument("--steps", type=_fraction_list, default=(0.1, 0.5, 1.0),
                   help="the canary's traffic share at each rollout step (default 0.1,0.5,1)")
    p.add_argument("--min-requests", type=_positive_int, default=50,
                   help="requests each version answers in a step before it is judged "
                   "(default 50)")
    p.add_argument("--min-labels", type=_count, default=0,
                   help="task labels (POST /v1/feedback) each version needs before a step is "
                   "judged (default 0)")
    p.add_argument("--partial", action="store_true",
                   help="deploy the promoted variants even when others are refused")
    p.set_defaults(func=_cmd_deploy, parser=p)


def _cmd_deploy(args: argparse.Namespace) -> int:
    from bem.deploy import DeploymentRefused, RolloutPlan, deploy_production

    parser = args.parser
    try:
        plan = RolloutPlan(steps=args.steps, min_requests=args.min_requests,
                           min_labels=args.min_labels)
    except ValueError as exc:
        parser.error(f"--steps/--min-requests/--min-labels: {exc}")
    try:
        status = deploy_production(args.variants, args.run, registry=args.registry,
                                   names=dict(args.name), acceptance=args.acceptance,
                                   plan=plan, partial=args.partial)
    except DeploymentRefused as exc:
        sys.stderr.write("bem deploy: nothing deployed; refused:\n")
        for variant, reasons in exc.refused.items():
            sys.stderr.write(f"  {variant}:\n" + "".join(f"    - {r}\n" for r in reasons))
        return 1
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    sys.stdout.write(json.dumps(status.to_dict(), indent=2) + "\n")
    return 0 if status.ok else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    parser = args.parser
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is missing; install the server's dependencies with "
                     f"`pip install bem[serve]` (fastapi, uvicorn, prometheus_client)")
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bem.serve.app import create_app
    from bem.serve.models import adapter_models, base_model
    from bem.serve.server import run_server

    log_to_stderr(log, args.log_level.upper())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device in ("auto", "cpu"):    # without importing the experiments' trainer
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu")
    else:
        from bem.experiments.runner import resolve_device
        try:
            device = resolve_device(args.device)
        except ValueError as exc:
            parser.error(str(exc))
    with logging_redirect_tqdm(loggers=[log]):
        base = base_model(args.preset, device=device, progress=not args.no_progress)
    served = [base]
    for name, path in args.adapter:
        try:
            served += adapter_models(base.model, name, path)
        except (OSError, ValueError, TypeError) as exc:
            parser.error(f"--adapter {name}={path}: {exc}")
    rollouts = [] if args.no_registry else load_registry(args.registry, device=device)
    try:
        app = create_app(served, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         max_prefill_tokens=args.max_prefill_tokens,
                         request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
                         rollouts=rollouts)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    log.info("bem serve: http://%s:%d/v1 (models: %s)", args.host, args.port,
             ", ".join([r.name for r in rollouts] + [m.name for m in served]))
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def load_registry(registry: Path | None, *, device="cpu") -> list:
    """Every deployment of the registry (default: bem.deploy.default_registry()) as a Rollout,
    its files verified against their manifests. A deployment that cannot be loaded (a tampered
    stable version, a malformed state) is refused with an error in the log; the others are
    served."""
    from bem.deploy import default_registry, deployments
    from bem.serve.rollout import Rollout

    root = registry if registry is not None else default_registry()
    out = []
    for name in deployments(root):
        try:
            roll = Rollout.from_registry(root, name, device=device)
        except (OSError, ValueError, TypeError) as exc:
            log.error("bem serve: deployment %s refused: %s", name, exc)
            continue
        log.info("bem serve: deployment %s: stable %s%s", name, roll.stable,
                 f", canary {roll.candidate} at {roll.traffic:.0%}" if roll.candidate else "")
        out.append(roll)
    return out
