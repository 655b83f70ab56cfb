"""bem serve in-process (bem.serve.create_app + ServerThread on 127.0.0.1, a free port), spoken to
with the official openai client and raw HTTP: greedy completions, chats and streams equal offline
Engine generation for a base model and for adapter experts picked by the `model` field; seeded
sampling, stop strings, several prompts and choices; 400s naming the field; 404 for an unknown
model; 429 with Retry-After under overload; 504 on timeout; draining answers 503 while in-flight
requests finish; metrics; a bounded load test (64 clients, 200 requests)."""
from __future__ import annotations

import asyncio
import copy
import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from bem.attach import BemConfig, attach  # noqa: E402
from bem.engine import Engine, SamplingParams  # noqa: E402
from bem.serve import ServedModel, ServerThread, base_model, chat_prompt, create_app  # noqa: E402
from bem.tasks import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
# float64: greedy argmax must not depend on how the server happens to batch requests.
BASE = base_model("tiny").model.double()


def _adapted():
    m = copy.deepcopy(BASE)
    attach(m, BemConfig.preset("lora", rank=4, num_experts=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():      # move the experts away from their identity init
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return m.eval()


ADAPTED = _adapted()
MODELS = [ServedModel("bem-tiny", BASE),
          ServedModel("tiny-lora:expert-0", ADAPTED, experts=0),
          ServedModel("tiny-lora:expert-1", ADAPTED, experts=1),
          ServedModel("tiny-lora", ADAPTED)]          # the adapter's own router picks per chunk


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(MODELS, max_batch_size=16, max_queue=256,
                                 request_timeout=60)) as srv:
        yield srv


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="bem", max_retries=0, timeout=60)


_REF_ENGINES: dict[str, Engine] = {}


def _offline_ids(name: str, prompts: list[list[int]], params: list[SamplingParams]
                 ) -> list[list[int]]:
    """What the model generates offline (an Engine on a copy of the served model), batched."""
    served = next(m for m in MODELS if m.name == name)
    key = str(id(served.model))
    if key not in _REF_ENGINES:
        _REF_ENGINES[key] = Engine(copy.deepcopy(served.model), max_batch_size=64)
    return _REF_ENGINES[key].generate(prompts, params, experts=[served.experts] * len(prompts))


def _offline(name: str, prompt_ids, **params) -> str:
    sp = SamplingParams(stop_token_ids=(TOK.EOS,), **params)
    return TOK.decode(_offline_ids(name, [prompt_ids], [sp])[0])


