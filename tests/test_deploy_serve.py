"""A canary rollout through `bem serve` (create_app + ServerThread on 127.0.0.1, the official openai
client): a promoted variant is deployed (stable), a deliberately degraded copy of it is deployed as
the canary; live traffic to the deployment's name is split, task labels arrive through
/v1/feedback, the canary gate fails and the server rolls back to the stable version on its own —
recorded in rollout.json, /v1/rollouts and /metrics (`bem_canary_state`)."""
from __future__ import annotations

import http.client
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from bem.deploy import RolloutPlan, deploy_production, read_rollout  # noqa: E402
from bem.serve import ServerThread, base_model, create_app  # noqa: E402
from bem.serve.cli import load_registry  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_deploy import _degrade, _promoted_copy, tiny_run  # noqa: E402,F401

PROMPTS = [f"Q{i}: what is {i} plus {i + 3}? A:" for i in range(12)]
MAX_ROUNDS = 240          # bounded: the rollback must come well before this


class _Http:
    """Plain HTTP to the server (what the openai client has no method for)."""

    def __init__(self, srv):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None):
        self.conn.request(method, path, body=body,
                          headers={"Content-Type": "application/json"} if body else {})
        r = self.conn.getresponse()
        return r.status, r.read().decode()

    def post(self, path: str, doc) -> tuple[int, dict]:
        status, text = self.request("POST", path, json.dumps(doc).encode())
        return status, json.loads(text)

    def get(self, path: str) -> str:
        status, text = self.request("GET", path)
        assert status == 200, text
        return text


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_degraded_canary_is_rolled_back_automatically(tiny_run, tmp_path):  # noqa: F811
    good = _promoted_copy(tiny_run, tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _degrade(bad)                        # same acceptance evidence, garbage weights
    reg = tmp_path / "registry"
    deploy_production(["V1"], good, registry=reg)
    plan = RolloutPlan(steps=(0.25, 0.5, 1.0), min_requests=8, min_labels=8)
    status = deploy_production(["V1"], bad, registry=reg, plan=plan)
    assert status.rollouts["bem-V1"] == {"stable": "v0001", "candidate": "v0002",
                                         "state": "canary", "traffic": 0.25, "step": 0}

    app = create_app([base_model("tiny")], rollouts=load_registry(reg), max_batch_size=8,
                     max_queue=64, request_timeout=60)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="bem", max_retries=0,
                               timeout=60)
        ids = {m.id for m in client.models.list().data}
        assert {"bem-V1", "bem-V1:v0001", "bem-V1:v0002", "bem-tiny"} <= ids
        labels = {}          # the stable version's greedy answers, pinned by version name
        for p in PROMPTS:
            r = client.completions.create(model="bem-V1:v0001", prompt=p, max_tokens=8,
                                          temperature=0)
            labels[p] = r.choices[0].text
        seen, scores = [], {"bem-V1:v0001": [], "bem-V1:v0002": []}
        http = _Http(srv)
        for i in range(MAX_ROUNDS):
            p = PROMPTS[i % len(PROMPTS)]
            r = client.completions.create(model="bem-V1", prompt=p, max_tokens=8, temperature=0)
            seen.append(r.model)
            score = float(r.choices[0].text == labels[p])
            scores[r.model].append(score)
            st, fb = http.post("/v1/feedback", {"id": r.id, "score": score})
            assert st == 200 and fb["model"] == r.model, fb
            if read_rollout(reg, "bem-V1")["state"] == "rolled_back":
                break
        else:
            pytest.fail(f"no rollback after {MAX_ROUNDS} requests: {seen[-20:]}")
        assert i + 1 < MAX_ROUNDS and 8 <= seen.count("bem-V1:v0002") <= i
        assert sum(scores["bem-V1:v0001"]) == len(scores["bem-V1:v0001"])   # stable: all right
        assert sum(scores["bem-V1:v0002"]) < len(scores["bem-V1:v0002"]) / 2

        # Rolled back: recorded with its reasons, everything answered by the stable version.
        doc = read_rollout(reg, "bem-V1")
        event = doc["history"][-1]
        assert (doc["stable"], doc["candidate"], event["event"], event["version"]) == \
            ("v0001", None, "rolled_back", "v0002")
        assert any("task_score" in r for r in event["reasons"]), event["reasons"]
        for p in PROMPTS[:4]:
            r = client.completions.create(model="bem-V1", prompt=p, max_tokens=8, temperature=0)
            assert r.model == "bem-V1:v0001" and r.choices[0].text == labels[p]
        stream = client.chat.completions.create(
            model="bem-V1", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0, stream=True)
        assert {c.model for c in stream} == {"bem-V1:v0001"}
        rollouts = json.loads(http.get("/v1/rollouts"))["data"]
        assert rollouts[0]["state"] == "rolled_back" and rollouts[0]["history"][-1]["reasons"]
        metrics = http.get("/metrics")
        assert 'bem_canary_state{model="bem-V1",state="rolled_back"} 1.0' in metrics
        assert 'bem_canary_state{model="bem-V1",state="canary"} 0.0' in metrics
        assert 'bem_canary_rollbacks_total{model="bem-V1"} 1.0' in metrics
        assert 'bem_canary_traffic_fraction{model="bem-V1"} 0.0' in metrics
        # Feedback is validated: 400 naming the field, 404 for an unknown id.
        st, err = http.post("/v1/feedback", {"id": r.id, "score": "high"})
        assert st == 400 and err["error"]["param"] == "score"
        assert http.post("/v1/feedback", {"id": "cmpl-nope", "score": 1})[0] == 404
        assert http.request("POST", "/v1/feedback", b"{")[0] == 400
        http.conn.close()
    # The state on disk is what a restarted server resumes from.
    assert json.loads((reg / "bem-V1" / "rollout.json").read_text())["state"] == "rolled_back"


