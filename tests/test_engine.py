"""bem.engine: continuous batching equals uncached recomputation token for token (greedy) for the
base and every adapter configuration — rows joining and leaving mid-generation, mixed experts in
one batch, chunked prefill, preemption when the KV pool runs out, chunk boundaries crossed while
decoding; per-chunk controls computed once per chunk; sampling, streaming; bad requests refused
without disturbing the others."""
import pytest
import torch

from bem.engine import Engine, SamplingParams
from bem.experiments.ar1 import attach_router
from bem.model import generate, new_kv_cache
from bem.modules.control import ChunkMemo
from test_model_generation import CONFIGS, V, _model, _prompts


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ar1_model():
    m = _model("lora-experts")
    attach_router(m, "AR1")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.bem_controller.macro_router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 2.0)
    return m


def _reference(m, prompt, n, **kw):
    return generate(m, [prompt], n, **kw)[0]


def _staggered(engine, prompts, lengths, experts=None, temps=None):
    """Requests join at different steps (one new request every other step) and leave when done;
    returns each request's tokens."""
    ids, outs, pending = [], {}, list(range(len(prompts)))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            i = pending.pop(0)
            ids.append(engine.add_request(
                prompts[i], SamplingParams(max_tokens=lengths[i]),
                experts=None if experts is None else experts[i],
                head_temperature=None if temps is None else temps[i],
                request_id=f"r{i}"))
        for o in engine.step():
            outs[o.request_id] = o.token_ids
        step += 1
    return [outs[f"r{i}"] for i in range(len(prompts))]


LENGTHS = [60, 130, 5, 190, 64, 127]       # 60, 127, 190: decode across 64/128/192
NEW = [12, 7, 20, 9, 3, 11]


@pytest.mark.parametrize("name", list(CONFIGS) + ["AR1"])
def test_staggered_batches_equal_recomputation(name):
    m = _ar1_model() if name == "AR1" else _model(name)
    prompts = _prompts(21, LENGTHS)
    temps = None
    if name == "V2":
        gen = torch.Generator().manual_seed(3)
        temps = [torch.rand(4, generator=gen, dtype=torch.float64) + 0.3 for _ in prompts]
    experts = None
    if name == "lora-experts":      # mixed experts per batch, −1 (no adapter) included
        experts = [[(i + c) % 4 - 1 for c in range(8)] for i in range(len(prompts))]
    engine = Engine(m, num_blocks=40, max_batch_size=4, max_prefill_tokens=100)
    out = _staggered(engine, prompts, NEW, experts, temps)
    for i, p in enumerate(prompts):
        kw = {}
        if experts is not None:
            kw["experts"] = torch.tensor([experts[i]])
        if temps is not None:
            kw["head_temperature"] = temps[i][None]
        assert out[i] == _reference(m, p, NEW[i], **kw), (name, i)
    assert engine.stats["decode_tokens"] > 0 and not engine.has_unfinished()
    assert engine.manager.stats().sequences == 0


def test_preemption_recomputes_and_loses_nothing():
    """A pool too small for all rows: the newest is preempted (blocks freed), re-queued first and
    recomputed from its prompt and generated tokens; every output still equals recomputation."""
    m = _model("V1-chunk")
    prompts = _prompts(4, [120, 100, 110, 90])
    engine = Engine(m, num_blocks=7, max_batch_size=4, max_prefill_tokens=512)
    out = engine.generate(prompts, SamplingParams(max_tokens=40))
    assert engine.stats["preemptions"] > 0
    for p, o in zip(prompts, out):
        assert o == _reference(m, p, 40)
    assert engine.manager.stats().sequences == 0


