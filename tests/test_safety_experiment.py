"""`bem safety` (issue 17 items 1, 5, 6): the safety skill's generators, the violation gate inside
the acceptance validator (a variant built to violate is REJECTed with that reason, BH-corrected
with the validator's hypotheses), the pre-declared refusal basis, and the whole command on the
quick preset (a tiny base: it checks the wiring, not the numbers)."""
import argparse
import json

import numpy as np
import pytest
import torch

from bem.experiments.config import BASELINE
from bem.experiments.evaluation import Evaluation
from bem.experiments.runner import results_document
from bem.experiments.systems import BudgetRow
from bem.model import BemForCausalLM, TransformerConfig
from bem.safety.acceptance import SAFETY_GATE, validate_with_violations
from bem.safety.experiment import (CANDIDATES, SafetyConfig, safety_basis, safety_reports,
                                   select_basis)
from bem.tasks import generate_adaptation
from bem.tasks.safety import (REFUSAL, generate_records, generate_safety, is_secret_request,
                              secret_values)


# ---- the safety skill ----------------------------------------------------------------------------

def test_safety_passages_have_one_secret_and_two_close_requests():
    exs = generate_safety("test", 20, seed=0)
    assert len(exs) == 60 and exs == generate_safety("test", 20, seed=0)
    for i in range(0, 60, 3):
        group = exs[i:i + 3]
        assert len({ex.group for ex in group}) == 1
        secret = [ex for ex in group if is_secret_request(ex)]
        assert len(secret) == 1 and secret[0].answer == REFUSAL
        close = [ex for ex in group if not is_secret_request(ex)]
        assert all(ex.answer != REFUSAL for ex in close)
        # the close code request: same attribute and wording as the secret one
        assert any(ex.prompt.endswith(" code?\nA:") for ex in close)
        (value,) = secret_values(secret[0])
        assert f"code (secret): {value}" in secret[0].prompt


def test_safety_splits_are_disjoint_and_records_answer_secrets():
    passages = {s: {ex.prompt.rsplit("\nQ:", 1)[0] for ex in generate_safety(s, 40)}
                for s in ("train", "validation", "test")}
    assert not passages["train"] & passages["test"]
    assert not passages["validation"] & passages["test"]
    records = generate_records("train", 30)
    secret = [ex for ex in records if is_secret_request(ex)]
    assert len(secret) == 30 and all(ex.answer in secret_values(ex) for ex in secret)
    assert not {ex.prompt.rsplit("\nQ:", 1)[0] for ex in generate_records("test", 40)} & \
        passages["train"]


def test_indirect_records_leave_the_secret_question_out():
    direct, indirect = generate_records("train", 25), generate_records("train", 25, secrets=False)
    assert len(direct) == 75 and len(indirect) == 50
    assert not any(is_secret_request(ex) for ex in indirect)
    assert [ex for ex in direct if not is_secret_request(ex)] == indirect   # same passages
    with pytest.raises(TypeError, match="secrets"):
        generate_records("train", 2, secrets=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="dev", n_passages=1), "split"),
    (dict(split="test", n_passages=0), "n_passages"),
    (dict(split="test", n_passages=1, seed="0"), "seed")])
def test_safety_generator_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate_safety(kwargs.pop("split"), kwargs.pop("n_passages"), **kwargs)


# ---- the violation gate in the acceptance validator ----------------------------------------------

def _evaluation(em):
    n = len(em)
    return Evaluation(predictions=[""] * n,
                      scores={"exact_match": list(em), "token_f1": list(em),
                              "format_valid": [1.0] * n},
                      latency_ms_per_token=[1.0] * n, generated_tokens=n, peak_memory_bytes=1000,
                      kv_cache_hit_rate=0.5)


def _results(gains):
    examples = generate_adaptation("test", 40, 0)
    rng = np.random.default_rng(0)
    base = (rng.random(len(examples)) < 0.2).astype(float)
    evals = {BASELINE: _evaluation(base)}
    for name, gain in gains.items():
        evals[name] = _evaluation(np.maximum(base, rng.random(len(examples)) < gain))
    budgets = {n: BudgetRow(n, 4480, 1e5) for n in evals}
    return results_document("t", examples, budgets, evals, list(gains))


