"""bem on a Hugging Face model against PEFT (issue 15, part 5).

A random-init ``LlamaForCausalLM`` (hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000,
float32) and 4 PEFT LoRA adapters (r 16, alpha 32, q_proj and v_proj, random A and B), saved by
peft and loaded by both sides from the same directories:

1. batch of 8 rows, row i with adapter i mod 4: bem's multi-expert LoRA
   (``bem.hf.peft_experts.load_peft_experts`` + a router pinning row i to expert i mod 4) against
   PEFT's mixed batch (``adapter_names``): prefill tokens/s (8 × prompt) and decode tokens/s
   (8 rows × steps, one token per row per step, with the KV cache);
2. bem routing per 64-token chunk (its chunk router) with the KV cache, against X-LoRA
   (``peft.XLoraConfig``: dense mixing of all 4 adapters per token, which needs use_cache=False):
   ``generate`` tokens/s end to end;
3. prefix reuse across ``generate`` calls (``bem.hf.prefix_cache.PrefixStore``, bem.kv's paged
   routing-keyed pool): requests sharing a system prompt, one at a time; the pool's hit rate and
   the time to first token (``generate(max_new_tokens=1)``) with and without the store.

Before timing, bem's logits are checked against PEFT's on the same mixed batch.
Times are this thread's CPU time with torch on one thread (a shared machine disturbs it far less
than wall time); medians of interleaved repeats.

    PYTHONPATH=python python benchmarks/bench_hf.py            # full run (a few minutes)
    PYTHONPATH=python python benchmarks/bench_hf.py --quick    # small smoke run
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

log = logging.getLogger("bench_hf")


class RowRouter(nn.Module):
    """Routes every chunk of row b to expert experts[b] (the benchmark's oracle: PEFT's
    adapter_names pins rows the same way)."""

    def __init__(self, experts: torch.Tensor):
        super().__init__()
        self.register_buffer("experts", experts)

    def forward(self, features):
        B, C, _ = features.shape
        return self.experts[:B, None].expand(B, C).contiguous(), None, None


def build(tmp: Path, hidden: int, layers: int, vocab: int, rank: int, n_adapters: int):
    import peft
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                                   num_hidden_layers=layers, num_attention_heads=8,
                                   num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=2048, use_cache=True)

    def base():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    paths = []
    for i in range(n_adapters):
        pm = peft.get_peft_model(base(), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                         target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        pm.save_pretrained(str(tmp / f"a{i}"))
        paths.append(str(tmp / f"a{i}"))
    return base, paths


def cpu_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="123", help="which parts to run (default 123)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import peft

    from bem.hf.peft_experts import load_peft_experts

    torch.set_num_threads(1)
    import bem
    bem.set_num_threads(1)
    hidden, layers, vocab = (128, 2, 1000) if ns.quick else (512, 8, 32000)
    B, prompt, steps = 8, (64 if ns.quick else 256), (8 if ns.quick else 32)
    x_prompt, x_new = (32, 4) if ns.quick else (64, 16)
    repeats = 2 if ns.quick else ns.repeats
    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    base, paths = build(tmp, hidden, layers, vocab, 16, 4)
    row_expert = torch.arange(B) % 4
    names = [f"e{int(e)}" for e in row_expert]

    bem_m = load_peft_experts(base(), paths)
    bem_m.bem_controller.set_macro_router(RowRouter(row_expert))
    peft_m = peft.PeftModel.from_pretrained(base(), paths[0], adapter_name="e0").eval()
    for i in range(1, 4):
        peft_m.load_adapter(paths[i], adapter_name=f"e{i}")

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, prompt), generator=gen)
    feed = torch.randint(0, vocab, (B, steps), generator=gen)
    print(f"### bem vs PEFT on HF Llama — {timing.machine()}, thread CPU time, 1 thread")
    print()
    if "1" in ns.parts:
        part1(bem_m, peft_m, ids, feed, names, repeats, B, prompt, steps, hidden, layers, vocab)
    if "2" in ns.parts:
        part2(base, paths, ids, hidden, repeats, B, x_prompt, x_new)
    if "3" in ns.parts:
        part3(paths, base, vocab, repeats, quick=ns.quick)
    return 0


def part1(bem_m, peft_m, ids, feed, names, repeats, B, prompt, steps, hidden, layers, vocab):
    with torch.no_grad():
        a = bem_m(input_ids=ids, use_cache=False).logits
        b = peft_m(input_ids=ids, use_cache=False, adapter_names=names).logits
    err = float((a - b).abs().max())
    log.info("check: max |bem − PEFT| logits on the mixed batch = %.2e", err)
    if err > 1e-3:
        raise SystemExit(f"bem and PEFT disagree (max |Δ| = {err:.2e})")

    def bem_run(k):
        def run():
            with torch.no_grad():
                out = bem_m(input_ids=ids, use_cache=True)
                cache = out.cache
                for s in range(k):
                    out = bem_m(input_ids=feed[:, s:s + 1], cache=cache, use_cache=True)
        return run

    def peft_run(k):
        def run():
            with torch.no_grad():
                out = peft_m(input_ids=ids, use_cache=True, adapter_names=names)
                cache = out.cache
                for s in range(k):
                    out = peft_m(input_ids=feed[:, s:s + 1], cache=cache, use_cache=True,
                                 adapter_names=names)
        return run

    fns = {"bem prefill": bem_run(0), "peft prefill": peft_run(0),
           "bem total": bem_run(steps), "peft total": peft_run(steps)}
    for f in fns.values():
        f()                                         # warm-up
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():                    # interleaved
            samples[k] += cpu_time(f, 1)
    med = {k: statistics.median(v) for k, v in samples.items()}
    pre = {s: B * prompt / med[f"{s} prefill"] for s in ("bem", "peft")}
    dec = {s: B * steps / max(med[f"{s} total"] - med[f"{s} prefill"], 1e-9)
           for s in ("bem", "peft")}

    print(f"LlamaForCausalLM hidden {hidden}, {layers} layers, vocab {vocab}, float32; 4 PEFT "
          f"LoRA adapters r 16 on q,v; batch {B}, row i → adapter i mod 4; medians of "
          f"{repeats}. Check: max |bem − PEFT| logits = {err:.1e}.")
    print()
    print("| phase | bem tokens/s | PEFT (adapter_names) tokens/s | bem / PEFT |")
    print("|---|---:|---:|---:|")
    print(f"| prefill ({B} × {prompt}) | {pre['bem']:,.0f} | {pre['peft']:,.0f} | "
          f"{pre['bem'] / pre['peft']:.2f}× |")
    print(f"| decode ({B} rows × {steps} steps) | {dec['bem']:,.1f} | {dec['peft']:,.1f} | "
          f"{dec['bem'] / dec['peft']:.2f}× |")
    print()


def part2(base, paths, ids, hidden, repeats, B, x_prompt, x_new):
    import peft

    from bem.hf.peft_experts import load_peft_experts

    # 2. bem chunk routing with the cache vs X-LoRA (dense mixing, no cache).
    chunk_m = load_peft_experts(base(), paths)
    with torch.no_grad():
        chunk_m.bem_controller.router.weight.normal_(
            0, 1.0, generator=torch.Generator().manual_seed(3))
    xbase = base()
    xbase.config.use_cache = False
    xl = peft.get_peft_model(xbase, peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=hidden, xlora_depth=2,
        adapters={str(i): p for i, p in enumerate(paths)})).eval()
    xids = ids[:, :x_prompt]
    mask = torch.ones_like(xids)

    def gen_bem():
        with torch.no_grad():
            chunk_m.generate(xids, attention_mask=mask, max_new_tokens=x_new,
                             min_new_tokens=x_new, do_sample=False, use_cache=True,
                             pad_token_id=0)

    def gen_xlora():
        with torch.no_grad():
            xl.generate(input_ids=xids, attention_mask=mask, max_new_tokens=x_new,
                        min_new_tokens=x_new, do_sample=False, use_cache=False, pad_token_id=0)

    gen_bem()
    gen_xlora()
    xs = {"bem": [], "xlora": []}
    for _ in range(max(1, repeats // 2 + 1)):
        xs["bem"] += cpu_time(gen_bem, 1)
        xs["xlora"] += cpu_time(gen_xlora, 1)
    xt = {k: B * x_new / statistics.median(v) for k, v in xs.items()}

    print(f"| generate ({B} × {x_prompt} prompt, {x_new} new) | tokens/s | vs X-LoRA |")
    print("|---|---:|---:|")
    print(f"| bem, chunk routing + KV cache | {xt['bem']:,.1f} | {xt['bem'] / xt['xlora']:.1f}× |")
    print(f"| X-LoRA (dense mixing, no cache) | {xt['xlora']:,.1f} | 1.0× |")
    print()


def part3(paths, base, vocab, repeats, *, quick):
    """Requests = a shared system prompt + their own question, one at a time (batch 1)."""
    from bem.hf.peft_experts import load_peft_experts
    from bem.hf.prefix_cache import PrefixStore

    m = load_peft_experts(base(), paths)
    with torch.no_grad():
        m.bem_controller.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    system_len, own, n_req = (128, 16, 4) if quick else (512, 32, 8)
    gen = torch.Generator().manual_seed(4)
    system = torch.randint(0, vocab, (system_len,), generator=gen)
    reqs = [torch.cat([system, torch.randint(0, vocab, (own,), generator=gen)])[None]
            for _ in range(n_req)]
    kw = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    store = PrefixStore(m, num_blocks=64)
    with_store, without = [], []
    for r in reqs:
        with_store += cpu_time(lambda: store.generate(r, **kw), 1)
        without += cpu_time(lambda: m.generate(r, use_cache=True, **kw), 1)
        a = store.generate(r, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        b = m.generate(r, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True,
                       pad_token_id=0)
        if not torch.equal(a, b):
            raise SystemExit("PrefixStore.generate and generate disagree")
    st = store.stats()
    hits = with_store[1:]
    print(f"| prefix reuse ({n_req} requests: {system_len}-token system prompt + {own} own, "
          "batch 1) | TTFT ms (median) |")
    print("|---|---:|")
    print(f"| generate, no reuse | {1e3 * statistics.median(without):,.1f} |")
    print(f"| PrefixStore, requests 2–{n_req} (hits) | {1e3 * statistics.median(hits):,.1f} |")
    print(f"| PrefixStore, request 1 (miss) | {1e3 * with_store[0]:,.1f} |")
    print()
    print(f"Pool hit rate {st.hit_rate:.1%} ({st.tokens_hit} of {st.tokens_queried} full-block "
          f"tokens queried; {3 * n_req} lookups incl. the 4-token output checks, all equal to "
          "plain generate).")


if __name__ == "__main__":
    sys.exit(main())
