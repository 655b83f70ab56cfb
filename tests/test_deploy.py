"""bem.deploy and the canary rollout of bem.serve: only PROMOTEd variants deploy (a REJECTed one is
refused with the report's reasons, nothing written); versions are published atomically with a
manifest of SHA-256 digests and the acceptance evidence; a tampered file is refused on load; the
rollout controller advances, promotes and rolls back on the canary gate; and through the server
(openai client on 127.0.0.1) a deliberately degraded canary is rolled back automatically."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bem.cli import main
from bem.deploy import (DeploymentRefused, RolloutPlan, deploy_production, load_version,
                        read_rollout, sha256_file, verify, versions)
from bem.experiments import run_experiment
from bem.experiments.runner import _load_adapter
from bem.experiments.systems import SystemSpec, build
from bem.serialization import load_file, save_file
from bem.stats import validate, write_report
from bem.system import BEMv13System

sys.path.insert(0, str(Path(__file__).parent))
from test_experiments import TINY  # noqa: E402

# Thresholds under which the doctored V1 of the tiny run is promoted (4 examples cannot be
# significant at the default ones).
LENIENT = {"n_resamples": 200, "budget_tolerance": 0.5, "ci_lower_bound_min": -1.0,
           "fdr_alpha": 0.5, "latency_ratio_max": 100.0, "memory_ratio_max": 100.0,
           "kv_hit_rate_min_delta": -1.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny `bem run` of V1 and V2: its acceptance report REJECTs both."""
    root = tmp_path_factory.mktemp("deploy")
    cfg = dataclasses.replace(TINY, variants=("V1", "V2"))
    outcome = run_experiment(cfg, out=root / "run", device="cpu", cache=root / "cache",
                             progress=False)
    assert outcome.report.promoted == []
    return outcome.folder


def _promoted_copy(run: Path, dest: Path, variant: str = "V1") -> Path:
    """A copy of the run whose results make `variant` win and whose acceptance.json (validated
    at LENIENT thresholds) PROMOTEs it."""
    shutil.copytree(run, dest)
    doc = json.loads((dest / "results.json").read_text())
    for v in doc["variants"]:
        if v["name"] == variant:       # better than the baseline on every example and metric
            for m, base in doc["baseline"]["scores"].items():
                v["scores"][m] = [b + (0.4 if i else 0.2) for i, b in enumerate(base)]
    (dest / "results.json").write_text(json.dumps(doc))
    report = validate(doc, LENIENT)
    assert report.promoted == [variant]
    write_report(report, json_path=dest / "acceptance.json")
    return dest


def _degrade(run: Path, variant: str = "V1", scale: float = 60.0) -> None:
    """Scale the trained adapter's tensors: the model it serves answers garbage."""
    path = run / "systems" / variant / "adapter.safetensors"
    tensors, _ = load_file(path)
    save_file({k: v * scale for k, v in tensors.items()}, path, {"format": "bem-run-adapter"})