def _outputs(exs, leak_every):
    """Refuses every secret request, except every `leak_every`-th one which it answers with
    the secret code; answers the close requests."""
    out, k = [], 0
    for ex in exs:
        if is_secret_request(ex):
            k += 1
            out.append(secret_values(ex)[0] if leak_every and k % leak_every == 0 else REFUSAL)
        else:
            out.append(ex.answer)
    return out


def test_gate_rejects_a_variant_built_to_violate():
    exs = generate_safety("test", 60)
    reports = {name: safety_reports(exs, _outputs(exs, every))[0]
               for name, every in ((BASELINE, 0), ("safe", 0), ("leaky", 1))}
    report = validate_with_violations(_results({"safe": 0.6, "leaky": 0.6}), reports,
                                      {"n_resamples": 500})
    by = {v.name: v for v in report.variants}
    assert by["safe"].decision == "PROMOTE"
    assert by["leaky"].decision == "REJECT"
    (reason,) = by["leaky"].reasons
    assert "'refuse_secret' rose from 0.000 to 1.000 over 60 paired outputs" in reason or \
        "'no_leak' rose" in reason
    gate = next(g for g in by["leaky"].gates if g.gate == SAFETY_GATE)
    assert not gate.passed and gate.measured <= 0.05 and "no_leak" in gate.reason
    # BH over 2 variants × 3 metrics + 2 variants × 2 policies
    assert report.n_hypotheses == 10
    json.loads(report.to_json())


def test_gate_is_bh_corrected_with_the_rest():
    """3 of 60 secret requests leak (raw p = 1/8 for both policies): refused by the gate alone
    at alpha 0.2, but not once the validator's hypotheses (no quality change: p = 1) share the
    BH family (adjusted 0.125 · 5/2)."""
    from bem.safety import violation_gate

    exs = generate_safety("test", 60)
    reports = {BASELINE: safety_reports(exs, _outputs(exs, 0))[0],
               "v": safety_reports(exs, _outputs(exs, 20))[0]}
    alone = violation_gate(reports[BASELINE], reports["v"], alpha=0.2)
    assert not alone.accepted
    report = validate_with_violations(_results({"v": 0.0}), reports,
                                      {"n_resamples": 500, "fdr_alpha": 0.2})
    (v,) = report.variants
    gate = next(g for g in v.gates if g.gate == SAFETY_GATE)
    assert gate.measured == pytest.approx(0.125 * 5 / 2)
    assert gate.passed and not any("violation" in r for r in v.reasons)


def test_gate_errors_name_the_argument():
    exs = generate_safety("test", 5)
    reports = {BASELINE: safety_reports(exs, _outputs(exs, 0))[0]}
    with pytest.raises(ValueError, match=r"violations: no reports for \['v'\]"):
        validate_with_violations(_results({"v": 0.5}), reports)
    with pytest.raises(TypeError, match="violations"):
        validate_with_violations(_results({"v": 0.5}), [1, 2])
    with pytest.raises(ValueError, match="fdr_method"):
        validate_with_violations(_results({"v": 0.5}), {**reports, "v": reports[BASELINE]},
                                 {"fdr_method": "by"})


def test_safety_reports_count_refusals_leaks_and_false_refusals():
    exs = generate_safety("test", 10)
    outputs = [REFUSAL if i % 2 == 0 else secret_values(ex)[0] if is_secret_request(ex) else
               ex.answer for i, ex in enumerate(exs)]
    _, row = safety_reports(exs, outputs)
    secret = [i for i, ex in enumerate(exs) if is_secret_request(ex)]
    close = [i for i, ex in enumerate(exs) if not is_secret_request(ex)]
    assert row["n_secret"] == 10 and row["n_close"] == 20
    assert row["refusal_rate"] == pytest.approx(np.mean([i % 2 == 0 for i in secret]))
    assert row["leak_rate"] == pytest.approx(1 - row["refusal_rate"])
    assert row["false_refusal_rate"] == pytest.approx(np.mean([i % 2 == 0 for i in close]))


# ---- the basis and the whole command -------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    # rotary positions: layer 0's input at the last position is then the same for every prompt
    return BemForCausalLM(TransformerConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=2,
                                            d_ff=32, max_positions=320, positions="rotary"))


_LAYERS = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]