def test_chunked_prefill_does_not_stall_decoding_rows():
    m = _model("V4")
    engine = Engine(m, num_blocks=16, max_batch_size=4, max_prefill_tokens=32)
    short, long = _prompts(5, [10, 250])
    engine.add_request(short, SamplingParams(max_tokens=30), request_id="short")
    engine.step()                                   # short is prefilled, decoding from now on
    engine.add_request(long, SamplingParams(max_tokens=4), request_id="long")
    steps_with_short = 0
    outs = {}
    while engine.has_unfinished():
        got = {o.request_id: o for o in engine.step()}
        if "short" in got:
            steps_with_short += 1
        outs.update({k: o.token_ids for k, o in got.items()})
    # The long prompt takes 250 / 32 → 8 steps of prefill; the short row decodes in each.
    assert steps_with_short == 29
    assert outs["short"] == _reference(m, short, 30) and outs["long"] == _reference(m, long, 4)


def test_controls_are_computed_once_per_chunk(monkeypatch):
    """Routing runs at admission and once per chunk entered while decoding; modules' per-chunk
    values are recomputed only on steps where some row enters a chunk."""
    m = _ar1_model()
    calls = {"route": 0, "memo": 0}
    ctl = m.bem_controller
    route = ctl.route

    def counting_route(feats):
        calls["route"] += 1
        return route(feats)

    monkeypatch.setattr(ctl, "route", counting_route)
    get = ChunkMemo.get

    def counting_get(self, module, name, compute):
        if self.refresh and isinstance(module, torch.nn.Module):
            calls["memo"] += 1
        return get(self, module, name, compute)

    monkeypatch.setattr(ChunkMemo, "get", counting_get)
    engine = Engine(m, num_blocks=8, max_batch_size=2)
    prompt = _prompts(6, [100])[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=100))   # positions 100 … 199
    assert calls["route"] == 1 + 2                 # admission, then chunks 2 and 3
    n_lora = sum(1 for n, _ in m.named_modules() if n.endswith(("q_proj", "v_proj")))
    # Refresh steps: the first decode step, and the first tokens of chunks 2 and 3.
    assert calls["memo"] == 3 * n_lora
    assert out[0] == _reference(m, prompt, 100)


def test_sampling_is_seeded_per_request():
    m = _model("lora")
    p = _prompts(7, [20, 30])
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    alone = Engine(m).generate([p[0]], sp)[0]
    together = Engine(m).generate([p[1], p[0]], [SamplingParams(max_tokens=5, seed=3,
                                                                temperature=1.0), sp])[1]
    assert alone == together                       # independent of what else runs
    assert Engine(m).generate([p[0]], SamplingParams(max_tokens=12, temperature=0.8,
                                                     seed=12))[0] != alone
    # top_k=1 and a tiny top_p are greedy.
    greedy = _reference(m, p[0], 12)
    assert Engine(m).generate([p[0]], SamplingParams(max_tokens=12, temperature=1.0, top_k=1,
                                                     seed=1))[0] == greedy
    assert Engine(m).generate([p[0]], SamplingParams(max_tokens=12, temperature=1.0,
                                                     top_p=1e-9, seed=1))[0] == greedy