def _raw(srv, method: str, path: str, body=None, headers=None):
    """(status, headers, decoded JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode()
        return resp.status, dict(resp.getheaders()), payload
    finally:
        conn.close()


def _slow(model, seconds: float):
    """A copy of `model` whose every forward sleeps `seconds` first (so a request is still
    running when the test acts on it)."""
    slow = copy.deepcopy(model)
    forward = slow.forward

    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    slow.forward = delayed
    return slow


PROMPTS = ["Compute 12+30 =", "Apply reverse to abc ->", "hello", "x" * 70]


def test_models_health_and_metrics(server):
    ids = [m.id for m in _client(server).models.list()]
    assert ids == [m.name for m in MODELS]
    status, _, body = _raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["models"] == ids
    status, _, card = _raw(server, "GET", "/v1/models/tiny-lora:expert-1")
    assert status == 200 and card["id"] == "tiny-lora:expert-1" and card["max_model_len"] == 320
    assert _raw(server, "GET", "/v1/models/nope")[0] == 404
    _client(server).completions.create(model="bem-tiny", prompt="hi", max_tokens=3,
                                       temperature=0)
    status, headers, text = _raw(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("bem_requests_total", "bem_request_errors_total", "bem_queue_length",
                 "bem_time_to_first_token_seconds_bucket", "bem_time_per_output_token_seconds",
                 "bem_generation_tokens_total", "bem_tokens_per_second",
                 "bem_kv_prefix_hit_rate", "bem_expert_tokens_total"):
        assert name in text, name
    assert 'bem_requests_total{endpoint="/v1/completions",model="bem-tiny",status="200"}' in text


@pytest.mark.parametrize("model", [m.name for m in MODELS])
def test_completions_greedy_equal_offline(server, model):
    client = _client(server)
    params = SamplingParams(max_tokens=20, stop_token_ids=(TOK.EOS,))
    ids = [TOK.encode(p, bos=True) for p in PROMPTS] + [[5, 7, 11, 13]]
    want = [TOK.decode(o) for o in _offline_ids(model, ids, [params] * len(ids))]
    for i in (0, 3):
        r = client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=20,
                                      temperature=0)
        assert r.choices[0].text == want[i], (model, PROMPTS[i])
        assert r.model == model and r.object == "text_completion"
        assert r.usage.prompt_tokens == len(ids[i])
        assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    # several prompts (text and token ids) in one request: one choice each, in order
    r = client.completions.create(model=model, prompt=PROMPTS + [ids[-1]], max_tokens=20,
                                  temperature=0)
    assert [c.index for c in r.choices] == list(range(len(ids)))
    assert [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == sum(map(len, ids))


def test_adapters_differ_from_base(server):
    client = _client(server)
    texts = {m: client.completions.create(model=m, prompt="x" * 70, max_tokens=20,
                                          temperature=0).choices[0].text
             for m in ("bem-tiny", "tiny-lora:expert-0", "tiny-lora:expert-1")}
    assert len(set(texts.values())) == 3, texts


def test_chat_greedy_equal_offline(server):
    client = _client(server)
    chats = [[{"role": "user", "content": "Compute 2+2 ="}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "first question"},
              {"role": "assistant", "content": "first answer"},
              {"role": "user", "content": [{"type": "text", "text": "second "},
                                           {"type": "text", "text": "question"}]}]]
    for model in ("bem-tiny", "tiny-lora"):
        for messages in chats:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                               temperature=0)
            ids = chat_prompt(messages)
            assert ids[0] == TOK.BOS and ids[-1] == TOK.SEP
            assert r.choices[0].message.content == _offline(model, ids, max_tokens=16)
            assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
            assert r.usage.prompt_tokens == len(ids)
    # the template: the earlier turn is padded to the 64-token chunk boundary
    ids = chat_prompt(chats[1])
    first = TOK.encode("Be brief.\nfirst question") + [TOK.SEP] + \
        TOK.encode("first answer", eos=True)
    assert ids[:1 + len(first)] == [TOK.BOS] + first
    assert ids[64:] == TOK.encode("second question") + [TOK.SEP]


def test_streaming_equals_non_streaming(server):
    client = _client(server)
    for model in ("bem-tiny", "tiny-lora:expert-1"):
        full = client.completions.create(model=model, prompt="stream me", max_tokens=24,
                                         temperature=0).choices[0].text
        chunks = list(client.completions.create(model=model, prompt="stream me", max_tokens=24,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full
        assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "length"
        messages = [{"role": "user", "content": "stream a chat"}]
        full = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                              temperature=0).choices[0].message.content
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        assert chunks[-2].choices[0].finish_reason == "length"


def test_sampling_is_seeded_and_several_choices(server):
    client = _client(server)
    kw = dict(model="bem-tiny", prompt="sample", max_tokens=16, temperature=0.9, top_p=0.95,
              seed=7)
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text
    assert a == _offline("bem-tiny", TOK.encode("sample", bos=True), max_tokens=16,
                         temperature=0.9, top_p=0.95, seed=7)
    r = client.completions.create(**kw, n=3)           # choice i samples with seed + i
    assert [c.text for c in r.choices][0] == a
    assert r.choices[2].text == _offline("bem-tiny", TOK.encode("sample", bos=True),
                                         max_tokens=16, temperature=0.9, top_p=0.95, seed=9)


def test_stop_strings(server):
    client = _client(server)
    full = client.completions.create(model="bem-tiny", prompt="hello", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = full[5:7]
    want = full[:full.find(stop)]
    r = client.completions.create(model="bem-tiny", prompt="hello", max_tokens=30,
                                  temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="bem-tiny", prompt="hello", max_tokens=30,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": "bem-tiny"}, "prompt"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": [1, 999]}, "prompt"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "max_tokens": 400}, "max_tokens"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "colour": 1}, "colour"),
    ("/v1/completions", {"model": "bem-tiny", "prompt": "hi", "stream_options": {}},
     "stream_options"),
    ("/v1/chat/completions", {"model": "bem-tiny"}, "messages"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [{"role": "bot",
                                                                  "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [{"role": "user",
                                                                  "content": 5}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [
        {"role": "user", "content": "x" * 400}]}, "messages"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [{"role": "user",
                                                                  "content": "a"}],
                              "max_completion_tokens": 1000}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "bem-tiny", "messages": [{"role": "user",
                                                                  "content": "a"}],
                              "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(server, path, body, param):
    status, _, payload = _raw(server, "POST", path, body)
    assert status == 400, payload
    err = payload["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert (param or "body").split("[")[0] in err["message"]


def test_unknown_model_is_404_and_client_raises(server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        _client(server).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _client(server).chat.completions.create(
            model="bem-tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)


def _post_json(port: int, path: str, body: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def test_overload_answers_429_with_retry_after():
    app = create_app(ServedModel("bem-tiny", _slow(BASE, 0.002)), max_batch_size=1,
                     max_queue=2)
    with ServerThread(app) as srv:
        results = []
        lock = threading.Lock()

        def one(i):
            r = _post_json(srv.port, "/v1/completions",
                           {"model": "bem-tiny", "prompt": f"load {i}", "max_tokens": 40,
                            "temperature": 0})
            with lock:
                results.append((i, r))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 12
        codes = sorted(s for _, (s, _, _) in results)
        assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        for i, (status, headers, body) in results:
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                assert body["error"]["code"] == "rate_limit_exceeded"
            else:
                assert body["choices"][0]["text"] == _offline(
                    "bem-tiny", TOK.encode(f"load {i}", bos=True), max_tokens=40)
        # nothing is stuck: once the burst is over the server answers again
        status, _, body = _raw(srv, "GET", "/health")
        assert status == 200 and body["outstanding"] == 0
        # the openai client sees a RateLimitError
        client = _client(srv)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client.completions.create, model="bem-tiny", prompt=str(i),
                                   max_tokens=60) for i in range(6)]
            errors = [f.exception(60) for f in futures]
        assert any(isinstance(e, openai.RateLimitError) for e in errors), errors


def test_timeout_answers_504():
    app = create_app(ServedModel("bem-tiny", BASE), request_timeout=0.05)
    with ServerThread(app) as srv:
        status, _, body = _post_json(srv.port, "/v1/completions",
                                     {"model": "bem-tiny", "prompt": "slow", "max_tokens": 300,
                                      "temperature": 0, "ignore_eos": True})
        assert status == 504 and "timed out" in body["error"]["message"]
        # streams end with an error event
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in _client(srv).completions.create(model="bem-tiny", prompt="slow",
                                                     max_tokens=300, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}):
                pass
        assert _raw(srv, "GET", "/health")[2]["outstanding"] == 0


def test_drain_finishes_in_flight_and_refuses_new():
    app = create_app(ServedModel("bem-tiny", _slow(BASE, 0.002)), max_batch_size=1,
                     max_queue=4)
    srv = ServerThread(app).start()
    try:
        results = {}

        def one(i):
            results[i] = _post_json(srv.port, "/v1/completions",
                                    {"model": "bem-tiny", "prompt": f"drain {i}",
                                     "max_tokens": 120, "temperature": 0})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while app.state.bem.worker.outstanding < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        srv.drain()
        status, headers, body = _raw(srv, "POST", "/v1/completions",
                                     {"model": "bem-tiny", "prompt": "late", "max_tokens": 2})
        assert status == 503 and headers["retry-after"] and "shutting down" in \
            body["error"]["message"]
        assert _raw(srv, "GET", "/health")[0] == 503
        for t in threads:
            t.join(60)
        for i in range(3):
            status, _, body = results[i]
            assert status == 200
            assert body["choices"][0]["text"] == _offline(
                "bem-tiny", TOK.encode(f"drain {i}", bos=True), max_tokens=120)
        srv._thread.join(30)          # the server exits by itself once drained
        assert not srv._thread.is_alive()
    finally:
        srv.stop()


def test_load_64_clients_200_requests(server, record_property):
    """No request lost or answered wrongly under 64 concurrent clients; throughput and
    latency percentiles are recorded (pytest's record_property, and printed)."""
    n_requests, n_clients = 200, 64
    jobs = [(("bem-tiny", "tiny-lora:expert-0", "tiny-lora")[i % 3], f"request {i} " * (1 + i % 5),
             4 + i % 13) for i in range(n_requests)]
    want = [None] * n_requests
    for name in {m for m, _, _ in jobs}:
        idx = [i for i, (m, _, _) in enumerate(jobs) if m == name]
        outs = _offline_ids(name, [TOK.encode(jobs[i][1], bos=True) for i in idx],
                            [SamplingParams(max_tokens=jobs[i][2], stop_token_ids=(TOK.EOS,))
                             for i in idx])
        for i, ids in zip(idx, outs):
            want[i] = (TOK.decode(ids), len(ids))

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="bem", max_retries=0,
                                    timeout=120)
        todo = list(enumerate(jobs))
        got, latency = {}, []

        async def worker():
            while todo:
                i, (m, p, k) = todo.pop()
                t = time.perf_counter()
                r = await client.completions.create(model=m, prompt=p, max_tokens=k,
                                                    temperature=0)
                latency.append(time.perf_counter() - t)
                got[i] = (r.choices[0].text, r.usage.completion_tokens)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(n_clients)]), 120)
        wall = time.perf_counter() - t0
        await client.close()
        return got, latency, wall

    got, latency, wall = asyncio.run(run())
    assert sorted(got) == list(range(n_requests))
    wrong = [i for i in range(n_requests) if got[i] != want[i]]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. request {wrong[0]}"
    tokens = sum(t for _, t in got.values())
    q = statistics.quantiles(latency, n=20)
    summary = {"requests": n_requests, "clients": n_clients, "seconds": round(wall, 2),
               "requests_per_s": round(n_requests / wall, 1), "tokens_per_s": round(tokens / wall),
               "p50_ms": round(1000 * statistics.median(latency), 1),
               "p95_ms": round(1000 * q[18], 1)}
    for k, v in summary.items():
        record_property(k, v)
    print("\nbem serve load test:", summary)


