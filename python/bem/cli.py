"""The ``bem`` command line: ``bem info`` and the subcommands of bem's subsystems."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import bem
from bem import _ext


def info_lines() -> list[str]:
    """What `bem info` prints: version, build options, compiled backends, what is usable now."""
    lines = [f"bem {bem.__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}"]
    if not _ext.available():
        lines.append(f"compiled core: NOT AVAILABLE ({_ext.load_error()}); ops use the torch reference")
        return lines
    C = _ext.C()
    build = C.build_info()
    lines.append(f"compiled core: yes ({build['compiler']})")
    if build["cuda"]:
        lines.append(f"CUDA kernels: built for architectures {build['cuda_architectures']}")
    else:
        lines.append("CUDA kernels: not built (no CUDA compiler at build time, or BEM_CUDA=OFF)")
    lines.append(f"CPU: {platform.machine()}, SIMD {C.cpu_simd_level()} (kernels use "
                 f"{C.kernel_simd_level()}), "
                 f"bem threads {C.num_threads()} of {os.cpu_count()} CPUs "
                 f"(threading: {C.threading_backend()})")
    n_dev = C.cuda_device_count()
    if build["cuda"]:
        if n_dev == 0:
            lines.append("CUDA devices: none usable (no driver or no device)")
        for i in range(n_dev):
            lines.append(f"CUDA device {i}: {C.cuda_device_description(i)}")
    lines.append(f"torch sees CUDA: {torch.cuda.is_available()}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bem", description=bem.__doc__.strip().splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bem {bem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, build options, compiled backends, devices")
    p_info.set_defaults(func=_cmd_info)
    from bem.stats import cli as stats_cli
    stats_cli.register(sub)
    from bem.experiments import cli as run_cli
    run_cli.register(sub)
    from bem.serve import cli as serve_cli
    serve_cli.register(sub)
    from bem.online import cli as online_cli
    online_cli.register(sub)
    from bem.safety import cli as safety_cli
    safety_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
