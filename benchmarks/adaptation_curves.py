"""Learning curves of the adaptation domains (suite v3) on the cached default base: exact match on
the adaptation test split of the base, a static LoRA at the run's budget and four oracle-routed
LoRA experts of the same total size, after each number of training steps. Exact match here is
teacher-forced (every answer token is the argmax given the reference prefix: what greedy decoding
would produce), which needs one forward per batch instead of a generation loop.

    PYTHONPATH=python python benchmarks/adaptation_curves.py --steps 100,200,400,800
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bem.attach import AdapterSpec, BemConfig
from bem.experiments.base_model import load_or_pretrain
from bem.experiments.config import RunConfig
from bem.experiments.routing import oracle_experts, teacher_forced_exact_match
from bem.experiments.systems import SystemSpec, _attn_in, _params, _pattern, _spread, baseline_spec, build
from bem.experiments.training import train_lm
from bem.tasks import DOMAINS, generate_adaptation


def routed_spec(base, target: int, experts: int) -> SystemSpec:
    names = _attn_in(base.config.n_layers)

    def spec(total: int) -> SystemSpec:
        return SystemSpec("oracle", BemConfig([
            AdapterSpec("lora", [_pattern(n)], {"rank": r, "alpha": float(2 * r)})
            for n, r in _spread(total, names)], num_experts=experts))

    best = min(range(len(names), 20 * len(names)), key=lambda t: abs(_params(base, spec(t)) - target))
    return spec(best)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", default="100,200,400,800")
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()
    cfg = RunConfig.preset(args.preset)
    lr = args.lr if args.lr is not None else cfg.train_lr
    base, _ = load_or_pretrain(cfg.model, cfg.pretrain, progress=False)
    train = generate_adaptation("train", 1500, 750)
    test = generate_adaptation("test", args.eval, args.eval // 2)
    oracle_test = oracle_experts(test)
    rows = {"base": teacher_forced_exact_match(base, test)}
    target = round(cfg.budget_fraction * sum(p.numel() for p in base.parameters()))
    specs = {"static LoRA": baseline_spec(base, target), "oracle 4 experts": routed_spec(base, target, 4)}
    for name, spec in specs.items():
        for steps in [int(s) for s in args.steps.split(",")]:
            model = build(base, spec, 0)
            t = time.perf_counter()
            route = oracle_experts if spec.config.num_experts > 1 else None
            train_lm(model, train, steps=steps, batch_size=cfg.train_batch_size, lr=lr,
                     seed=0, warmup=max(1, steps // 20), progress=False, route=route)
            em = teacher_forced_exact_match(model, test, experts=oracle_test if route else None)
            rows[f"{name} {steps}"] = {**em, "train_s": round(time.perf_counter() - t, 1),
                                       "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            print(name, steps, json.dumps(rows[f"{name} {steps}"]), flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