def test_client_disconnect_aborts_the_stream():
    app = create_app(ServedModel("slow", _slow(BASE, 0.01)))
    with ServerThread(app) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "slow", "prompt": "disconnect", "max_tokens": 300, "temperature": 0,
             "ignore_eos": True, "stream": True}).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type").startswith("text/event-stream")
        assert resp.read1(65536).startswith(b"data: {")      # the first event
        conn.close()                   # the client goes away mid-stream (300 tokens take > 3 s)
        deadline = time.monotonic() + 20
        while 'status="499"' not in _raw(srv, "GET", "/metrics")[2]:
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.01)
        while _raw(srv, "GET", "/health")[2]["outstanding"]:
            assert time.monotonic() < deadline, "the abandoned request was not aborted"
            time.sleep(0.01)
        # aborted, not finished: no request latency was recorded
        assert 'bem_request_latency_seconds_count{model="slow"}' not in \
            _raw(srv, "GET", "/metrics")[2]


def test_saved_adapter_is_served_like_the_original(tmp_path):
    from bem.serialization import save_pretrained
    from bem.serve import adapter_models

    save_pretrained(ADAPTED, tmp_path / "adapter")
    (served,) = adapter_models(BASE, "mine", tmp_path / "adapter")
    assert served.name == "mine" and served.model is not ADAPTED
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    params = SamplingParams(max_tokens=12)
    assert Engine(served.model).generate(prompts, params) == \
        _offline_ids("tiny-lora", prompts, [params] * len(prompts))
