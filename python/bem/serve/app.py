"""The HTTP face of `bem serve`: a FastAPI app with OpenAI-compatible /v1/completions and
/v1/chat/completions (JSON, or server-sent events with `stream: true`), /v1/models, /health and
/metrics, in front of one GenerationWorker thread that owns the engines. Deployments in canary
rollout (bem.serve.rollout) answer under their own name, their traffic split between the stable
version and the canary; POST /v1/feedback takes task labels for the canary gate and GET
/v1/rollouts shows each rollout's state and history."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import math
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from bem.serve.metrics import ServeMetrics
from bem.serve.models import ServedModel, as_served_models
from bem.serve.protocol import (GenerationSpec, RequestError, TextDecoder, parse_chat,
                                parse_completion)
from bem.serve.rollout import Rollout, Ticket
from bem.serve.worker import Event, GenerationRequest, GenerationWorker, Overloaded, ShuttingDown

log = logging.getLogger("bem")

# Extra seconds the HTTP side waits beyond a request's timeout before it gives up on the worker
# (the worker itself aborts late requests at their deadline and answers 504).
_GRACE_S = 5.0
# How many answered requests of deployments in rollout can still receive feedback (by id).
_FEEDBACK_IDS = 100_000
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
                429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable",
                504: "timeout"}


class ServeState:
    """What the app's handlers share: the served models by name, the worker, the metrics and
    the limits."""

    def __init__(self, models: list[ServedModel], worker: GenerationWorker, metrics: ServeMetrics,
                 request_timeout: float, drain_timeout: float):
        self.models = {m.name: m for m in models}
        self.context = {m.name: m.model.config.max_positions for m in models}
        self.worker, self.metrics = worker, metrics
        self.request_timeout, self.drain_timeout = request_timeout, drain_timeout
        self.created = int(time.time())
        self.sink: _LoopSink | None = None      # bound to the serving event loop at start-up
        self.rollouts: dict[str, Rollout] = {}
        # Response id → (rollout, ticket) of the requests deployments in rollout answered.
        self.tickets: OrderedDict[str, tuple[Rollout, Ticket]] = OrderedDict()

    def remember(self, response_id: str, route: tuple[Rollout, Ticket]) -> None:
        self.tickets[response_id] = route
        while len(self.tickets) > _FEEDBACK_IDS:
            self.tickets.popitem(last=False)

    def begin_drain(self) -> None:
        """Refuse new requests (503); the outstanding ones go on to the end."""
        self.worker.drain(timeout=0)


def create_app(models, *, max_batch_size: int = 32, max_queue: int = 64,
               max_prefill_tokens: int = 512, num_blocks: int | None = None,
               request_timeout: float = 300.0, drain_timeout: float = 60.0,
               rollouts: Sequence[Rollout] = ()) -> FastAPI:
    """The FastAPI app serving `models` — a BemForCausalLM (named `bem-base`), a ServedModel, a
    list of them, or a dict name → model. The generation thread starts with the app (lifespan)
    and drains on shutdown (outstanding requests finish, at most `drain_timeout` s).

    max_batch_size, max_prefill_tokens, num_blocks: each engine's (bem.engine.Engine).
    max_queue: requests that may wait for a batch slot; beyond max_batch_size + max_queue
    outstanding requests the server answers 429 with Retry-After. request_timeout: seconds from
    arrival until an unfinished request is aborted (504, or an error event in a stream).
    rollouts: deployments (bem.serve.rollout.Rollout, e.g. Rollout.from_registry) served under
    their own names, each version also as `<name>:<version>`."""
    served = as_served_models(models)
    rollouts = list(rollouts)
    if not all(isinstance(r, Rollout) for r in rollouts):
        raise TypeError("rollouts: expected a list of bem.serve.rollout.Rollout")
    for r in rollouts:
        served += r.served_models()
    names = [m.name for m in served] + [r.name for r in rollouts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"models/rollouts: duplicate names {dup}")
    for name, v in (("request_timeout", request_timeout), ("drain_timeout", drain_timeout)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}: expected a number of seconds > 0, got {v!r}")
    metrics = ServeMetrics()
    worker = GenerationWorker(served, max_batch_size=max_batch_size, max_queue=max_queue,
                              max_prefill_tokens=max_prefill_tokens, num_blocks=num_blocks,
                              metrics=metrics)
    state = ServeState(served, worker, metrics, float(request_timeout), float(drain_timeout))
    for r in rollouts:
        state.rollouts[r.name] = r
        r.on_change = lambda roll, judgement: metrics.canary(roll.name, roll.state, roll.traffic,
                                                             judgement)
        metrics.canary(r.name, r.state, r.traffic)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.sink = _LoopSink(asyncio.get_running_loop())
        worker.start()
        log.info("bem serve: serving %s", ", ".join(state.models))
        try:
            yield
        finally:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(None, worker.drain, state.drain_timeout)
            if not done:
                log.warning("bem serve: %d requests still running after %.0f s; stopping anyway",
                            worker.outstanding, state.drain_timeout)
            await loop.run_in_executor(None, worker.stop)

    app = FastAPI(title="bem serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.bem = state

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.error is not None or (worker.draining is False and not worker.alive):
            return JSONResponse({"status": "error", "message": "the generation thread is not "
                                 "running"}, status_code=503)
        if worker.draining:
            return JSONResponse({"status": "draining", "outstanding": worker.outstanding},
                                status_code=503)
        return JSONResponse({"status": "ok", "models": list(state.models),
                             "deployments": {n: r.state for n, r in state.rollouts.items()},
                             "outstanding": worker.outstanding, "capacity": worker.capacity})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": state.created, "owned_by": "bem",
                "max_model_len": m.model.config.max_positions, "description": m.description}

    def deployment_card(r: Rollout) -> dict:
        stable = r.versions[r.stable]
        return {"id": r.name, "object": "model", "created": state.created, "owned_by": "bem",
                "max_model_len": stable.model.config.max_positions,
                "description": f"deployment {r.name} (stable {r.stable})",
                "rollout": r.snapshot()}

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list",
                             "data": [deployment_card(r) for r in state.rollouts.values()] +
                             [model_card(m) for m in state.models.values()]})

    @app.get("/v1/rollouts")
    async def list_rollouts() -> JSONResponse:
        return JSONResponse({"object": "list",
                             "data": [r.snapshot(history=True) for r in state.rollouts.values()]})

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        try:
            body = await _body(request)
            rid, score, violation = _parse_feedback(body)
        except RequestError as exc:
            return _error(exc.status, exc.param, str(exc), exc.code)
        route = state.tickets.get(rid)
        if route is None:
            return _error(404, "id", f"id: {rid!r} is not a recent answer of a deployment in "
                          f"rollout", "unknown_id")
        rollout, ticket = route
        counted = rollout.feedback(ticket, score=score, violation=violation)
        return JSONResponse({"object": "feedback", "id": rid,
                             "model": rollout.versions[ticket.version].name,
                             "counted": counted})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id in state.rollouts:
            return JSONResponse(deployment_card(state.rollouts[model_id]))
        m = state.models.get(model_id)
        if m is None:
            return _error(404, "model", f"model: {model_id!r} is not served here",
                          "model_not_found")
        return JSONResponse(model_card(m))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, "chat")

    return app


def _parse_feedback(body) -> tuple[str, float | None, bool | None]:
    if not isinstance(body, dict):
        raise RequestError(None, "body: expected a JSON object")
    unknown = sorted(set(body) - {"id", "score", "violation"})
    if unknown:
        raise RequestError(unknown[0], f"{unknown[0]}: unknown field (expected id, score, "
                           f"violation)")
    rid = body.get("id")
    if not isinstance(rid, str) or not rid:
        raise RequestError("id", "id: expected the id of a completion this server answered")
    score, violation = body.get("score"), body.get("violation")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or
                              not math.isfinite(score)):
        raise RequestError("score", f"score: expected a finite number, got {score!r}")
    if violation is not None and not isinstance(violation, bool):
        raise RequestError("violation", f"violation: expected true or false, got {violation!r}")
    if score is None and violation is None:
        raise RequestError("score", "score: give a score and/or a violation flag")
    return rid, None if score is None else float(score), violation


def _error(status: int, param: str | None, message: str, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"),
                                   "param": param, "code": code}},
                        status_code=status, headers=headers)


class _LoopSink:
    """The worker's events → the event loop of the app. Batches pile up under a lock and the
    loop is woken (call_soon_threadsafe) only when it has taken the previous ones, so a loop
    that lags behind the engine is not woken once per step; each choice's events go on its HTTP
    request's queue (request.key = (queue, choice index))."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[GenerationRequest, list[Event]]] = []

    def deliver(self, batch: list[tuple[GenerationRequest, list[Event]]]) -> None:
        with self._lock:
            wake = not self._pending
            self._pending.extend(batch)
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._dispatch)
            except RuntimeError:      # the loop is closed: nobody is listening any more
                pass

    def _dispatch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for req, events in batch:
            q, i = req.key
            q.put_nowait((i, events))


