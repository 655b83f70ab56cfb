"""bem online's pieces that need no training (the stream with its poisoned and gradual segments,
the forgetting arithmetic, the CLI registration), and — marked slow — a whole quick run with
resume."""
from __future__ import annotations

import json

import pytest

from bem.cli import build_parser
from bem.online.experiment import OnlineConfig, _forgetting
from bem.online.stream import Segment, build_stream, change_points, default_segments


def test_stream_segments_poison_and_gradual_drift():
    segs = default_segments(40, 16, 50)
    stream = build_stream(segs, seed=3)
    assert len(stream) == sum(s.items for s in segs) and change_points(segs) == [40, 80, 96, 136, 186]
    poisoned = [it for it in stream if it.poisoned]
    assert len(poisoned) == 16 and all(it.example.answer.endswith(" end") and it.domain == "done"
                                       for it in poisoned)
    assert all(not it.poisoned and it.example.answer.endswith(" " + it.domain)
               for it in stream if it.segment != 2)
    gradual = [it.domain for it in stream if it.segment == 4]
    assert gradual[:10].count("end") < gradual[-10:].count("end")
    assert build_stream(segs, seed=3) == stream            # deterministic
    assert len({it.example.prompt for it in stream}) == len(stream)


def test_forgetting_and_plasticity_arithmetic():
    segs = [Segment("a", "clean", "ok", 1), Segment("b", "clean", "done", 1),
            Segment("c", "clean", "over", 1)]
    ends = [{"segment": 0, "heldout": {"ok": 0.8, "done": 0.0, "over": 0.0}},
            {"segment": 1, "heldout": {"ok": 0.9, "done": 0.6, "over": 0.0}},
            {"segment": 2, "heldout": {"ok": 0.3, "done": 0.5, "over": 0.7}}]
    f = _forgetting(ends, segs)
    assert f["per_domain"] == pytest.approx({"ok": 0.6, "done": 0.1})
    assert f["mean"] == pytest.approx(0.35) and f["plasticity"] == pytest.approx(0.7)


def test_config_and_cli_registration():
    cfg = OnlineConfig.preset("quick", seed=2)
    assert OnlineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        OnlineConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="preset"):
        OnlineConfig.preset("huge")
    args = build_parser().parse_args(["online", "--quick", "--no-progress"])
    assert args.quick and args.func.__name__ == "_cmd_online"


@pytest.mark.slow
def test_quick_run_resumes_and_reports(tmp_path):
    from bem.online.experiment import execute, prepare_run

    run = prepare_run(OnlineConfig.preset("quick", clean_items=32, poison_items=16,
                                          gradual_items=16, lambda_grid=(10.0,)),
                      out=tmp_path / "run")

    class Stop(Exception):
        pass

    def stop_at(name):
        if name == "unguarded":
            raise Stop

    with pytest.raises(Stop):
        execute(run, device=__import__("torch").device("cpu"), progress=False, on_arm=stop_at)
    assert run.state["completed"] == ["select:lambda-0", "select:lambda-10", "select", "guarded"]
    resumed = prepare_run(resume=tmp_path / "run")
    results = execute(resumed, device=__import__("torch").device("cpu"), progress=False)
    assert resumed.state["completed"][3:] == ["guarded", "unguarded", "ewc", "plain", "replay",
                                              "shadow", "report"]
    assert results["shadow"]["rounds"] == results["guarded"]["rounds"]
    assert results["shadow"]["rollbacks"] == 0          # rejected candidates are only not served
    assert results["guarded"]["rollbacks"] == results["guarded"]["rejected"]
    assert results["selection"]["lambda"] == 10.0 and len(results["selection"]["rows"]) == 2
    assert set(results["forgetting"]) >= {"plain", "ewc", "replay", "ewc_reduction"}
    assert (tmp_path / "run" / "report.md").read_text().startswith("# bem online")
    assert (tmp_path / "run" / "stream.png").stat().st_size > 1000
    assert results["guarded"]["rounds"] == results["unguarded"]["rounds"]


def test_lambda_selection_rule():
    from bem.online.experiment import choose_lambda

    rows = [{"lambda": 0.0, "forgetting": 0.30, "plasticity": 0.40},
            {"lambda": 1.0, "forgetting": 0.28, "plasticity": 0.40},
            {"lambda": 10.0, "forgetting": 0.20, "plasticity": 0.36},
            {"lambda": 100.0, "forgetting": 0.05, "plasticity": 0.20}]   # below the floor
    c = choose_lambda(rows, 0.05)
    assert c["lambda"] == 10.0 and c["equal_plasticity"] and c["plasticity_floor"] == \
        pytest.approx(0.35)
    tie = [rows[0], dict(rows[1], forgetting=0.2), rows[2]]
    assert choose_lambda(tie, 0.05)["lambda"] == 1.0                    # ties: the smaller λ
    none = [rows[0], rows[3]]
    assert choose_lambda(none, 0.05) == {"lambda": 100.0, "equal_plasticity": False,
                                         "plasticity_floor": pytest.approx(0.35)}
    with pytest.raises(ValueError, match="rows"):
        choose_lambda(rows[1:], 0.05)


def test_config_validates_new_fields():
    with pytest.raises(ValueError, match="ewc_consolidate"):
        OnlineConfig(ewc_consolidate="never")
    with pytest.raises(ValueError, match="lambda_grid"):
        OnlineConfig(lambda_grid=(10.0, 1.0))
    with pytest.raises(ValueError, match="ewc_lambda"):
        OnlineConfig(ewc_lambda=-1.0)
    with pytest.raises(ValueError, match="replay_batch"):
        OnlineConfig(replay_batch=-1)
    cfg = OnlineConfig(ewc_lambda=3.0, lambda_grid=(1.0, 2.0))
    assert OnlineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_system_learn_online_runs_the_online_experiment(tmp_path, monkeypatch):
    """BEMv13System.learn_online: the default preset in a new folder (or a resumed one), run by
    bem.online.experiment.execute on the system's device."""
    import torch

    import bem.online.experiment as exp
    from bem.system import BEMv13System

    seen = {}

    def fake_execute(run, *, device, progress):
        seen.update(config=run.config, folder=run.folder, device=device, progress=progress)
        return {"ok": True}

    monkeypatch.setattr(exp, "execute", fake_execute)
    system = BEMv13System(device="cpu", progress=False)
    assert system.learn_online(out=tmp_path / "run") == {"ok": True}
    assert seen["config"] == OnlineConfig.preset("default")
    assert seen["folder"] == tmp_path / "run" and seen["device"] == torch.device("cpu")
    assert seen["progress"] is False
    system.learn_online(resume=tmp_path / "run")
    assert seen["folder"] == tmp_path / "run"
    with pytest.raises(ValueError, match="resume"):
        system.learn_online(OnlineConfig.preset("quick"), resume=tmp_path / "run")
