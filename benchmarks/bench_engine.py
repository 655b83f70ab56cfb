"""Benchmarks of bem.engine (issue 14, item 3):

1. latency: per-token decode latency at batch 1 through the Engine, each variant (V1, V3, V4,
   AR1, the full stack) against the static-LoRA baseline, in `bem run`'s setting (d_model 64,
   2 layers, learned positions, adapters sized by bem.experiments.systems.plan_systems) and at a
   realistic width (random-init d_model 1024, 8 layers, rotary, the same kinds at a comparable
   budget). Adapter weights are random and non-zero. Only decode steps are timed (prompt 100
   tokens, 100 new: decoding crosses the 128 and 192 chunk boundaries); systems are interleaved
   in every repeat; medians over repeats. A short profile (cProfile, per decode token) of every
   system that misses its goal shows where the time goes.
2. throughput: generated tokens/s at batch 1, 8, 32 with 4 LoRA experts (q, v) mixed per batch
   (request i pinned to expert i mod 4), bem's Engine against Hugging Face transformers
   `generate` + PEFT (`adapter_names`) on the same weights (LlamaForCausalLM loaded from bem's
   base, the PEFT adapters from bem's experts), on bem run's shape with rotary positions and on
   the wide model. First the greedy outputs are checked equal token for token (float32, and
   float64 when float32 ties flip an argmax).
3. overhead: the engine's own time per decode step outside the model's forward (Engine.stats, as
   Engine.overhead() computes it), as a fraction of the step, at batch 1, 8, 32.

    PYTHONPATH=python python benchmarks/bench_engine.py                        # all three parts
    PYTHONPATH=python python benchmarks/bench_engine.py --only latency         # one part
    PYTHONPATH=python python benchmarks/bench_engine.py --only latency --profile
    PYTHONPATH=python python benchmarks/bench_engine.py --quick                # smoke run

Torch and bem run on --threads threads (default 1: the 2-core machine is shared, and two
OpenMP threads on a loaded machine measure the load, not the code); --clock cpu times with the
calling thread's CPU time (one thread only), which other processes disturb far less.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import gc
import os
import pstats
import statistics
import sys
import time

import torch

import bem
from bem.attach import AdapterSpec, BemConfig, attach, bem_modules
from bem.engine import Engine, SamplingParams
from bem.experiments.config import AR1_SYSTEMS, ROUTED, RunConfig
from bem.experiments.systems import plan_systems
from bem.model import BemForCausalLM, TransformerConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402

VARIANTS = ("V1", "V3", "V4", "AR1", "full")
GOALS = {"V1": 1.10, "V3": 1.10, "V4": 1.10, "AR1": 1.10, "full": 1.20}
EXPERTS = 4
clock = time.perf_counter


# ---- models ---------------------------------------------------------------------------------

def settings(quick: bool) -> dict[str, TransformerConfig]:
    """name → base shape: bem run's model, and the realistic width (a smaller stand-in in
    --quick)."""
    wide = (TransformerConfig(vocab_size=1000, d_model=128, n_layers=2, n_heads=4, d_ff=344,
                              max_positions=512, positions="rotary") if quick else
            TransformerConfig(vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, d_ff=2816,
                              max_positions=512, positions="rotary"))
    return {"bem run (d 64, 2 layers)": RunConfig().model,
            ("quick stand-in (d 128, 2 layers)" if quick else "wide (d 1024, 8 layers)"): wide}


def describe(cfg: TransformerConfig) -> str:
    return (f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
            f"vocab {cfg.vocab_size}, {cfg.positions} positions, {cfg.mlp} MLP")


def new_base(cfg: TransformerConfig, seed: int = 0) -> BemForCausalLM:
    torch.manual_seed(seed)
    return BemForCausalLM(cfg).eval()


def build_shared(base: BemForCausalLM, spec, seed: int) -> BemForCausalLM:
    """bem.experiments.systems.build, except that the copy shares the base's parameters (so six
    systems of a 170M-parameter base fit in memory): attach wraps the base layers without
    changing their weights."""
    from bem.experiments.ar1 import attach_router
    from bem.modules.gate_shaping import GateShaping

    torch.manual_seed(seed)
    shared = {id(p): p for p in base.parameters()}
    model = attach(copy.deepcopy(base, shared), spec.config)
    if spec.name in ROUTED or spec.name in AR1_SYSTEMS:
        attach_router(model, "AR1" if spec.name in AR1_SYSTEMS else spec.name)
    if spec.shaper_hidden is not None:
        groups = model.bem_gate_shaper.num_groups
        model.bem_gate_shaper = GateShaping(base.config.d_model, groups,
                                            d_hidden=spec.shaper_hidden)
    return model.eval()


@torch.no_grad()
def randomize(model: BemForCausalLM, seed: int, std: float = 0.05) -> None:
    """Give every zero-initialised adapter parameter (LoRA B, gate and FiLM heads, Kronecker B,
    the controller's default feature) random values, so no module is the identity."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not bool(p.any()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def plan(base: BemForCausalLM, wide: bool):
    """Specs of the baseline and VARIANTS. bem run's setting: its own budget (3 % of the base's
    parameters). The wide model: a static LoRA of rank 16 on every q and v projection (3 % of a
    170M base would be rank ~150, far from typical LoRA use), the variants sized to it."""
    rc = RunConfig()
    if wide:
        c = base.config
        target = 2 * c.n_layers * 16 * 2 * c.d_model
        fraction = target / sum(p.numel() for p in base.parameters())
    else:
        fraction = rc.budget_fraction
    specs, budgets, _ = plan_systems(base, VARIANTS, fraction, rc.flops_seq_len,
                                     rc.trust_region)
    return specs, budgets


def request_kwargs(model: BemForCausalLM, gen: torch.Generator) -> dict:
    """The full stack's V2 gate temperatures (random, positive; gate shaping runs once per
    request, before prefill, so it is not part of decode)."""
    shaper = getattr(model, "bem_gate_shaper", None)
    if shaper is None:
        return {}
    return {"head_temperature": 0.5 + torch.rand(shaper.num_groups, generator=gen),
            "temperature_from": 0}


# ---- part 1: decode latency at batch 1 -----------------------------------------------------

def decode_seconds(engine: Engine, prompt: list[int], new: int, kw: dict) -> float:
    """Seconds per decode step of one request (its prefill step not counted)."""
    engine.add_request(prompt, SamplingParams(max_tokens=new), **kw)
    out = engine.step()                  # prefill (max_prefill_tokens ≥ prompt) → first token
    if len(out) != 1 or len(out[0].token_ids) != 1:
        raise RuntimeError("bench_engine: the prompt was not prefilled in one step")
    gc.disable()
    try:
        n, t0 = 0, clock()
        while engine.has_unfinished():
            engine.step()
            n += 1
        return (clock() - t0) / n
    finally:
        gc.enable()


def latency_part(args) -> list[str]:
    out = []
    for sname, cfg in settings(args.quick).items():
        wide = cfg.d_model > 64
        base = new_base(cfg)
        t = time.perf_counter()
        specs, budgets = plan(base, wide)
        models = {}
        for i, s in enumerate(specs):
            m = build_shared(base, s, seed=i)
            randomize(m, seed=100 + i)
            models[s.name] = m
        blocks = -(-(args.prompt + args.new) // 64) + 1
        engines = {n: Engine(m, num_blocks=blocks, max_batch_size=1,
                             max_prefill_tokens=max(512, args.prompt)) for n, m in models.items()}
        names = list(engines)
        setup = time.perf_counter() - t
        gen = torch.Generator().manual_seed(7)

        def prompt():
            return torch.randint(0, cfg.vocab_size, (args.prompt,), generator=gen).tolist()

        for n in names:                                          # warm-up
            decode_seconds(engines[n], prompt(), min(args.new, 8), request_kwargs(models[n], gen))
        repeats = args.repeats if not wide else args.wide_repeats
        samples = {n: [] for n in names}
        experts_seen: dict[str, set] = {}
        for r in range(repeats):
            p = prompt()
            order = names[r % len(names):] + names[:r % len(names)]   # rotate who goes first
            for n in order:
                samples[n].append(decode_seconds(engines[n], p, args.new,
                                                 request_kwargs(models[n], gen)))
                if n == "AR1":
                    experts_seen.setdefault(n, set()).update(
                        engines[n]._experts[0, :-(-(args.prompt + args.new) // 64)].tolist())
        med = {n: statistics.median(v) for n, v in samples.items()}
        b = med["baseline"]
        start = len(out)
        out.append(f"\n#### Decode latency at batch 1, {sname}: {describe(cfg)}; prompt "
                   f"{args.prompt}, {args.new} new tokens ({args.new - 1} timed decode steps), "
                   f"median of {repeats} interleaved repeats (setup {setup:.0f} s)\n")
        out.append("| system | trainable params | ms / token | ratio to baseline | paired ratios "
                   "(min–max) | goal | met |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        misses = []
        for n in names:
            paired = [v / w for v, w in zip(samples[n], samples["baseline"])]
            goal = GOALS.get(n)
            ok = "" if goal is None else ("yes" if med[n] / b <= goal else "**no**")
            if ok == "**no**":
                misses.append(n)
            out.append(f"| {n} | {budgets[n].trainable_parameters:,} | {1e3 * med[n]:.3f} | "
                       f"{med[n] / b:.2f}× | {min(paired):.2f}–{max(paired):.2f} | "
                       f"{'' if goal is None else f'≤ {goal:.2f}×'} | {ok} |")
        if "AR1" in experts_seen:
            out.append(f"\nAR1's experts over the prompt and decode chunks (−1: no adapter): "
                       f"{sorted(experts_seen['AR1'])}")
        print("\n".join(out[start:]), flush=True)
        if args.profile and misses:
            out.append(profile_table(engines, models, misses, prompt, args))
            print(out[-1], flush=True)
        del engines, models, base
        gc.collect()
    return out


def _profiled_decode(prof, engine, model, prompt, args, gen) -> int:
    engine.add_request(prompt, SamplingParams(max_tokens=args.new), **request_kwargs(model, gen))
    engine.step()
    steps = 0
    prof.enable()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    prof.disable()
    return steps


def _per_token(prof, steps: int) -> dict[str, tuple[float, float]]:
    rows = {}
    for (file, line, fn), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        where = fn if file == "~" else f"{os.path.basename(file)}:{line} {fn}"
        rows[where] = (tt / steps, nc / steps)
    return rows


def profile_table(engines, models, misses, prompt, args, top: int = 12, runs: int = 5) -> str:
    """cProfile self time per decode token (on this thread's CPU time, so other processes' time
    slices do not land in random functions) of each missing system and of the baseline, their
    requests interleaved (same prompts): the functions where the system spends the most more
    than the baseline. The profiler inflates Python-level costs alike for both."""
    gen = torch.Generator().manual_seed(11)
    lines = []
    for n in misses:
        profs = {k: cProfile.Profile(time.thread_time) for k in ("baseline", n)}
        steps = dict.fromkeys(profs, 0)
        for _ in range(runs):
            p = prompt()
            for k in profs:
                steps[k] += _profiled_decode(profs[k], engines[k], models[k], p, args, gen)
        rows, base = _per_token(profs[n], steps[n]), _per_token(profs["baseline"],
                                                                steps["baseline"])
        tot, btot = sum(v[0] for v in rows.values()), sum(v[0] for v in base.values())
        lines.append(f"\n##### Profile of {n}: cProfile self time per decode token, thread CPU "
                     f"time, {runs} requests each, interleaved with the baseline ({n} "
                     f"{1e6 * tot:,.0f} µs, baseline {1e6 * btot:,.0f} µs under the profiler: "
                     f"{1e6 * (tot - btot):+,.0f} µs)\n")
        lines.append(f"| function | calls / token ({n}) | {n} µs / token | baseline µs / token "
                     "| difference µs |")
        lines.append("|---|---:|---:|---:|---:|")
        keys = sorted(set(rows) | set(base), key=lambda k: rows.get(k, (0.0, 0))[0] -
                      base.get(k, (0.0, 0))[0], reverse=True)
        for k in keys[:top]:
            v, c = rows.get(k, (0.0, 0))
            bv = base.get(k, (0.0, 0))[0]
            lines.append(f"| `{k}` | {c:.3g} | {1e6 * v:.1f} | {1e6 * bv:.1f} | "
                         f"{1e6 * (v - bv):+.1f} |")
    return "\n".join(lines)


# ---- part 2: throughput against HF transformers + PEFT ---------------------------------------

def lora_experts(base: BemForCausalLM, rank: int, alpha: float) -> BemForCausalLM:
    """A copy of `base` (sharing its weights) with 4 LoRA experts on every q and v projection,
    random non-zero; routed per request (experts=e)."""
    torch.manual_seed(1)
    shared = {id(p): p for p in base.parameters()}
    m = attach(copy.deepcopy(base, shared), BemConfig(
        [AdapterSpec("lora", ["q_proj", "v_proj"], {"rank": rank, "alpha": alpha})],
        num_experts=EXPERTS))
    randomize(m, seed=3)
    return m.eval()


def hf_twin(base: BemForCausalLM, bem_model: BemForCausalLM, dtype: torch.dtype):
    """LlamaForCausalLM with bem's base weights, wrapped by PEFT with one LoRA adapter per bem
    expert (e0 … e3), lora_A/lora_B copied from bem's A[e]/B[e]."""
    import transformers
    from peft import LoraConfig, get_peft_model

    c = base.config
    if c.positions != "rotary" or c.mlp != "gated":
        raise ValueError("hf_twin: bem's model must use rotary positions and a gated MLP (Llama)")
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_positions, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    transformers.logging.set_verbosity_error()
    hf = transformers.LlamaForCausalLM(hc)
    missing = hf.load_state_dict(base.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    hf = hf.to(dtype).eval()
    lora = bem_modules(bem_model)
    first = next(iter(lora.values()))
    cfg = LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=["q_proj", "v_proj"],
                     lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(hf, cfg, adapter_name="e0")
    for e in range(1, EXPERTS):
        peft_model.add_adapter(f"e{e}", cfg)
    copied = 0
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not hasattr(mod, "lora_A") or "e0" not in getattr(mod, "lora_A", {}):
                continue
            src = lora[name.removeprefix("base_model.model.")]
            for e in range(EXPERTS):
                mod.lora_A[f"e{e}"].weight.copy_(src.lora_A[e])
                mod.lora_B[f"e{e}"].weight.copy_(src.lora_B[e])
                assert abs(mod.scaling[f"e{e}"] - src.scale) < 1e-12
            copied += 1
    assert copied == len(lora), (copied, len(lora))
    return peft_model.eval()


def hf_generate(peft_model, prompts: list[list[int]], new: int, experts: list[int]):
    ids = torch.tensor(prompts)
    out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              adapter_names=[f"e{e}" for e in experts], pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def bem_generate(engine: Engine, prompts, new: int, experts: list[int]):
    return engine.generate(prompts, SamplingParams(max_tokens=new), experts=list(experts))


def check_equal(model: BemForCausalLM, hf, n_prompt: int, new: int) -> tuple[str, bool]:
    """Greedy outputs of bem's Engine and HF+PEFT on 4 prompts (prompt 0 under experts 0 and
    1), batched with mixed experts in both."""
    gen = torch.Generator().manual_seed(21)
    ps = [torch.randint(0, model.config.vocab_size, (n_prompt,), generator=gen).tolist()
          for _ in range(3)]
    prompts, experts = [ps[0], ps[0], ps[1], ps[2]], [0, 1, 2, 3]
    ours = bem_generate(Engine(model, max_batch_size=4, num_blocks=16), prompts, new, experts)
    theirs = hf_generate(hf, prompts, new, experts)
    same = [a == t for a, t in zip(ours, theirs)]
    first = [next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), None)
             for a, t in zip(ours, theirs)]
    differ = ours[0] != ours[1]
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    msg = (f"{dtype}: {sum(same)}/4 greedy outputs equal token for token ({new} new tokens after "
           f"{n_prompt}-token prompts, experts 0–3 mixed in one batch; first differing token per "
           f"prompt: {first}); the same prompt under experts 0 and 1 gives "
           f"{'different' if differ else 'the SAME'} outputs")
    return msg, all(same) and differ


def tp_settings(quick: bool) -> dict[str, TransformerConfig]:
    """The throughput part's models: bem run's shape made Llama-compatible (rotary positions
    instead of learned ones), and the wide model."""
    small = dataclasses.replace(RunConfig().model, positions="rotary")
    return {"bem run's shape, rotary (d 64, 2 layers)": small,
            **{k: v for k, v in settings(quick).items() if v.d_model > 64}}


def _clock_name() -> str:
    return "thread CPU time" if clock is time.thread_time else "wall time"


def throughput_part(args) -> list[str]:
    out = []
    for sname, cfg in tp_settings(args.quick).items():
        if args.tp_only_wide and cfg.d_model == 64:
            continue
        out += throughput_setting(args, sname, cfg)
    return out


def throughput_setting(args, sname: str, cfg: TransformerConfig) -> list[str]:
    base = new_base(cfg)
    rank, alpha = 16, 32.0
    model = lora_experts(base, rank, alpha)
    out = [f"\n#### Throughput, {sname}: 4 LoRA experts (q, v; rank {rank}, alpha {alpha:g}) "
           f"mixed per batch, bem Engine vs HF transformers {_version('transformers')} generate + "
           f"PEFT {_version('peft')} (adapter_names); {describe(cfg)}; greedy; prompt "
           f"{args.tp_prompt}, {args.tp_new} new tokens per request\n"]
    hf = hf_twin(base, model, torch.float32)
    msg, ok = check_equal(model, hf, args.tp_prompt, args.check_new)
    out.append("Like-for-like check: " + msg + ".")
    if not ok:                 # float32 rounding may flip a near-tied argmax: check in float64
        base64 = copy.deepcopy(base).double()
        model64 = lora_experts(base64, rank, alpha)
        with torch.no_grad():              # the same adapter weights as the float32 model
            for p64, p32 in zip(model64.parameters(), model.parameters()):
                p64.copy_(p32)
        msg64, _ = check_equal(model64, hf_twin(base64, model64, torch.float64), args.tp_prompt,
                               args.check_new)
        out.append("Like-for-like check in " + msg64 + ".")
        del base64, model64
    print("\n".join(out), flush=True)
    gen = torch.Generator().manual_seed(5)
    repeats = args.tp_repeats if cfg.d_model > 64 else args.tp_repeats_small
    out.append("\n| batch | bem tokens/s | HF+PEFT tokens/s | bem / HF | bem s / run | "
               "HF s / run | goal |")
    out.append("|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(out[-2:]), flush=True)
    profiles = []
    for B in args.batches:
        engine = Engine(model, max_batch_size=B, num_blocks=B * -(-(args.tp_prompt + args.tp_new)
                                                                   // 64) + 2,
                        max_prefill_tokens=B * args.tp_prompt)
        experts = [i % EXPERTS for i in range(B)]

        def prompts():
            return [torch.randint(0, cfg.vocab_size, (args.tp_prompt,), generator=gen).tolist()
                    for _ in range(B)]  # noqa: B023

        runs = {"bem": lambda p: bem_generate(engine, p, args.tp_new, experts),  # noqa: B023
                "HF+PEFT": lambda p: hf_generate(hf, p, args.tp_new, experts)}  # noqa: B023
        warm = prompts()
        for fn in runs.values():
            fn([q[:8] for q in warm])            # warm-up: a short run
        t = {k: [] for k in runs}
        for r in range(repeats):
            p = prompts()
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                gc.collect()
                t0 = clock()
                res = runs[k](p)
                t[k].append(clock() - t0)
                assert all(len(x) == args.tp_new for x in res)
        bt, ht = statistics.median(t["bem"]), statistics.median(t["HF+PEFT"])
        tok = B * args.tp_new
        goal = ("≥ 2× (issue): " + ("met" if ht / bt >= 2 else "**missed**")) if B == 8 else ""
        out.append(f"| {B} | {tok / bt:,.1f} | {tok / ht:,.1f} | {ht / bt:.2f}× | {bt:.2f} | "
                   f"{ht:.2f} | {goal} |")
        print(out[-1], flush=True)
        if args.profile and B == 8:
            profiles.append(op_profile(runs, prompts()))
        runs.clear()                 # the engine (and its KV pool) goes when rebound
        gc.collect()
    out.append(f"\n(tokens/s = batch × {args.tp_new} new tokens / {_clock_name()} of the whole "
               f"generate call, prefill included; median of {repeats} repeats, bem and HF "
               f"alternating first)")
    out += profiles
    if profiles:
        print(profiles[-1], flush=True)
    return out


def op_profile(runs, prompts, top: int = 8) -> str:
    """torch.profiler's top operators by self CPU time of one batch-8 run of each system."""
    from torch.profiler import ProfilerActivity, profile

    lines = ["\n##### Where the time goes at batch 8 (torch.profiler, one run each, self CPU time "
             "of the top operators; the profiler inflates the many small calls)\n",
             "| system | operator | calls | self CPU ms | share |", "|---|---|---:|---:|---:|"]
    for name, fn in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(prompts)
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ev)
        for e in ev[:top]:
            lines.append(f"| {name} | `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:,.1f} "
                         f"| {100 * e.self_cpu_time_total / total:.1f} % |")
        lines.append(f"| {name} | (total) | | {total / 1e3:,.1f} | 100 % |")
    return "\n".join(lines)


def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md
        return md.version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


# ---- part 3: engine overhead -----------------------------------------------------------------

def overhead_part(args) -> list[str]:
    out = [f"\n#### Engine overhead per decode step (wall time in Engine.step outside the model's "
           f"forward: scheduling, KV bookkeeping, controls, sampling; Engine.stats over the "
           f"decode steps only), median of {args.oh_repeats} repeats ({args.oh_wide_repeats} on "
           f"the wide model, batch ≤ {args.oh_wide_max_batch}) after one warm-up round; "
           f"prompt {args.prompt} + {args.new} new tokens in bem run's setting, "
           f"{args.tp_prompt} + {args.tp_new} on the wide model (as in the throughput part)\n",
           "| setting | system | batch | step ms | forward ms | overhead ms | overhead / step |",
           "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(out), flush=True)
    for sname, cfg in settings(args.quick).items():
        wide = cfg.d_model > 64
        base = new_base(cfg)
        specs, _ = plan(base, wide)
        keep = {s.name: s for s in specs if s.name in ("baseline", "AR1", "full")}
        models = {}
        for i, (n, s) in enumerate(keep.items()):
            models[n] = build_shared(base, s, seed=i)
            randomize(models[n], seed=100 + i)
        gen = torch.Generator().manual_seed(9)
        n_prompt, n_new = (args.tp_prompt, args.tp_new) if wide else (args.prompt, args.new)
        per_req = -(-(n_prompt + n_new) // 64)
        for B in args.batches:
            if wide and B > args.oh_wide_max_batch:
                continue
            engines = {n: Engine(m, max_batch_size=B, num_blocks=B * per_req + 2,
                                 max_prefill_tokens=B * n_prompt) for n, m in models.items()}
            samples = {n: [] for n in engines}
            repeats = args.oh_wide_repeats if wide else args.oh_repeats
            for r in range(repeats + 1):
                p = [torch.randint(0, cfg.vocab_size, (n_prompt,), generator=gen).tolist()
                     for _ in range(B)]
                for n, e in engines.items():
                    for q in p:
                        e.add_request(q, SamplingParams(max_tokens=n_new),
                                      **request_kwargs(models[n], gen))
                    e.step()                         # prefill of every row, first tokens
                    s0 = dict(e.stats)
                    while e.has_unfinished():
                        e.step()
                    s = {k: e.stats[k] - s0[k] for k in ("steps", "step_seconds",
                                                         "forward_seconds")}
                    if r > 0:                        # the first round warms up
                        samples[n].append(s)
            for n, v in samples.items():
                step = statistics.median(x["step_seconds"] / x["steps"] for x in v)
                fwd = statistics.median(x["forward_seconds"] / x["steps"] for x in v)
                frac = statistics.median((x["step_seconds"] - x["forward_seconds"]) /
                                         x["step_seconds"] for x in v)
                out.append(f"| {sname} | {n} | {B} | {1e3 * step:.3f} | {1e3 * fwd:.3f} | "
                           f"{1e3 * (step - fwd):.3f} | {100 * frac:.1f} % |")
                print(out[-1], flush=True)
            del engines
            gc.collect()
    return out


# ---- main ------------------------------------------------------------------------------------

PARTS = {"latency": latency_part, "throughput": throughput_part, "overhead": overhead_part}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS),
                    help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch and bem threads (default 1)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: time.thread_time (needs --threads 1)")
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens (latency, overhead)")
    ap.add_argument("--new", type=int, default=100, help="new tokens (latency, overhead)")
    ap.add_argument("--repeats", type=int, default=15, help="latency repeats, bem run's setting")
    ap.add_argument("--wide-repeats", type=int, default=4, help="latency repeats, wide model")
    ap.add_argument("--profile", action="store_true",
                    help="latency: cProfile the systems that miss their goal; throughput: "
                         "torch.profiler's top operators at batch 8")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tp-prompt", type=int, default=32, help="throughput: prompt tokens")
    ap.add_argument("--tp-new", type=int, default=64, help="throughput: new tokens")
    ap.add_argument("--tp-repeats", type=int, default=3, help="throughput repeats, wide model")
    ap.add_argument("--tp-repeats-small", type=int, default=7,
                    help="throughput repeats, small model")
    ap.add_argument("--tp-only-wide", action="store_true",
                    help="throughput: skip the small model")
    ap.add_argument("--check-new", type=int, default=40,
                    help="throughput: new tokens of the equality check")
    ap.add_argument("--oh-repeats", type=int, default=3)
    ap.add_argument("--oh-wide-repeats", type=int, default=2)
    ap.add_argument("--oh-wide-max-batch", type=int, default=8,
                    help="overhead: largest batch run on the wide model")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.prompt, args.new, args.repeats, args.wide_repeats = 70, 8, 2, 1
        args.tp_prompt, args.tp_new, args.tp_repeats, args.check_new = 8, 4, 1, 4
        args.tp_repeats_small = 1
        args.oh_repeats, args.oh_wide_repeats, args.batches = 1, 1, [1, 4]
    global clock
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu: needs --threads 1 (it times the calling thread only)")
        clock = time.thread_time
    torch.set_num_threads(args.threads)
    bem.set_num_threads(args.threads)
    parts = args.only.split(",")
    for p in parts:
        if p not in PARTS:
            ap.error(f"--only: unknown part {p!r}; expected some of {','.join(PARTS)}")
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    print(f"Machine: {machine()}; bem {bem.__version__} ({bem.get_num_threads()} bem threads); "
          f"clock: {'thread CPU time' if clock is time.thread_time else 'wall time'}; {load} at "
          f"start")
    print(f"Command: PYTHONPATH=python python benchmarks/bench_engine.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(), flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in parts:
            t = time.perf_counter()
            PARTS[p](args)
            print(f"\n({p}: {time.perf_counter() - t:.0f} s)", flush=True)
    try:
        print("Load average at the end: %.2f %.2f %.2f" % os.getloadavg())
    except OSError:
        pass
    print(f"Total: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
