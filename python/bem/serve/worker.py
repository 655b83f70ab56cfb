"""The generation worker of `bem serve`: one background thread owns the engines (one per served
model object) and is their only caller. Requests arrive through a thread-safe inbox; their
events (accepted, new tokens, done, error) go back through each request's EventSink, once per
worker iteration for all of that sink's requests (one wake-up of an event loop per engine step,
not one per request). At most `capacity` requests are outstanding (running or queued); beyond
that submit() refuses (back-pressure, HTTP 429). Deadlines abort late requests; drain() refuses
new requests and lets the outstanding ones finish (graceful shutdown)."""
from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bem.engine import Engine, SamplingParams
from bem.serve.metrics import ServeMetrics
from bem.serve.models import ServedModel

log = logging.getLogger("bem")

# How long the idle worker sleeps between checks of deadlines and the stop flag.
_IDLE_WAIT_S = 0.25
# How often the worker refreshes the queue / KV / throughput gauges.
_PUBLISH_EVERY_S = 0.5


class Overloaded(RuntimeError):
    """The worker holds `capacity` outstanding requests; retry after `retry_after` seconds."""

    def __init__(self, capacity: int, retry_after: int):
        super().__init__(f"server busy: {capacity} requests outstanding (the limit); retry after "
                         f"{retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The worker is draining or stopped and takes no new requests."""


@dataclass
class Event:
    """What the worker tells a request. kind: "accepted" (queued in its engine; stream requests
    only), "tokens" (token_ids: this step's new tokens; stream requests only), "done"
    (token_ids: every generated token; finish_reason "stop" — end of sequence — or "length"),
    "error" (status: HTTP status, message, param: the request field at fault or None)."""

    kind: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    status: int = 0
    message: str = ""
    param: str | None = None


class EventSink(Protocol):
    """Where a request's events go. deliver() is called on the worker thread, once per worker
    iteration, with (request, its new events) for every request of this sink that has some; it
    must be quick and must not call the worker back synchronously."""

    def deliver(self, batch: list[tuple[GenerationRequest, list[Event]]]) -> None: ...


class GenerationRequest:
    """One generation: prompt token ids, sampling params, the served model it runs on.

    sink: where its events go (EventSink); key: anything the sink needs to route them.
    stream: deliver "accepted" and per-step "tokens" events (else only "done" or "error").
    timeout: seconds from submission until the worker aborts the request with a 504 error
    event."""

    __slots__ = ("id", "served", "prompt_ids", "params", "stream", "sink", "key", "timeout",
                 "submitted", "deadline", "first_token", "done")
    _ids = itertools.count()

    def __init__(self, served: ServedModel, prompt_ids: Sequence[int], params: SamplingParams, *,
                 sink: EventSink, key: Any = None, stream: bool = False,
                 timeout: float = 600.0):
        if not isinstance(served, ServedModel):
            raise TypeError(f"served: expected ServedModel, got {type(served).__name__}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if not callable(getattr(sink, "deliver", None)):
            raise TypeError("sink: expected an object with a deliver(batch) method")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout: expected a finite number of seconds > 0, got {timeout!r}")
        self.id = f"gen-{next(self._ids)}"
        self.served, self.prompt_ids, self.params = served, list(prompt_ids), params
        self.stream, self.sink, self.key, self.timeout = stream, sink, key, float(timeout)
        self.submitted = self.deadline = 0.0
        self.first_token: float | None = None
        self.done = False


class GenerationWorker:
    """The thread that owns the engines.

    models: the served models; one Engine per distinct model object (names sharing a model
    share its engine, its KV cache and its prefix reuse). max_batch_size, max_prefill_tokens,
    num_blocks: each Engine's. max_queue: requests that may wait beyond the running ones;
    capacity = max_batch_size + max_queue outstanding requests in all. metrics: where the worker
    records latency, tokens, queue length, KV hit rate and expert usage (None: nowhere).

    start() runs the thread; submit() queues requests (from any thread); cancel() aborts one;
    drain(timeout) stops taking requests and waits for the outstanding ones; stop() ends the
    thread (aborting what is left)."""

    def __init__(self, models: Sequence[ServedModel], *, max_batch_size: int = 32,
                 max_queue: int = 64, max_prefill_tokens: int = 512,
                 num_blocks: int | None = None, metrics: ServeMetrics | None = None):
        for name, v, lo in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        self.models = list(models)
        self.capacity = max_batch_size + max_queue
        self.metrics = metrics
        # Engines are built here, on the caller's thread, before the worker exists; from start()
        # on only the worker thread touches them.
        self._engines: dict[int, Engine] = {}
        for m in self.models:
            if id(m.model) not in self._engines:
                self._engines[id(m.model)] = Engine(m.model, max_batch_size=max_batch_size,
                                                    max_prefill_tokens=max_prefill_tokens,
                                                    num_blocks=num_blocks)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._closed = False            # drain() or stop(): submit() refuses
        self._stop = False
        self._live: dict[str, GenerationRequest] = {}   # submitted to an engine, unfinished
        self._outbox: dict[int, tuple[EventSink, list]] = {}   # this iteration's events by sink
        self._engine_of: dict[str, Engine] = {}
        self._thread: threading.Thread | None = None
        self._mean_seconds = 1.0        # moving average of request duration (for Retry-After)
        self._tokens_since_publish = 0
        self._last_publish = time.perf_counter()
        self.error: BaseException | None = None       # what ended the thread, if it died

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("GenerationWorker.start: already started")
        self._thread = threading.Thread(target=self._run, name="bem-serve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue the requests (all or none). Raises Overloaded when they would exceed capacity,
        ShuttingDown once draining or stopped (or when the worker thread has died)."""
        requests = list(requests)
        with self._lock:
            if self._closed or not self.alive:
                raise ShuttingDown("server is shutting down" if self._closed else
                                   "the generation thread is not running")
            if self._outstanding + len(requests) > self.capacity:
                raise Overloaded(self.capacity,
                                 max(1, min(60, math.ceil(self._mean_seconds))))
            self._outstanding += len(requests)
            now = time.perf_counter()
            for r in requests:
                r.submitted, r.deadline = now, now + r.timeout
                # Under the lock: once the thread has closed the worker and emptied the inbox
                # for the last time, nothing more can arrive in it unanswered.
                self._inbox.put(("submit", r))

    def cancel(self, request: GenerationRequest) -> None:
        """Abort a request (client gone, stop string reached); nothing is delivered after."""
        self._inbox.put(("cancel", request))

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests; wait until none is outstanding (at most `timeout` s). Returns
        whether everything finished."""
        with self._idle:
            self._closed = True
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the thread: requests still outstanding get a 503 error event."""
        with self._lock:
            self._closed = True
            self._stop = True
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                busy = any(e.has_unfinished() for e in self._engines.values())
                self._take_inbox(block=not busy)
                self._expire()
                self._flush()
                for engine in self._engines.values():
                    if engine.has_unfinished():
                        self._step(engine)
                self._flush()
                self._publish()
            self._take_inbox(block=False)
            for req in list(self._live.values()):
                self._fail(req, 503, "server stopped before the request finished")
            self._flush()
        except BaseException as exc:          # a bug: fail everything loudly, never hang clients
            log.exception("bem serve: the generation thread died")
            self.error = exc
            with self._lock:
                self._closed = True
            for req in list(self._live.values()):
                self._fail(req, 500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._closed = True
            self._fail_inbox()
            self._flush()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, req = item
            if kind == "submit":
                self._admit(req)
            elif kind == "cancel":
                self._abort(req)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_inbox(self) -> None:
        while True:
            try:
                kind, req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit" and not req.done:
                self._retire(req, Event("error", status=503,
                                        message="server stopped before the request started"))

    def _admit(self, req: GenerationRequest) -> None:
        if req.done:
            return
        engine = self._engines[id(req.served.model)]
        try:
            engine.add_request(req.prompt_ids, req.params, request_id=req.id,
                               experts=req.served.experts)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            param = msg.split(":", 1)[0] if ":" in msg and " " not in msg.split(":", 1)[0] \
                else None
            self._retire(req, Event("error", status=400, message=msg, param=param))
            return
        self._live[req.id] = req
        self._engine_of[req.id] = engine
        if req.stream:
            self._send(req, [Event("accepted")])

    def _abort(self, req: GenerationRequest) -> None:
        if req.done:
            return
        engine = self._engine_of.get(req.id)
        if engine is not None:
            engine.abort(req.id)
        self._retire(req, None)

    def _expire(self) -> None:
        if not self._live:
            return
        now = time.perf_counter()
        for req in [r for r in self._live.values() if r.deadline <= now]:
            self._fail(req, 504, f"request timed out after {req.timeout:g} s")

    def _fail(self, req: GenerationRequest, status: int, message: str) -> None:
        engine = self._engine_of.get(req.id)
        if engine is not None:
            try:
                engine.abort(req.id)
            except ValueError:        # already finished inside the engine
                pass
            except Exception:         # a broken engine: the request is answered regardless
                log.exception("bem serve: aborting %s failed", req.id)
        self._retire(req, Event("error", status=status, message=message))

    def _step(self, engine: Engine) -> None:
        try:
            outs = engine.step()
        except Exception as exc:
            log.exception("bem serve: engine step failed; failing its requests")
            for req in [r for r in self._live.values() if self._engine_of.get(r.id) is engine]:
                self._fail(req, 500, f"internal error: {type(exc).__name__}: {exc}")
            return
        now = time.perf_counter()
        for out in outs:
            req = self._live.get(out.request_id)
            if req is None:
                continue
            self._tokens_since_publish += len(out.new_token_ids)
            if req.first_token is None:
                req.first_token = now
                if self.metrics is not None:
                    self.metrics.first_token(req.served.name, now - req.submitted)
            if out.finished:
                self._retire(req, Event("done", token_ids=list(out.token_ids),
                                        finish_reason=out.finish_reason), now,
                             tail=list(out.new_token_ids))
            elif req.stream:
                self._send(req, [Event("tokens", token_ids=list(out.new_token_ids))])

    def _retire(self, req: GenerationRequest, event: Event | None, now: float | None = None,
                tail: list[int] | None = None) -> None:
        """The request leaves the worker: deliver its last event (a stream request first gets
        `tail`, the finishing step's new tokens) and release its capacity (the engine forgets
        finished and aborted requests itself)."""
        if req.done:
            return
        req.done = True
        self._engine_of.pop(req.id, None)
        self._live.pop(req.id, None)
        now = time.perf_counter() if now is None else now
        if event is not None:
            if req.stream and tail:
                self._send(req, [Event("tokens", token_ids=tail), event])
            else:
                self._send(req, [event])
        if self.metrics is not None and event is not None and event.kind == "done":
            self.metrics.finished(req.served.name, req.served.expert_label, len(req.prompt_ids),
                                  len(event.token_ids), now - req.submitted,
                                  None if req.first_token is None else now - req.first_token)
        self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * (now - req.submitted)
        with self._idle:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    def _send(self, req: GenerationRequest, events: list[Event]) -> None:
        entry = self._outbox.get(id(req.sink))
        if entry is None:
            entry = self._outbox[id(req.sink)] = (req.sink, [])
        entry[1].append((req, events))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for sink, batch in outbox.values():
            try:
                sink.deliver(batch)
            except Exception:         # a broken consumer must not take the engines down
                log.exception("bem serve: delivering events to %r failed", sink)

    def _publish(self) -> None:
        now = time.perf_counter()
        if self.metrics is None or now - self._last_publish < _PUBLISH_EVERY_S:
            return
        waiting = sum(e.num_waiting for e in self._engines.values())
        running = sum(e.num_running for e in self._engines.values())
        hits = queried = 0
        for e in self._engines.values():
            s = e.manager.stats()
            hits, queried = hits + s.tokens_hit, queried + s.tokens_queried
        self.metrics.publish(queue_length=waiting + self._inbox.qsize(), running=running,
                             tokens_per_second=self._tokens_since_publish /
                             (now - self._last_publish),
                             kv_hit_rate=hits / queried if queried else 0.0)
        self._tokens_since_publish = 0
        self._last_publish = now
