"""Benchmark of `bem serve` (issue 19, item 4): generated tokens/s of the HTTP server against
bem.engine called in-process on the same requests, and latency percentiles under load.

Workload: the chat prompts of the embedded suite's test split (bem.tasks, through bem serve's
chat template), greedy, each request generating exactly --max-tokens tokens (`ignore_eos`, so
every run does the same work) — and a second workload where answers end at EOS as usual (the
base answers in a few tokens: a request-overhead-bound load).

- engine: in-process bem.engine.Engine, --clients requests kept outstanding (closed loop: a
  finished request is replaced by the next one at once), max_batch_size --max-batch-size.
- generation thread alone: bem.serve's GenerationWorker in this process, the same closed loop
  through its thread-safe queue, no HTTP (what the server's threading and queues cost).
- server: `python -m bem serve` in a subprocess on 127.0.0.1 (same model, same max_batch_size,
  torch on --threads threads), driven by --clients concurrent HTTP/1.1 keep-alive connections
  from this process (a minimal asyncio client, so the client costs the 2 shared cores little),
  non-streaming and streaming (server-sent events; time to first token measured at the first
  text chunk).

Latency = submission → last token (engine) or request sent → response complete (server).
CPU ms / 1k tokens: CPU time of the engine's process (engine runs), of the generation thread
(thread alone), or of the server process (server runs; the client's CPU is not counted) per
1,000 generated tokens — on a shared, loaded machine wall-clock throughput measures the
scheduler's share as much as the code, CPU time much less so; "CPU efficiency" = engine CPU per
token / server CPU per token. Runs are interleaved (engine, thread alone, JSON, stream; a warm-up
round, then --repeats rounds, each with new prompts); tokens/s is the median over repeats,
"vs engine" the median (and range) of each repeat's ratio to the engine run next to it, latency
percentiles pool every repeat's requests.

    PYTHONPATH=python python benchmarks/bench_serve.py                     # bem-base (default)
    PYTHONPATH=python python benchmarks/bench_serve.py --preset tiny --requests 64  # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import torch

from bem.engine import Engine, SamplingParams
from bem.serve.models import base_model
from bem.serve.worker import GenerationRequest, GenerationWorker
from bem.tasks import ByteTokenizer, generate, prompt_tokens

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402

TOK = ByteTokenizer()


def workload(n: int) -> list[dict]:
    """n chat requests: the suite's test prompts (every task), cycled."""
    examples = generate("test", max(1, n // 5 + 1), seed=0)
    return [{"messages": [{"role": "user", "content": examples[i % len(examples)].prompt}]}
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ---- in-process engine ------------------------------------------------------------------------

def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int, ignore_eos: bool,
               clients: int) -> dict:
    cpu0 = time.process_time()
    params = SamplingParams(max_tokens=max_tokens,
                            stop_token_ids=() if ignore_eos else (TOK.EOS,))
    todo = list(enumerate(prompts))
    start: dict[str, tuple[int, float]] = {}
    latency, tokens, texts = [], 0, [None] * len(prompts)
    t0 = time.perf_counter()

    def submit():
        i, p = todo.pop(0)
        rid = engine.add_request(p, params, request_id=f"r{i}")
        start[rid] = (i, time.perf_counter())

    for _ in range(min(clients, len(todo))):
        submit()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                i, t = start.pop(out.request_id)
                latency.append(time.perf_counter() - t)
                tokens += len(out.token_ids)
                texts[i] = TOK.decode(out.token_ids)
                if todo:
                    submit()
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": tokens, "latency": latency, "texts": texts,
            "cpu": time.process_time() - cpu0}


class _ClosedLoop:
    """EventSink of run_worker: each finished request submits the next one (from the worker's
    thread: submit() only queues)."""

    def __init__(self, worker, todo: list, n: int):
        self.worker, self.todo, self.n = worker, todo, n
        self.latency, self.tokens, self.texts = [], 0, [None] * n
        self.finished = threading.Event()

    def deliver(self, batch) -> None:
        now = time.perf_counter()
        for req, events in batch:
            for e in events:
                if e.kind != "done":
                    continue
                self.latency.append(now - req.submitted)
                self.tokens += len(e.token_ids)
                self.texts[req.key] = TOK.decode(e.token_ids)
                if self.todo:
                    self.worker.submit([self.todo.pop(0)])
                if len(self.latency) == self.n:
                    self.finished.set()


def run_worker(worker, served, prompts: list[list[int]], max_tokens: int, ignore_eos: bool,
               clients: int) -> dict:
    """The server's generation thread without HTTP: same closed loop as run_engine."""
    params = SamplingParams(max_tokens=max_tokens,
                            stop_token_ids=() if ignore_eos else (TOK.EOS,))
    sink = _ClosedLoop(worker, [], len(prompts))
    sink.todo = [GenerationRequest(served, p, params, sink=sink, key=i)
                 for i, p in enumerate(prompts)]
    tid = worker._thread.native_id
    cpu0, t0 = thread_cpu_seconds(tid), time.perf_counter()
    worker.submit([sink.todo.pop(0) for _ in range(min(clients, len(prompts)))])
    if not sink.finished.wait(600):
        raise TimeoutError("run_worker: requests did not finish")
    return {"wall": time.perf_counter() - t0, "tokens": sink.tokens, "latency": sink.latency,
            "texts": sink.texts, "cpu": thread_cpu_seconds(tid) - cpu0}


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one thread of this process so far (Linux /proc)."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the server ------------------------------------------------------------------------------

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(preset: str, port: int, max_batch_size: int, max_queue: int,
                 threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(os.path.dirname(
               os.path.dirname(os.path.abspath(__file__))), "python"),
               os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bem", "serve", "--preset", preset, "--port", str(port),
         "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue),
         "--threads", str(threads), "--no-progress", "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 900          # pre-training the base, if not cached
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bem serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("bem serve did not become healthy")


async def _read_response(reader: asyncio.StreamReader, on_data=None) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            if on_data is not None:
                on_data(data)
            body += data
        return status, bytes(body)
    return status, await reader.readexactly(int(headers.get("content-length", 0)))


def run_server(proc: subprocess.Popen, port: int, bodies: list[dict], clients: int,
               stream: bool) -> dict:
    cpu0 = process_cpu_seconds(proc.pid)
    out = asyncio.run(drive_server(port, bodies, clients, stream))
    out["cpu"] = process_cpu_seconds(proc.pid) - cpu0
    return out


async def drive_server(port: int, bodies: list[dict], clients: int, stream: bool) -> dict:
    """Closed loop: `clients` keep-alive connections, each sends its next request when the
    previous one is answered."""
    todo = list(enumerate(bodies))
    latency, ttft, tokens, texts, errors = [], [], 0, [None] * len(bodies), 0

    async def client():
        nonlocal tokens, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while todo:
                i, body = todo.pop(0)
                payload = json.dumps({**body, "stream": stream,
                                      **({"stream_options": {"include_usage": True}}
                                         if stream else {})}).encode()
                t = time.perf_counter()
                first = []

                def on_data(data, first=first, t=t):
                    if not first and b'"content":"' in data:
                        first.append(time.perf_counter() - t)

                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(payload) + payload)
                status, data = await _read_response(reader, on_data if stream else None)
                latency.append(time.perf_counter() - t)
                if status != 200:
                    errors += 1
                    continue
                if stream:
                    events = [json.loads(line[6:]) for line in data.decode().split("\n")
                              if line.startswith("data: {")]
                    texts[i] = "".join(e["choices"][0]["delta"].get("content", "")
                                       for e in events if e["choices"])
                    tokens += events[-1]["usage"]["completion_tokens"]
                    ttft.extend(first)
                else:
                    doc = json.loads(data)
                    texts[i] = doc["choices"][0]["message"]["content"]
                    tokens += doc["usage"]["completion_tokens"]
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return {"wall": time.perf_counter() - t0, "tokens": tokens, "latency": latency,
            "ttft": ttft, "texts": texts, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    """Repeats of one run → median tokens/s, pooled latencies."""
    return {"tps": statistics.median(r["tokens"] / r["wall"] for r in runs),
            "cpu_per_k": statistics.median(1000 * 1000 * r["cpu"] / r["tokens"] for r in runs),
            "tokens": round(statistics.median(r["tokens"] for r in runs)),
            "requests": len(runs[0]["latency"]),
            "latency": [x for r in runs for x in r["latency"]],
            "ttft": [x for r in runs for x in r.get("ttft", [])],
            "errors": sum(r.get("errors", 0) for r in runs)}


def row(name: str, s: dict, ratios: list[float] | None, engine_cpu: float | None) -> str:
    lat = [1000 * x for x in s["latency"]]
    ttft = [1000 * x for x in s["ttft"]]
    ratio = (f"{statistics.median(ratios):.0%} ({min(ratios):.0%}–{max(ratios):.0%})"
             if ratios else "—")
    eff = f"{engine_cpu / s['cpu_per_k']:.0%}" if engine_cpu else "—"
    t = f"{percentile(ttft, 0.5):.0f} / {percentile(ttft, 0.95):.0f}" if ttft else "—"
    return (f"| {name} | {s['requests']} | {s['tokens']:,} | {s['tps']:,.0f} | {ratio} | "
            f"{s['cpu_per_k']:.0f} | {eff} | {percentile(lat, 0.5):.0f} | "
            f"{percentile(lat, 0.95):.0f} | {percentile(lat, 0.99):.0f} | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("default", "quick", "tiny"), default="default")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (engine, server)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    served = base_model(args.preset, progress=True)
    model = served.model
    # Every run of a repeat gets the same requests, and each repeat (and the warm-up) new ones:
    # each system keeps one engine (and its prefix cache) for the whole benchmark, as a server
    # does, so none of them meets a prompt it has already seen.
    n = args.requests
    sets = 2 * (args.repeats + 1)
    all_chats = workload(n * sets)
    chat_sets = [all_chats[i * n:(i + 1) * n] for i in range(sets)]
    prompt_sets = [[prompt_tokens(c["messages"][0]["content"]) for c in chats]
                   for chats in chat_sets]
    engine = Engine(model, max_batch_size=args.max_batch_size)
    port = free_port()
    proc = start_server(args.preset, port, args.max_batch_size, args.requests, args.threads)
    kinds = {"json": (False, "bem serve, JSON"), "sse": (True, "bem serve, stream (SSE)")}
    lines = []
    worker = GenerationWorker([served], max_batch_size=args.max_batch_size,
                              max_queue=args.requests)
    worker.start()
    try:
        for w, (ignore_eos, title) in enumerate((
                (True, f"exactly {args.max_tokens} new tokens per request (ignore_eos)"),
                (False, f"answers end at EOS (max {args.max_tokens})"))):
            runs: dict[str, list[dict]] = {k: [] for k in ("engine", "worker", *kinds)}
            for r in range(args.repeats + 1):  # interleaved: drift of a shared machine hits all
                chats, prompts = chat_sets[w * (args.repeats + 1) + r], \
                    prompt_sets[w * (args.repeats + 1) + r]
                bodies = [{"model": served.name, **c, "max_tokens": args.max_tokens,
                           "temperature": 0, "ignore_eos": ignore_eos} for c in chats]
                got = {"engine": run_engine(engine, prompts, args.max_tokens, ignore_eos,
                                            args.clients),
                       "worker": run_worker(worker, served, prompts, args.max_tokens,
                                            ignore_eos, args.clients)}
                for k, (stream, _) in kinds.items():
                    got[k] = run_server(proc, port, bodies, args.clients, stream)
                if r == 0:
                    continue                   # warm-up (first-call costs of every part)
                want = got["engine"]["texts"]
                for k, v in got.items():
                    v["same"] = sum(a == b for a, b in zip(want, v["texts"]))
                    runs[k].append(v)
            stats = {k: summarize(v) for k, v in runs.items()}
            lines += [f"\n#### {title}\n",
                      "| run | requests | tokens (median) | tokens/s (median) | vs engine "
                      "(median, range) | CPU ms / 1k tokens | CPU efficiency vs engine | p50 ms "
                      "| p95 ms | p99 ms | TTFT p50 / p95 ms |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                      row("engine in-process", stats["engine"], None, None)]
            same = []
            for k, (_, name) in {"worker": (None, "generation thread alone (no HTTP)"),
                                 **kinds}.items():
                ratio = [r["tokens"] / r["wall"] / (e["tokens"] / e["wall"])
                         for r, e in zip(runs[k], runs["engine"])]
                lines.append(row(name, stats[k], ratio, stats["engine"]["cpu_per_k"]))
                same.append(f"{min(r['same'] for r in runs[k])}/{n}")
            errors = sum(stats[k]["errors"] for k in kinds)
            lines.append(f"\nGreedy texts equal to the in-process engine's (worst repeat; "
                         f"thread alone, JSON, stream): {', '.join(same)}; HTTP errors: {errors}.")
    finally:
        worker.stop()
        proc.terminate()
        proc.wait(60)
    print(f"bem serve benchmark: {served.name} ({served.description}), {args.requests} requests, "
          f"{args.clients} concurrent clients, max_batch_size {args.max_batch_size}, "
          f"{args.threads} torch thread(s), {args.repeats} interleaved repeats; {machine()}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