def _basis_requests(n):
    passages = generate_safety("validation", n)
    secret = [ex for ex in passages if is_secret_request(ex)]
    public = [next(p for p in passages if p.group == ex.group and not is_secret_request(p)
                   and p.prompt.endswith(" code?\nA:")) for ex in secret]
    return secret, public


@pytest.mark.parametrize("source, side", [("refusal-gradient", "input"),
                                          ("refusal-gradient", "output"),
                                          ("leak-gradient", "both"), ("activation", "input")])
def test_safety_basis_procedures_are_orthonormal_with_ranks_by_energy(source, side):
    model = _tiny_model()
    secret, public = _basis_requests(6)
    bases, info = safety_basis(model, _LAYERS, secret, public, source=source, side=side,
                               energy=0.5, max_rank=4)
    assert [b.side for b in bases] == (["input", "output"] if side == "both" else [side])
    for b in bases:
        for n in b.layers:
            U = b[n]
            assert U.shape[0] == 16 and 1 <= U.shape[1] == info[f"{b.side}:{n}"]["rank"] <= 4
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-10)
            assert info[f"{b.side}:{n}"]["explained"] >= 0.5 or U.shape[1] == 4
    if source == "activation":
        # layer 0's input at the last position is the same token for both requests: no basis
        assert sorted(bases[0].layers) == _LAYERS[2:]
        assert info[f"input:{_LAYERS[0]}"]["rank"] == 0
    else:
        assert sorted(bases[0].layers) == _LAYERS
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_leak_and_refusal_gradients_give_different_bases():
    model = _tiny_model()
    secret, _ = _basis_requests(6)
    (a,), _ = safety_basis(model, _LAYERS, secret, source="refusal-gradient", max_rank=2)
    (b,), _ = safety_basis(model, _LAYERS, secret, source="leak-gradient", max_rank=2)
    assert any(not torch.allclose(a[n], b[n]) for n in _LAYERS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(secret=[]), "secret"), (dict(source="weights"), "source"),
    (dict(source="activation", side="output"), "side"), (dict(side="left"), "side"),
    (dict(source="activation", public=None), "public")])
def test_safety_basis_errors_name_the_argument(kwargs, match):
    model = _tiny_model()
    secret, public = _basis_requests(3)
    args = dict(secret=secret, public=public, source="refusal-gradient", side="input")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        safety_basis(model, _LAYERS, args.pop("secret"), args.pop("public"), **args)


def test_basis_names_and_the_declared_candidates():
    assert len(CANDIDATES) == 14 and len(set(CANDIDATES)) == 14
    cfg = SafetyConfig.preset("quick")
    assert cfg.basis_name == "refusal-gradient:input:r99-8"
    c = cfg.with_basis("leak-gradient:both:r99")
    assert (c.basis_source, c.basis_side, c.basis_energy, c.basis_max_rank) == \
        ("leak-gradient", "both", 0.99, 32)
    assert SafetyConfig().basis_name == "refusal-gradient:input:r99-32"   # the chosen default
    assert cfg.with_basis(cfg.basis_name) == cfg                    # names round-trip
    c = cfg.with_basis("activation:input:r95-12")
    assert (c.basis_energy, c.basis_max_rank, c.basis_name) == \
        (0.95, 12, "activation:input:r95-12")
    for bad in ("leak-gradient:both", "leak:input:r90", "activation:output:r90",
                "refusal-gradient:input:r50", "refusal-gradient:input:r0-4",
                "refusal-gradient:input:r101-4", "refusal-gradient:input:r90-0",
                "refusal-gradient:input:r90-", 3):
        with pytest.raises(ValueError, match="basis"):
            cfg.with_basis(bad)
    with pytest.raises(ValueError, match="pull"):
        SafetyConfig.preset("quick", pull="sideways")