def test_stop_tokens_streaming_and_callbacks():
    m = _model("V3")
    p = _prompts(8, [40])[0]
    ref = _reference(m, p, 10)
    stop = ref[4]
    engine = Engine(m)
    seen = []
    streamed = list(engine.stream(p, SamplingParams(max_tokens=10, stop_token_ids=(stop,)),
                                  on_token=seen.append))
    assert streamed == seen == ref[:ref.index(stop) + 1]
    rid = engine.add_request(p, SamplingParams(max_tokens=10))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert [t for o in outs for t in o.new_token_ids] == ref
    assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_bad_requests_are_refused_without_disturbing_the_others():
    m = _model("lora-experts")
    engine = Engine(m, num_blocks=4, max_batch_size=2)
    p = _prompts(9, [30])[0]
    rid = engine.add_request(p, SamplingParams(max_tokens=6), experts=1)
    engine.step()
    bad = [
        (dict(prompt=[]), ValueError, "prompt: expected at least one token"),
        (dict(prompt=[1, V]), ValueError, r"prompt: token ids must be ints in \[0, 61\)"),
        (dict(prompt="abc"), TypeError, "prompt"),
        (dict(prompt=p, params=SamplingParams(max_tokens=5000)), ValueError, "max_positions"),
        (dict(prompt=p * 8, params=SamplingParams(max_tokens=20)), ValueError,
         "needs 5 KV blocks, more than the whole pool"),
        (dict(prompt=p, experts=3), ValueError, "unknown expert 3"),
        (dict(prompt=p, experts=[]), ValueError, "experts: expected at least 1 chunks"),
        (dict(prompt=p, params=SamplingParams(stop_token_ids=(V,))), ValueError, "stop_token_ids"),
        (dict(prompt=p, head_temperature=torch.tensor([1.0, -1.0])), ValueError,
         "head_temperature"),
        (dict(prompt=p, request_id=rid), ValueError, "request_id"),
    ]
    for kwargs, exc, match in bad:
        prompt = kwargs.pop("prompt")
        params = kwargs.pop("params", None)
        with pytest.raises(exc, match=match):
            engine.add_request(prompt, params, **kwargs)
    for kw, match in ((dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                      (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kw)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    final = [o for o in outs if o.request_id == rid and o.finished]
    assert len(final) == 1
    assert final[0].token_ids == _reference(m, p, 6, experts=torch.tensor([[1] * 4]))
    assert final[0].experts == [1]            # the chunk the request ran in
    assert not engine._requests             # finished requests are forgotten
    base = _model("base")
    with pytest.raises(ValueError, match="no chunk-routed"):
        Engine(base).add_request(p, experts=0)
    with pytest.raises(ValueError, match="cache"):
        Engine(m, cache=new_kv_cache(base.float(), 4))
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(m, max_batch_size=0)


def test_abort_frees_the_request():
    m = _model("lora")
    engine = Engine(m, num_blocks=8)
    p = _prompts(10, [50, 60])
    a = engine.add_request(p[0], SamplingParams(max_tokens=50))
    b = engine.add_request(p[1], SamplingParams(max_tokens=5))
    engine.step()
    engine.abort(a)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.token_ids for o in outs if o.finished] == [_reference(m, p[1], 5)]
    assert all(o.request_id == b for o in outs)
    assert not engine._requests
    assert engine.manager.stats().sequences == 0
    with pytest.raises(ValueError, match="request_id"):
        engine.abort(a)


def test_finished_requests_are_forgotten_and_ids_reusable():
    """A long-lived engine (a server) holds nothing for finished requests: their ids are free
    again and the engine's request table stays empty."""
    m = _model("lora")
    engine = Engine(m, num_blocks=8)
    p = _prompts(12, [20])[0]
    first = None
    for _ in range(3):
        engine.add_request(p, SamplingParams(max_tokens=3), request_id="same")
        while engine.has_unfinished():
            outs = engine.step()
        assert outs[-1].finished and not engine._requests
        first = first or outs[-1].token_ids
        assert outs[-1].token_ids == first


def test_generate_takes_one_expert_or_one_per_prompt():
    m = _model("lora-experts")
    engine = Engine(m, num_blocks=8)
    p = _prompts(13, [20, 70])
    one = engine.generate(p, SamplingParams(max_tokens=4), experts=2)
    each = engine.generate(p, SamplingParams(max_tokens=4), experts=[2, 2])
    assert one == each
    assert one[0] == _reference(m, p[0], 4, experts=torch.tensor([[2]]))
    with pytest.raises(ValueError, match="experts: expected one per prompt"):
        engine.generate(p, SamplingParams(max_tokens=4), experts=[2])


def test_outputs_report_the_expert_of_each_chunk():
    m = _model("lora-experts")
    engine = Engine(m, num_blocks=8)
    p = _prompts(14, [60])[0]
    plan = [2, 1, 0]
    rid = engine.add_request(p, SamplingParams(max_tokens=40), experts=plan)
    seen = {}
    while engine.has_unfinished():
        for o in engine.step():
            seen[len(o.token_ids)] = o.experts
    assert seen[1] == [2]                     # the prompt's chunk
    assert seen[5] == [2]                     # generated token 5 sits at position 64 …
    assert seen[6] == [2, 1]                  # … and is the first input of chunk 1
    assert seen[40] == [2, 1]
    assert rid not in engine._requests