@pytest.mark.slow            # three subprocesses importing torch: ~50 s on a loaded machine
def test_bem_deploy_then_bem_serve_answers_the_deployment(tiny_run, tmp_path):  # noqa: F811
    """The documented commands: `bem deploy RUN V1 --registry R`, then `bem serve --registry R`
    answers `model: bem-V1` (the openai client), lists it, and refuses a tampered deployment."""
    import subprocess

    from test_serve_cli import ROOT, _Served

    good = _promoted_copy(tiny_run, tmp_path / "good")
    reg = tmp_path / "registry"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "python")}
    out = subprocess.run([sys.executable, "-m", "bem", "deploy", str(good), "V1", "--registry",
                          str(reg)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["deployed"] == {"bem-V1": "v0001"} and status["ok"]
    refused = subprocess.run([sys.executable, "-m", "bem", "deploy", str(tiny_run), "V2",
                              "--registry", str(reg)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert refused.returncode == 1 and "acceptance decision REJECT" in refused.stderr
    # A second deployment whose adapter is then tampered with: refused, the rest is served.
    deploy_production(["V1"], good, registry=reg, names={"V1": "other"})
    adapter = reg / "other" / "versions" / "v0001" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    with _Served(["--preset", "tiny", "--registry", str(reg)], start_timeout=120) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="bem",
                               max_retries=0, timeout=60)
        ids = [m.id for m in client.models.list().data]
        assert "bem-V1" in ids and "bem-V1:v0001" in ids and "other" not in ids
        r = client.completions.create(model="bem-V1", prompt="Hello", max_tokens=6,
                                      temperature=0)
        pinned = client.completions.create(model="bem-V1:v0001", prompt="Hello", max_tokens=6,
                                           temperature=0)
        assert r.model == "bem-V1:v0001" and r.choices[0].text == pinned.choices[0].text
        chat = client.chat.completions.create(model="bem-V1", max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].finish_reason in ("stop", "length")
        log = srv.output()
        assert "deployment other refused" in log and "does not match its manifest" in log
