"""`bem serve` as a command, in a subprocess on 127.0.0.1 and a free port: the openai client gets
the offline Engine's greedy output; SIGTERM lets the in-flight (and queued) requests finish,
answers 503 to new ones and exits 0. Slow: with no option but the port, the command serves the
embedded default's pre-trained base as `bem-base` (pre-training it first when not cached)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from bem.engine import Engine, SamplingParams  # noqa: E402
from bem.serve import base_model, chat_prompt  # noqa: E402
from bem.tasks import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _post(port: int, path: str, body: dict, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


class _Served:
    """`python -m bem serve ARGS --port P` with its log in a temporary file; stopped (killed if
    need be) on exit."""

    def __init__(self, args: list[str], start_timeout: float):
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                           os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "bem", "serve", *args, "--port",
                                      str(self.port), "--host", "127.0.0.1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"bem serve exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            try:
                if _get(self.port, "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"bem serve not healthy after {start_timeout} s:\n"
                                     f"{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return Path(self.log.name).read_text()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_serve_tiny_openai_client_and_sigterm_drain():
    model = base_model("tiny").model
    engine = Engine(model, max_batch_size=1)

    def offline(prompt_ids, n):
        ids = engine.generate([prompt_ids], SamplingParams(max_tokens=n,
                                                           stop_token_ids=(TOK.EOS,)))[0]
        return TOK.decode(ids)

    with _Served(["--preset", "tiny", "--max-batch-size", "1", "--max-queue", "8",
                  "--threads", "1"], start_timeout=90) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="bem",
                               max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["bem-tiny"]
        r = client.completions.create(model="bem-tiny", prompt="hello", max_tokens=12,
                                      temperature=0)
        assert r.choices[0].text == offline(TOK.encode("hello", bos=True), 12)
        messages = [{"role": "user", "content": "Compute 1+2 ="}]
        chunks = client.chat.completions.create(model="bem-tiny", messages=messages,
                                                max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
            offline(chat_prompt(messages), 12)

        # SIGTERM with 4 requests in flight (one running, three queued: max_batch_size 1)
        results = {}

        def one(i):
            results[i] = _post(srv.port, "/v1/completions",
                               {"model": "bem-tiny", "prompt": f"in flight {i}",
                                "max_tokens": 120, "temperature": 0})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while _get(srv.port, "/health")[1].get("outstanding", 0) < 4:
            assert time.monotonic() < deadline, "requests did not arrive"
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _get(srv.port, "/health")[0] != 503:
            assert time.monotonic() < deadline, "the server did not start draining"
            time.sleep(0.01)
        status, headers, body = _post(srv.port, "/v1/completions",
                                      {"model": "bem-tiny", "prompt": "late", "max_tokens": 2})
        assert status == 503 and "retry-after" in {k.lower() for k in headers}
        for t in threads:
            t.join(60)
        for i in range(4):
            status, _, body = results[i]
            assert status == 200, body
            assert body["choices"][0]["text"] == offline(TOK.encode(f"in flight {i}", bos=True),
                                                         120)
        assert srv.proc.wait(60) == 0, srv.output()
        assert "finishing" in srv.output()


@pytest.mark.slow
def test_serve_default_is_the_pretrained_base():
    """`bem serve --port N` serves bem-base: the embedded default's pre-trained base (from bem's
    cache, or pre-trained now: minutes); greedy chats equal the offline engine's."""
    from bem.experiments.base_model import load_or_pretrain
    from bem.experiments.config import RunConfig
    from bem.tasks import generate

    with _Served(["--no-progress"], start_timeout=1800) as srv:
        cfg = RunConfig.preset("default")
        model, _ = load_or_pretrain(cfg.model, cfg.pretrain, suite_seed=cfg.suite_seed,
                                    progress=False)
        engine = Engine(model, max_batch_size=1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="bem",
                               max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["bem-base"]
        right = 0
        for ex in generate("test", 2, seed=0)[:8]:
            messages = [{"role": "user", "content": ex.prompt}]
            r = client.chat.completions.create(model="bem-base", messages=messages,
                                               max_tokens=40, temperature=0)
            ids = engine.generate([chat_prompt(messages)],
                                  SamplingParams(max_tokens=40, stop_token_ids=(TOK.EOS,)))[0]
            assert r.choices[0].message.content == TOK.decode(ids)
            assert r.choices[0].finish_reason == "stop"      # the base ends its answers
            right += r.choices[0].message.content == ex.answer
        assert right >= 4, f"the pre-trained base answered {right}/8 test prompts"