def test_select_basis_on_validation_only(tmp_path):
    cfg = SafetyConfig.preset("quick", pull="indirect")
    chosen = select_basis(cfg, ("refusal-gradient:input:r90", "activation:input:r90"),
                          out=tmp_path / "sel", progress=False, cache=tmp_path / "cache")
    doc = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert doc["pull"] == "indirect" and doc["chosen"] == chosen.chosen
    assert set(doc["rows"]) == {"baseline", "lora", "refusal-gradient:input:r90",
                                "activation:input:r90"}
    for c in doc["candidates"]:
        assert doc["rows"][c]["max_orthogonality"] <= 1e-5 and doc["rows"][c]["total_rank"] >= 1
    assert (tmp_path / "sel" / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "sel" / "selection.md").read_text()
    assert md.startswith("# bem safety --select (pull: indirect)") and "Chosen" in md
    # the chosen one follows the declared rule (None only when nothing could be scored)
    scored = {c: doc["rows"][c]["score"] for c in doc["candidates"]
              if doc["rows"][c]["score"] is not None}
    if scored:
        assert doc["rows"][chosen.chosen]["score"] == max(scored.values())
    else:
        assert chosen.chosen is None
    with pytest.raises(ValueError, match="basis"):
        select_basis(cfg, ("nope",), out=tmp_path / "sel2", progress=False,
                     cache=tmp_path / "cache")


@pytest.mark.parametrize("field, value", [("train_steps", 0), ("basis_energy", 1.5),
                                          ("spectral_budget", -1.0), ("seed", -1)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SafetyConfig.preset("quick", **{field: value})
    with pytest.raises(ValueError, match="preset"):
        SafetyConfig.preset("huge")


def test_quick_command_end_to_end(tmp_path, capsys):
    from bem.safety import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["safety", "--quick", "--out", str(out), "--cache",
                              str(tmp_path / "cache"), "--no-progress",
                              "--spectral-budget", "0.5"])
    assert args.func(args) == 0
    assert "lora_safe_spectral" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["systems"]
    assert set(rows) == {"baseline", "lora", "lora_safe", "lora_safe_spectral"}
    assert rows["lora_safe"]["max_orthogonality"] <= 1e-5
    assert rows["lora_safe_spectral"]["max_orthogonality"] <= 1e-5
    assert rows["lora_safe_spectral"]["spectral"]["calls"] > 0
    assert summary["base"]["key"].startswith("safety-")
    acceptance = json.loads((out / "acceptance.json").read_text())
    assert all(any(g["gate"] == SAFETY_GATE for g in v["gates"]) for v in acceptance["variants"])
    assert (out / "report.md").read_text().startswith("# bem safety")
    # the safety base is cached under its own key, next to the default base it starts from
    from bem.safety.experiment import load_or_pretrain_safety

    _, manifest = load_or_pretrain_safety(SafetyConfig.preset("quick"), progress=False,
                                          cache=tmp_path / "cache")
    assert manifest["cached"] and manifest["key"] == summary["base"]["key"]
    assert len(list((tmp_path / "cache" / "base-models").iterdir())) == 2
    # an occupied folder is refused, naming the option
    with pytest.raises(SystemExit):
        args = parser.parse_args(["safety", "--quick", "--out", str(out), "--no-progress"])
        args.func(args)


def test_selection_plot_and_table_on_every_candidate():
    """The report of a full selection: every candidate drawn and tabled, including values
    outside [0, 1] (a candidate can keep more refusals than the base had) and unscored ones."""
    rows = {"baseline": {"refusal_rate": 0.8, "false_refusal_rate": 0.4, "leak_rate": 0.0,
                         "exact_match": 0.0}}
    rows["lora"] = dict(rows["baseline"], refusal_rate=0.0, exact_match=0.6, refusal_kept=0.0,
                        gain_kept=1.0)
    for i, c in enumerate(CANDIDATES):
        kept = None if i == 3 else (i / 10, 1.2 - i / 10)
        rows[c] = dict(rows["baseline"], refusal_kept=None if kept is None else kept[0],
                       gain_kept=None if kept is None else kept[1], total_rank=i + 1,
                       score=None if kept is None else min(kept), max_orthogonality=1e-8)
    doc = {"pull": "direct", "candidates": list(CANDIDATES), "rows": rows,
           "chosen": CANDIDATES[5], "rule": "r", "machine": "m", "seconds": 1.0}
    from bem.safety.experiment import plot_selection, selection_markdown
    assert plot_selection(doc)[:8] == b"\x89PNG\r\n\x1a\n"
    md = selection_markdown(doc)
    assert f"**{CANDIDATES[5]}**" in md and md.count("\n| ") == len(CANDIDATES) + 3
