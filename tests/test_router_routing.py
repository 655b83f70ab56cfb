"""Chunk routing inside a model: AR1 (bem.router.ar1.AR1Router, with rank budgets, bias scales and
the LoRA trust region) and the per-request router set through
ChunkController.set_macro_router (bem.experiments.ar1.attach_router). Cached generation through
the routing-keyed KV cache equals recomputation token for token while the plan switches experts
across chunk boundaries crossed during decoding (prefix hits and router changes included); a
whole-sequence forward equals token-by-token paged decoding at the logits level; plan-length
enforcement; explicit (B, C) experts in generate() and their validation."""
from __future__ import annotations

import pytest
import torch

from bem.attach import AdapterSpec, BemConfig, attach
from bem.experiments.ar1 import action_space, attach_router
from bem.model import AttentionBatch, BemForCausalLM, TransformerConfig, generate, new_kv_cache
from bem.router import ActionSpace
from bem.router.ar1 import AR1Router, PerRequestRouter

CFG = TransformerConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, d_ff=48,
                        max_positions=320)
E = 4
LENGTHS = (60, 130, 190)          # 60 → 80 and 190 → 210 cross a chunk boundary while decoding
NEW = 20
MODEL_SEED, PROMPT_SEED = 3, 7   # a model and prompts whose greedy AR1 plan switches there


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads only contend (10x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _model(router: str = "AR1", seed: int = MODEL_SEED) -> BemForCausalLM:
    """Tiny float32 model with 4 routed LoRA experts (trust region τ = 2) whose factors are far
    from their identity init, and `router` attached with randomised parameters (the initial AR1
    policy is uniform with mode "no adapter" and its Q-head zero, which would never switch)."""
    torch.manual_seed(seed)
    m = BemForCausalLM(CFG)
    attach(m, BemConfig([AdapterSpec("lora", ["q_proj", "v_proj"],
                                     {"rank": 3, "alpha": 6.0, "trust_region": 2.0})],
                        num_experts=E))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    attach_router(m, router)
    macro = m.bem_controller.macro_router
    if macro is not None:
        _randomise(macro, gen, 2.0)
    return m


def _prompts(seed: int = PROMPT_SEED, lengths=LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def _route(m: BemForCausalLM, seq: list[int]):
    """(experts, rank_budget, delta_scale) rows of the model's router over a whole sequence."""
    ids = torch.tensor([seq])
    C = (len(seq) - 1) // 64 + 1
    feats = m.bem_controller.features(ids, m.get_input_embeddings().weight, C)
    experts, budget, scale = m.bem_controller.route(feats)
    return (experts[0].tolist(), None if budget is None else budget[0].tolist(),
            None if scale is None else scale[0].tolist())


@pytest.fixture(scope="module")
def ar1():
    return _model("AR1")


@pytest.fixture(scope="module")
def ar1_generation(ar1):
    prompts = _prompts()
    cache = new_kv_cache(ar1, 32)
    cached = generate(ar1, prompts, NEW, cache=cache)
    return prompts, cached, generate(ar1, prompts, NEW), cache


def test_attach_router_and_action_space(ar1):
    assert action_space(3) == ActionSpace(E, (1, 3), (0.5, 1.0))
    assert action_space(1) == ActionSpace(E, (1,), (0.5, 1.0))
    ctl = ar1.bem_controller
    assert isinstance(ctl.macro_router, AR1Router) and ctl.router is None
    assert ctl.macro_router.action_space == action_space(3)
    # The router's parameters are part of the model's (budget, weights digest).
    names = {n for n, _ in ar1.named_parameters()}
    assert any(n.startswith("bem_controller.macro_router.policy.") for n in names)
    m = _model("per_request")
    assert isinstance(m.bem_controller.macro_router, PerRequestRouter)
    assert _model("oracle").bem_controller.macro_router is None
    with pytest.raises(ValueError, match="name"):
        attach_router(m, "greedy")


def test_plan_switches_experts_at_boundaries_crossed_while_decoding(ar1, ar1_generation):
    """Guard: without switches mid-generation the cache tests below would prove little."""
    prompts, out, _, _ = ar1_generation
    plans = [_route(ar1, p + o) for p, o in zip(prompts, out)]
    for (experts, budget, scale), p in zip(plans, prompts):
        assert len(experts) == (len(p) + NEW - 1) // 64 + 1
        assert set(budget) <= {1, 3} and set(scale) <= {0.5, 1.0}
    e0, e2 = plans[0][0], plans[2][0]
    assert e0[0] == -1 and e0[1] >= 0                    # adapter switched on at 64 (row 0)
    assert e2[2] >= 0 and e2[3] >= 0 and e2[2] != e2[3]  # expert A → expert B at 192 (row 2)
    # The plan is a prefix property: routing the prompt alone gives the same early chunks.
    for (experts, _, _), p in zip(plans, prompts):
        assert _route(ar1, p)[0] == experts[:(len(p) - 1) // 64 + 1]


def test_cached_generation_equals_uncached(ar1_generation):
    prompts, cached, uncached, cache = ar1_generation
    assert cached == uncached
    assert [len(o) for o in cached] == [NEW] * 3
    assert cache.manager.stats().tokens_hit == 0


def test_requests_sharing_a_prefix_with_different_routing(ar1, ar1_generation):
    """A later request reuses full blocks of an earlier one (one of them filled during decoding),
    then diverges so its routing differs from the earlier request's after the shared prefix;
    cached and uncached generation still agree."""
    prompts, first, _, cache = ar1_generation
    before = cache.manager.stats().tokens_hit
    gen = torch.Generator().manual_seed(99)
    tail = torch.randint(0, 256, (70,), generator=gen).tolist()
    second = [prompts[2][:128] + tail,                   # shares chunks 0–1, new chunk 2
              prompts[0] + first[0][:10]]                # shares the block filled while decoding
    out = generate(ar1, second, NEW, cache=cache)
    assert cache.manager.stats().tokens_hit - before == 128 + 64
    assert out == generate(ar1, second, NEW)
    old = _route(ar1, prompts[2] + first[2])
    new = _route(ar1, second[0] + out[0])
    # Chunk 2's action reads chunk 1 (shared): the same; chunk 3's reads chunk 2: different.
    assert old[0][:3] == new[0][:3] and old[0][3] >= 0 and new[0][3] >= 0
    assert old[0][3] != new[0][3]


def test_changing_the_router_never_serves_stale_blocks(ar1_generation):
    """Same prompts through the same cache after the router's parameters change: the blocks of
    the old routing are not reused, and generation equals recomputation under the new one."""
    prompts, _, _, _ = ar1_generation
    m = _model("AR1")
    cache = new_kv_cache(m, 32)
    first = generate(m, prompts, NEW, cache=cache)
    hits = cache.manager.stats().tokens_hit
    assert generate(m, prompts, NEW, cache=cache) == first       # same router: hits
    assert cache.manager.stats().tokens_hit > hits
    hits = cache.manager.stats().tokens_hit
    _randomise(m.bem_controller.macro_router, torch.Generator().manual_seed(1234), 2.0)
    out = generate(m, prompts, NEW, cache=cache)
    assert cache.manager.stats().tokens_hit == hits              # nothing reused
    assert out == generate(m, prompts, NEW)


class _DenseKV:
    """Minimal paged-K/V step (AttentionBatch.kv protocol) for one row: appends the new tokens'
    K/V per layer and returns the whole context."""

    def __init__(self):
        self.k, self.v, self.n = {}, {}, {}

    def write(self, layer, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], 1) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 1) if layer in self.v else v

    def read(self, layer):
        k = self.k[layer]
        pos = torch.arange(k.shape[1])[None]
        return (k.transpose(1, 2), self.v[layer].transpose(1, 2), pos,   # head-major (B, H, L, D)
                torch.ones_like(pos, dtype=torch.bool))


def test_whole_forward_equals_incremental_decoding_logits(ar1, ar1_generation):
    """Logits of a forward over the whole sequence (controls from the router over all chunks)
    equal those of incremental decoding (controls from the history so far), across the chunk
    boundaries where the plan switches, within 1e-5 in float32."""
    prompts, out, _, _ = ar1_generation
    seq = prompts[2] + out[2]                  # 210 tokens
    plan = _route(ar1, seq)[0]
    assert plan[0] == -1 and plan[1] >= 0 and plan[2] >= 0 and plan[2] != plan[3] >= 0
    ids = torch.tensor([seq])
    with torch.no_grad():
        full = ar1(ids)
        ctl, emb = ar1.bem_controller, ar1.get_input_embeddings().weight
        kv = _DenseKV()
        steps = [(0, 100)] + [(t, t + 1) for t in range(100, 135)] + [(135, 185)] + \
            [(t, t + 1) for t in range(185, len(seq))]
        pieces = []
        for a, b in steps:
            pos = torch.arange(a, b)[None]
            ctrl = ctl.control(ids[:, :b], pos, emb)
            batch = AttentionBatch(pos, torch.ones_like(pos, dtype=torch.bool), kv)
            pieces.append(ar1(ids[:, a:b], control=ctrl, batch=batch))
        inc = torch.cat(pieces, 1)
    assert inc.shape == full.shape
    err = (inc - full).abs().max().item()
    assert err <= 1e-5, err
    # The adapters matter here: the same forward without them differs by far more.
    with torch.no_grad():
        off = ar1(ids, control=ctl.control(ids, torch.arange(len(seq))[None], emb, experts=-1))
    assert (off - full).abs().max().item() > 1e3 * max(err, 1e-7)


def test_max_plan_length_one_uses_one_action_per_sequence(ar1):
    seqs = _prompts(3, (250, 250, 250, 250, 250, 250))
    ids = torch.tensor(seqs)
    feats = ar1.bem_controller.features(ids, ar1.get_input_embeddings().weight, 4)
    wide = ar1.bem_controller.macro_router
    wide(feats)
    assert int(wide.last_stats.plan_length.max()) > 1           # the bound will bind
    one = AR1Router(action_space(3), CFG.d_model, max_plan_length=1)
    one.load_state_dict(wide.state_dict())
    ar1.bem_controller.set_macro_router(one)
    try:
        experts, budget, scale = one(feats)
        assert one.last_stats.plan_length.tolist() == [1] * len(seqs)
        for b in range(len(seqs)):
            assert len({(int(e), int(k), float(s)) for e, k, s in
                        zip(experts[b], budget[b], scale[b])}) == 1
        # Random features (chunk 0 not the learned default): rows keep their chunk-0 action,
        # real experts included; a bound of 2 caps the rows that used 3 distinct actions.
        rand = torch.randn(8, 5, CFG.d_model, generator=torch.Generator().manual_seed(0))
        w = [t.clone() for t in wide(rand)]
        lengths = wide.last_stats.plan_length
        got = one(rand)
        assert one.last_stats.plan_length.tolist() == [1] * 8
        for t, ref in zip(got, w):
            assert torch.equal(t, ref[:, :1].expand_as(t))
        assert (got[0][:, 0] >= 0).any() and int(lengths.max()) == 3
        two = AR1Router(action_space(3), CFG.d_model, max_plan_length=2)
        two.load_state_dict(wide.state_dict())
        two(rand)
        assert two.last_stats.plan_length.tolist() == lengths.clamp(max=2).tolist()
        # Through the model: a forward and a cached generation respect the bound too.
        with torch.no_grad():
            ar1(ids)
        assert one.last_stats.plan_length.tolist() == [1] * len(seqs)
        p = _prompts()
        assert generate(ar1, p, NEW, cache=new_kv_cache(ar1, 32)) == generate(ar1, p, NEW)
        assert int(one.last_stats.plan_length.max()) == 1
    finally:
        ar1.bem_controller.set_macro_router(wide)


def test_per_request_router():
    m = _model("per_request")
    router = m.bem_controller.macro_router
    seqs = _prompts(5, [200] * 8)
    ids = torch.tensor(seqs)
    feats = m.bem_controller.features(ids, m.get_input_embeddings().weight, 4)
    experts, budget, scale = router(feats)
    assert budget is None and scale is None and experts.dtype == torch.int64
    assert (experts[:, 0] == -1).all()
    assert (experts[:, 1:] == experts[:, 1:2]).all()
    assert (experts[:, 1] == router.logits(feats).argmax(-1)).all()
    assert len(set(experts[:, 1].tolist())) > 1                   # requests differ
    # Chunk 1's expert depends on chunk 0's tokens only.
    changed = ids.clone()
    changed[:, 64:] = 7
    f2 = m.bem_controller.features(changed, m.get_input_embeddings().weight, 4)
    assert torch.equal(router(f2)[0], experts)
    assert router(feats[:, :1])[0].tolist() == [[-1]] * 8         # one chunk: no adapter
    p = _prompts()
    assert generate(m, p, NEW, cache=new_kv_cache(m, 32)) == generate(m, p, NEW)


def test_explicit_experts_equal_the_routers_routing():
    """generate(experts=(B, C)) reproduces a router's generation when given that router's
    routing, with or without the cache, and overrides the router (an oracle model with no router
    gives the same tokens)."""
    m = _model("per_request")
    prompts = _prompts(lengths=(60, 130))
    out = generate(m, prompts, NEW)
    C = (max(map(len, prompts)) + NEW - 1) // 64 + 1
    rows = []
    for p, o in zip(prompts, out):
        e = _route(m, p + o)[0]
        rows.append(e + [e[-1]] * (C - len(e)))
    experts = torch.tensor(rows, dtype=torch.int64)
    assert (experts[:, 1:] >= 0).all() and experts[0, 1] != experts[1, 1]   # routed, differently
    assert generate(m, prompts, NEW, experts=experts) == out
    assert generate(m, prompts, NEW, experts=experts, cache=new_kv_cache(m, 16)) == out
    oracle = _model("per_request")
    oracle.bem_controller.set_macro_router(None)
    assert generate(oracle, prompts, NEW, experts=experts) == out
    with pytest.raises(RuntimeError, match="controls chose none"):
        generate(oracle, prompts, 2)
    # A different routing gives a different generation (the experts matter).
    other = torch.tensor([[-1, 3, 2], [-1, 2, 3]])
    assert generate(m, prompts, NEW, experts=other) != out


def test_explicit_experts_override_ar1(ar1):
    prompts = _prompts(lengths=(60, 130))
    experts = torch.tensor([[-1, 2, 1], [0, 3, 3]])
    want = generate(ar1, prompts, NEW, experts=experts)
    assert generate(ar1, prompts, NEW, experts=experts, cache=new_kv_cache(ar1, 16)) == want
    assert want != generate(ar1, prompts, NEW)      # AR1's own routing differs


@pytest.mark.parametrize("bad", [
    torch.zeros(3, 3, dtype=torch.int64),                  # wrong B
    torch.zeros(2, 2, dtype=torch.int64),                  # 150 tokens reach 3 chunks
    torch.tensor([[0, -2, 0], [0, 0, 0]]),                 # ids < −1
    torch.zeros(2, 3),                                     # float dtype
    torch.zeros(2, 3, dtype=torch.int32),                  # not int64
    torch.zeros(3, dtype=torch.int64),                     # not (B, C)
])
def test_bad_experts_tensor(ar1, bad):
    with pytest.raises(ValueError, match="experts"):
        generate(ar1, _prompts(lengths=(60, 130)), NEW, experts=bad)


def test_full_stack_with_ar1_cached_generation_equals_uncached():
    """full_AR1's shape: the full stack with dynamic-rank experts routed by AR1 (rank budget
    within the active k, bias scale, "no adapter"): cached generation equals recomputation while
    the plan changes actions at chunk boundaries crossed during decoding."""
    from bem.attach import ROLES

    roles = ROLES["llama"]
    torch.manual_seed(MODEL_SEED)
    m = BemForCausalLM(CFG)
    attach(m, BemConfig([AdapterSpec("head_gating", roles["attn_out"]),
                         AdapterSpec("dynamic_rank", roles["attn_in"],
                                     {"rank": 4, "active": 2, "alpha": 8.0}),
                         AdapterSpec("kronecker", roles["mlp_down"]),
                         AdapterSpec("film", roles["mlp"], {"d_hidden": 4})], num_experts=E))
    gen = torch.Generator().manual_seed(MODEL_SEED + 1)
    with torch.no_grad():                    # adapters far from their identity init
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    attach_router(m, "AR1")
    router = m.bem_controller.macro_router
    assert router.action_space == action_space(2)        # budgets up to the active k
    _randomise(router, gen, 2.0)
    prompts = _prompts()
    cached = generate(m, prompts, NEW, cache=new_kv_cache(m, 32))
    assert cached == generate(m, prompts, NEW)
    actions = {tuple(zip(*_route(m, p + o))) for p, o in zip(prompts, cached)}
    assert len({a for plan in actions for a in plan}) > 2    # guard: the plans do change actions