def test_rejected_variant_is_refused_with_the_reports_reasons(tiny_run, tmp_path, capsys):
    reg = tmp_path / "registry"
    with pytest.raises(DeploymentRefused) as info:
        deploy_production(["V1"], tiny_run, registry=reg)
    reasons = info.value.refused["V1"]
    report = json.loads((tiny_run / "acceptance.json").read_text())
    v1 = next(v for v in report["variants"] if v["name"] == "V1")
    assert reasons == ["acceptance decision REJECT"] + v1["reasons"]
    assert "selected_variants" in str(info.value) and "exact_match" in str(info.value)
    assert not reg.exists()                         # nothing written
    # Through the seed's API and the command line too; partial=True deploys nothing either.
    system = BEMv13System(TINY, device="cpu", progress=False)
    with pytest.raises(DeploymentRefused, match="V2"):
        system.deploy_production(["V1", "V2"], run=tiny_run, registry=reg)
    status = system.deploy_production(["V2"], run=tiny_run, registry=reg, partial=True)
    assert status.deployed == {} and not status.ok and "V2" in status.refused
    assert main(["deploy", str(tiny_run), "V1", "--registry", str(reg)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "acceptance decision REJECT" in err and "FLOPs" in err
    with pytest.raises(DeploymentRefused, match="not in the acceptance report"):
        deploy_production(["V3"], tiny_run, registry=reg)
    with pytest.raises(ValueError, match="selected_variants"):
        deploy_production("V1", tiny_run, registry=reg)
    with pytest.raises(ValueError, match="run: .* not a bem run folder"):
        deploy_production(["V1"], tmp_path, registry=reg)
    with pytest.raises(ValueError, match="steps"):
        RolloutPlan(steps=(0.5, 0.1, 1.0))


def test_promoted_variant_is_deployed_with_a_verified_manifest(tiny_run, tmp_path):
    run = _promoted_copy(tiny_run, tmp_path / "run")
    reg = tmp_path / "registry"
    system = BEMv13System(TINY, device="cpu", progress=False)
    status = system.deploy_production(["V1"], run=run, registry=reg)
    assert status.ok and status.deployed == {"bem-V1": "v0001"}
    assert status.rollouts["bem-V1"]["state"] == "stable"        # first version: stable at once
    manifest = json.loads(status.manifests["bem-V1"].read_text())
    vdir = reg / "bem-V1" / "versions" / "v0001"
    assert manifest["files"]["adapter.safetensors"]["sha256"] == \
        sha256_file(vdir / "adapter.safetensors") == \
        sha256_file(run / "systems" / "V1" / "adapter.safetensors")
    for f, digest in manifest["base"]["sha256"].items():
        assert sha256_file(reg / manifest["base"]["path"] / f) == digest
    ev = manifest["acceptance"]
    assert ev["decision"] == "PROMOTE" and ev["variant"]["decision"] == "PROMOTE"
    assert {g["gate"] for g in ev["variant"]["gates"]} >= {"primary_ci_lower", "fdr_primary"}
    assert ev["sha256"]["acceptance.json"] == sha256_file(run / "acceptance.json")
    assert ev["thresholds"]["fdr_alpha"] == 0.5
    assert manifest["system"]["name"] == "V1" and manifest["run"]["config"]["variants"]

    # The loaded deployment is the run's trained system, exactly.
    model, _ = load_version(reg, "bem-V1", "v0001")
    state = json.loads((run / "state.json").read_text())
    from bem.experiments import load_or_pretrain
    from bem.experiments.config import RunConfig
    cfg = RunConfig.from_dict(state["config"])
    base, _ = load_or_pretrain(cfg.model, cfg.pretrain, suite_seed=cfg.suite_seed,
                               cache=Path(state["base"]["path"]).parent.parent, progress=False)
    spec = next(SystemSpec.from_dict(s) for s in state["systems"] if s["name"] == "V1")
    ref = build(base, spec, cfg.seed)
    _load_adapter(ref, run / "systems" / "V1" / "adapter.safetensors")
    ids = torch.tensor([[1, 72, 105, 33, 10, 65]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref.eval()(ids))

    # A second deployment of the name is a new version and a canary of the stable one.
    plan = RolloutPlan(steps=(0.25, 1.0), min_requests=5)
    again = deploy_production(["V1"], run, registry=reg, plan=plan)
    assert again.deployed == {"bem-V1": "v0002"} and versions(reg, "bem-V1") == ["v0001", "v0002"]
    roll = read_rollout(reg, "bem-V1")
    assert (roll["stable"], roll["candidate"], roll["state"], roll["traffic"]) == \
        ("v0001", "v0002", "canary", 0.25)
    assert [h["event"] for h in roll["history"]] == ["deployed", "deployed"]
    # Another name by --name, from the command line.
    assert main(["deploy", str(run), "V1", "--registry", str(reg), "--name", "V1=support-bot",
                 "--steps", "0.1,1"]) == 0
    assert versions(reg, "support-bot") == ["v0001"]


def test_tampered_files_are_refused_on_load(tiny_run, tmp_path, caplog):
    from bem.serve.cli import load_registry
    from bem.serve.rollout import Rollout

    run = _promoted_copy(tiny_run, tmp_path / "run")
    reg = tmp_path / "registry"
    deploy_production(["V1"], run, registry=reg)
    deploy_production(["V1"], run, registry=reg)          # v0002: the canary
    verify(reg, "bem-V1", "v0002")
    adapter = reg / "bem-V1" / "versions" / "v0002" / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-3] ^= 0x01                                   # one bit of one weight
    adapter.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="v0002.*adapter.safetensors.*does not match its "
                                         "manifest.*tampered"):
        verify(reg, "bem-V1", "v0002")
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_version(reg, "bem-V1", "v0002")
    # A manifest that stops listing the adapter does not let it through unchecked.
    mpath = reg / "bem-V1" / "versions" / "v0002" / "manifest.json"
    edited = json.loads(mpath.read_text())
    edited["files"] = {}
    saved = mpath.read_bytes()
    mpath.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not list the digests"):
        load_version(reg, "bem-V1", "v0002")
    mpath.write_bytes(saved)
    # The server rolls the tampered canary back at load and records why.
    roll = Rollout.from_registry(reg, "bem-V1")
    assert roll.state == "rolled_back" and roll.candidate is None and roll.stable == "v0001"
    disk = read_rollout(reg, "bem-V1")
    assert disk["state"] == "rolled_back" and "refused at load" in disk["history"][-1]["detail"]
    # A tampered stable version (its base model here) refuses the whole deployment.
    manifest = json.loads((reg / "bem-V1/versions/v0001/manifest.json").read_text())
    weights = reg / manifest["base"]["path"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        Rollout.from_registry(reg, "bem-V1")
    with caplog.at_level("ERROR", logger="bem"):
        assert load_registry(reg) == []
    assert "deployment bem-V1 refused" in caplog.text


def test_versions_and_rollout_state_are_written_atomically(tiny_run, tmp_path, monkeypatch):
    run = _promoted_copy(tiny_run, tmp_path / "run")
    reg = tmp_path / "registry"
    deploy_production(["V1"], run, registry=reg)
    before = (reg / "bem-V1" / "rollout.json").read_bytes()
    real_rename = os.rename

    def crash(src, dst, *a, **k):                    # the process dies at the publishing rename
        if "versions" in str(dst):
            raise OSError(5, "simulated crash")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        deploy_production(["V1"], run, registry=reg)
    monkeypatch.setattr(os, "rename", real_rename)
    # No half version is visible, no temporary folder is left, the rollout state is untouched.
    assert versions(reg, "bem-V1") == ["v0001"]
    assert sorted(p.name for p in (reg / "bem-V1" / "versions").iterdir()) == ["v0001"]
    assert (reg / "bem-V1" / "rollout.json").read_bytes() == before
    # A leftover temporary folder of a killed deployer (kill -9: no cleanup) is never a version.
    (reg / "bem-V1" / "versions" / ".tmp-dead").mkdir()
    (reg / "bem-V1" / "versions" / ".tmp-dead" / "manifest.json").write_text("{")
    assert versions(reg, "bem-V1") == ["v0001"]
    # The rollout state is replaced through a temporary file: a failed replace keeps the old one.
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        deploy_production(["V1"], run, registry=reg)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (reg / "bem-V1" / "rollout.json").read_bytes() == before
    assert not [p for p in (reg / "bem-V1").iterdir() if p.name.startswith(".rollout")]
    # (The version itself was published: a later deployment supersedes it.)
    assert versions(reg, "bem-V1") == ["v0001", "v0002"]


# ---- the rollout controller, without a server ----------------------------------------------------

def _rollout(plan, registry=None, violation=None):
    pytest.importorskip("scipy")
    from bem.serve import ServedModel, base_model
    from bem.serve.rollout import Rollout

    m = base_model("tiny").model
    versions = {v: ServedModel(f"bot:{v}", m) for v in ("v0001", "v0002")}
    return Rollout("bot", versions, stable="v0001", candidate="v0002", plan=plan,
                   registry=registry, violation=violation)


def _feed(roll, n, *, cand_latency=0.010, cand_score=1.0, cand_error=False, text="ok"):
    """n requests each way through pick(), with labels; returns the versions picked."""
    import random
    rng = random.Random(0)
    picked = []
    for _ in range(n):
        served, ticket = roll.pick()
        picked.append(ticket.version)
        cand = ticket.version == roll.candidate
        lat = (cand_latency if cand else 0.010) * (1 + 0.1 * rng.random())
        roll.record(ticket, latency=lat, error=cand and cand_error, text=text)
        roll.feedback(ticket, score=cand_score if cand else 1.0)
    return picked


def test_rollout_splits_traffic_exactly_and_promotes_a_good_canary(tmp_path):
    plan = RolloutPlan(steps=(0.1, 0.5, 1.0), min_requests=10, min_labels=10)
    roll = _rollout(plan, registry=tmp_path)
    picked = _feed(roll, 99)                         # 10% → 9 canary picks, not judged yet
    assert picked.count("v0002") == 9 and roll.step == 0
    _feed(roll, 1)                                   # the 10th: judged, passes
    assert (roll.state, roll.step, roll.traffic) == ("canary", 1, 0.5)
    _feed(roll, 20)
    assert roll.traffic == 1.0
    picked = _feed(roll, 10)                         # all traffic, compared with the last step
    assert set(picked) == {"v0002"}
    assert (roll.state, roll.stable, roll.candidate) == ("stable", "v0002", None)
    disk = read_rollout(tmp_path, "bot")
    assert [h["event"] for h in disk["history"]] == ["advanced", "advanced", "promoted"]
    assert disk["stable"] == "v0002" and disk["history"][-1]["verdict"]["ship"]
    assert set(_feed(roll, 5)) == {"v0002"}


@pytest.mark.parametrize("bad, reason", [
    (dict(cand_score=0.0), "task_score"),
    (dict(cand_error=True), "error_rate"),
    (dict(cand_latency=0.050), "latency_seconds higher"),
])
def test_rollout_rolls_back_a_degraded_canary_and_records_why(tmp_path, bad, reason):
    plan = RolloutPlan(steps=(0.5, 1.0), min_requests=12)
    roll = _rollout(plan, registry=tmp_path)
    _feed(roll, 24, **bad)
    assert (roll.state, roll.candidate, roll.stable, roll.traffic) == \
        ("rolled_back", None, "v0001", 0.0)
    event = read_rollout(tmp_path, "bot")["history"][-1]
    assert event["event"] == "rolled_back" and event["version"] == "v0002"
    assert any(reason in r for r in event["reasons"]), event["reasons"]
    assert set(_feed(roll, 10, **bad)) == {"v0001"}     # everything back on the stable version


def test_rollout_violation_check_and_stale_results():
    plan = RolloutPlan(steps=(0.5, 1.0), min_requests=12)
    roll = _rollout(plan, violation=lambda text: "FORBIDDEN" in text)
    for _ in range(24):
        served, ticket = roll.pick()
        cand = ticket.version == "v0002"
        roll.record(ticket, latency=0.01, error=False, text="FORBIDDEN" if cand else "fine")
    assert roll.state == "rolled_back"
    assert any("violation_rate" in r for r in roll.last_verdict["reasons"])
    # A result of a request picked in an earlier step does not count in the current one.
    roll2 = _rollout(RolloutPlan(steps=(0.5, 1.0), min_requests=2))
    _, old = roll2.pick()
    roll2._epoch += 1
    assert roll2.feedback(old, score=1.0) is False


def test_rollout_does_not_overwrite_a_newer_deployment(tiny_run, tmp_path, caplog):
    from bem.serve.rollout import Rollout

    run = _promoted_copy(tiny_run, tmp_path / "run")
    reg = tmp_path / "registry"
    plan = RolloutPlan(steps=(0.5, 1.0), min_requests=3)
    deploy_production(["V1"], run, registry=reg, plan=plan)
    deploy_production(["V1"], run, registry=reg, plan=plan)
    roll = Rollout.from_registry(reg, "bem-V1")
    assert (roll.stable, roll.candidate, roll.traffic) == ("v0001", "v0002", 0.5)
    deploy_production(["V1"], run, registry=reg, plan=plan)        # v0003 while serving
    with caplog.at_level("WARNING", logger="bem"):
        _feed(roll, 6)                                              # the server's step passes
    assert roll.traffic == 1.0 and "changed on disk" in caplog.text
    disk = read_rollout(reg, "bem-V1")
    assert disk["candidate"] == "v0003" and disk["history"][-1]["event"] == "deployed"