class _Choices:
    """The per-choice state of one HTTP request: its generation requests, text decoders,
    token counts and finish reasons."""

    def __init__(self, state: ServeState, spec: GenerationSpec, kind: str):
        self.state, self.spec, self.kind = state, spec, kind
        self.queue: asyncio.Queue = asyncio.Queue()
        served = state.models[spec.model]
        # Stop strings are matched on the text as it comes, so those requests stream internally.
        live = spec.stream or bool(spec.stop)
        self.requests = [GenerationRequest(served, p, sp, sink=state.sink, key=(self.queue, i),
                                           stream=live, timeout=state.request_timeout)
                         for i, (p, sp) in enumerate(zip(spec.prompts, spec.params))]
        self.text = [TextDecoder(spec.stop) for _ in self.requests]
        self.tokens = [0] * len(self.requests)
        self.finish: list[str | None] = [None] * len(self.requests)
        # A timer, not asyncio.wait_for per event (a task and a timer each): past the deadline
        # it queues the sentinel (-1, None), which next_events turns into a 504.
        self._timer = asyncio.get_running_loop().call_later(
            state.request_timeout + _GRACE_S, self.queue.put_nowait, (-1, None))
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.route: tuple[Rollout, Ticket] | None = None     # a deployment's version
        self.start = time.perf_counter()
        self.created = int(time.time())
        self._chunk_head: str | None = None

    @property
    def pending(self) -> bool:
        return any(f is None for f in self.finish)

    async def next_events(self) -> tuple[int, list[Event]]:
        return self._checked(await self.queue.get())

    def ready_events(self) -> list[tuple[int, list[Event]]]:
        """The events already queued (without waiting)."""
        out = []
        while not self.queue.empty():
            out.append(self._checked(self.queue.get_nowait()))
        return out

    def _checked(self, item: tuple[int, list[Event] | None]) -> tuple[int, list[Event]]:
        if item[0] < 0:
            raise RequestError(None, f"request timed out after {self.state.request_timeout:g} s",
                               status=504)
        return item

    def close(self) -> None:
        """The HTTP request is over: stop its timer, abort its unfinished generations."""
        self._timer.cancel()
        for r in self.requests:
            if not r.done:
                self.state.worker.cancel(r)

    def apply(self, i: int, events: list[Event]) -> Event | None:
        """Fold a choice's events into its state; returns an error event, if one came."""
        if self.finish[i] is not None:
            return None               # finished by a stop string; later events are stale
        dec = self.text[i]
        for ev in events:
            if ev.kind == "error":
                return ev
            if ev.kind == "tokens":
                dec.feed(ev.token_ids)
                self.tokens[i] += len(ev.token_ids)
            elif ev.kind == "done":
                if not self.requests[i].stream:
                    dec.feed(ev.token_ids)
                self.tokens[i] = len(ev.token_ids)
                dec.finish()
                self.finish[i] = "stop" if dec.stopped else ev.finish_reason
            if dec.stopped and self.finish[i] is None:
                self.finish[i] = "stop"
                self.state.worker.cancel(self.requests[i])
        return None

    def usage(self) -> dict:
        n = self.spec.n
        prompt = sum(len(self.spec.prompts[i]) for i in range(0, len(self.spec.prompts), n))
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def response(self) -> dict:
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": d.text},
                        "logprobs": None, "finish_reason": f}
                       for i, (d, f) in enumerate(zip(self.text, self.finish))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": d.text, "logprobs": None, "finish_reason": f}
                       for i, (d, f) in enumerate(zip(self.text, self.finish))]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.spec.model,
                "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event: `data: {chunk JSON}` (the fields every chunk shares are
        encoded once per request)."""
        if self._chunk_head is None:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            head = json.dumps({"id": self.id, "object": obj, "created": self.created,
                               "model": self.spec.model}, separators=(",", ":"))
            self._chunk_head = "data: " + head[:-1] + ',"choices":'
        tail = "" if usage is None else ',"usage":' + json.dumps(usage, separators=(",", ":"))
        return f"{self._chunk_head}{json.dumps(choices, separators=(',', ':'))}{tail}}}\n\n"

    def delta(self, i: int, text: str | None, finish: str | None = None,
              role: bool = False) -> dict:
        if self.kind == "chat":
            d: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                d["content"] = text
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(None, f"body: not valid JSON ({exc})") from None


async def _generate(state: ServeState, request: Request, kind: str) -> Response:
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    label = "-"
    metrics, worker = state.metrics, state.worker
    start = time.perf_counter()
    route: tuple[Rollout, Ticket] | None = None
    try:
        body = await _body(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str) and \
                body["model"] in state.rollouts:
            # A deployment: its rollout picks the version (stable or canary) that answers.
            rollout = state.rollouts[body["model"]]
            served, ticket = rollout.pick()
            body = {**body, "model": served.name}
            route = (rollout, ticket)
        if isinstance(body, dict) and body.get("model") in state.models:
            label = body["model"]
        if worker.draining:
            metrics.request(label, endpoint, 503)
            return _error(503, None, "server is shutting down", "shutting_down",
                          {"Retry-After": "5"})
        spec = parse_chat(body, state.context) if kind == "chat" else \
            parse_completion(body, state.context)
    except RequestError as exc:
        metrics.request(label, endpoint, exc.status)
        return _error(exc.status, exc.param, str(exc), exc.code)
    choices = _Choices(state, spec, kind)
    choices.route, choices.start = route, start
    try:
        worker.submit(choices.requests)
    except Overloaded as exc:
        metrics.request(label, endpoint, 429)
        return _error(429, None, str(exc), "rate_limit_exceeded",
                      {"Retry-After": str(exc.retry_after)})
    except ShuttingDown as exc:
        metrics.request(label, endpoint, 503)
        return _error(503, None, str(exc), "shutting_down", {"Retry-After": "5"})
    if spec.stream:
        return await _start_stream(choices, label, endpoint)
    try:
        while choices.pending:
            i, events = await choices.next_events()
            err = choices.apply(i, events)
            if err is not None:
                raise _event_error(err, kind)
    except RequestError as exc:
        metrics.request(label, endpoint, exc.status)
        _routed(choices, exc.status)
        return _error(exc.status, exc.param, str(exc), exc.code)
    finally:
        choices.close()
    metrics.request(label, endpoint, 200)
    _routed(choices, 200)
    return JSONResponse(choices.response())


def _routed(choices: _Choices, status: int) -> None:
    """Tell the rollout of a deployment how its version did: latency, whether the server failed
    the request (500, 504), the text."""
    if choices.route is None or 400 <= status < 500 or status == 503:   # not the version's
        return                        # fault: client errors, disconnects (499), shutting down
    rollout, ticket = choices.route
    if status == 200:
        choices.state.remember(choices.id, choices.route)
    try:
        rollout.record(ticket, latency=time.perf_counter() - choices.start, error=status >= 500,
                       text="".join(d.text for d in choices.text) if status == 200 else None)
    except Exception:         # judging must never fail the request
        log.exception("bem serve: recording a result of deployment %s failed", rollout.name)


def _event_error(ev: Event, kind: str) -> RequestError:
    param = ev.param
    if param == "prompt" and kind == "chat":
        param = "messages"
    return RequestError(param, ev.message, status=ev.status)


async def _start_stream(choices: _Choices, label: str, endpoint: str) -> Response:
    """Wait until the worker has accepted every choice (a refusal is still a plain JSON error),
    then answer with the event stream."""
    metrics = choices.state.metrics
    accepted: set[int] = set()
    early: list[tuple[int, list[Event]]] = []
    try:
        while len(accepted) < len(choices.requests):
            i, events = await choices.next_events()
            err = next((e for e in events if e.kind == "error"), None)
            if err is not None:
                raise _event_error(err, choices.kind)
            if any(e.kind == "accepted" for e in events):
                accepted.add(i)
            rest = [e for e in events if e.kind != "accepted"]
            if rest:
                early.append((i, rest))
    except RequestError as exc:
        choices.close()
        metrics.request(label, endpoint, exc.status)
        _routed(choices, exc.status)
        return _error(exc.status, exc.param, str(exc), exc.code)
    except BaseException:
        choices.close()
        raise
    if choices.route is not None:         # feedback may come before the stream ends
        choices.state.remember(choices.id, choices.route)
    return StreamingResponse(_events(choices, early, label, endpoint),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(choices: _Choices, early: list, label: str,
                  endpoint: str) -> AsyncIterator[str]:
    metrics = choices.state.metrics
    status = 499                      # client went away before the end
    try:
        if choices.kind == "chat":
            yield choices.chunk([choices.delta(i, None, role=True)
                                 for i in range(len(choices.requests))])
        backlog = list(early)
        sent_finish = [False] * len(choices.requests)
        while choices.pending:
            # Everything that has arrived goes out in one chunk (a client or loop that lags
            # behind the engine gets several tokens per chunk, not a backlog of chunks).
            batch = backlog or [await choices.next_events()]
            backlog = []
            batch += choices.ready_events()
            touched = []
            for i, events in batch:
                err = choices.apply(i, events)
                if err is not None:
                    raise _event_error(err, choices.kind)
                if i not in touched:
                    touched.append(i)
            out = []
            for i in touched:
                text, finish = choices.text[i].take(), choices.finish[i]
                if finish is not None and sent_finish[i]:
                    continue
                if text or finish is not None:
                    sent_finish[i] = finish is not None
                    out.append(choices.delta(i, text, finish))
            if out:
                yield choices.chunk(out)
        if choices.spec.include_usage:
            yield choices.chunk([], choices.usage())
        status = 200
        yield "data: [DONE]\n\n"
    except RequestError as exc:
        status = exc.status
        err = {"error": {"message": str(exc), "type": _ERROR_TYPES.get(exc.status, "error"),
                         "param": exc.param, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        choices.close()
        metrics.request(label, endpoint, status)
        _routed(choices, status)
