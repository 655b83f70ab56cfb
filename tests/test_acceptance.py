"""The acceptance validator: a good variant is promoted, each gate can fail on its own, FDR runs
over all hypotheses of the run, malformed results files are rejected naming the field, and
`bem validate` writes its reports atomically."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from bem.cli import main
from bem.stats import (AcceptanceThresholds, ResultsSchemaError, load_results, paired_test,
                       parse_results, validate, write_report)

FAST = {"n_resamples": 2000}  # keeps each validate() call to a few tens of milliseconds


def _system(name: str, scores: dict, **overrides) -> dict:
    system = {"name": name, "scores": {k: [float(v) for v in s] for k, s in scores.items()},
              "trainable_parameters": 1_000_000, "flops_per_token": 2.0e9,
              "latency_p50_ms": 100.0, "peak_memory_bytes": 8_000_000_000,
              "kv_cache_hit_rate": 0.80}
    system.update(overrides)
    return system


def _results(n: int = 201, seed: int = 0) -> dict:
    """A baseline and one clearly better adapter variant on exact match (primary) and F1."""
    rng = np.random.default_rng(seed)
    em = (rng.random(n) < 0.5).astype(float)
    f1 = np.clip(0.6 * em + 0.4 * rng.random(n), 0.0, 1.0)
    better_em = np.where((em == 0) & (rng.random(n) < 0.3), 1.0, em)
    better_f1 = np.clip(f1 + 0.05 + 0.05 * rng.standard_normal(n), 0.0, 1.0)
    return {
        "schema": "bem.acceptance.results",
        "schema_version": 1,
        "experiment": "unit-test run",
        "example_ids": [f"q{i}" for i in range(n)],
        "metrics": {"em": {"higher_is_better": True}, "f1": {"higher_is_better": True}},
        "primary_metric": "em",
        "baseline": _system("static-lora", {"em": em, "f1": f1}),
        "variants": [_system("v1-dynrank", {"em": better_em, "f1": better_f1}, kind="adapter",
                             trainable_parameters=1_020_000, flops_per_token=2.05e9,
                             latency_p50_ms=108.0, peak_memory_bytes=8_200_000_000,
                             kv_cache_hit_rate=0.81)],
    }


def _router(results: dict, **router) -> dict:
    variant = copy.deepcopy(results["variants"][0])
    variant.update(name="ar1-router", kind="router",
                   router={"avg_plan_length": 2.4, "index_swap_monotonic": True, **router})
    results["variants"].append(variant)
    return results


def _gate(report, variant: str, gate: str):
    decision = next(v for v in report.variants if v.name == variant)
    return next(g for g in decision.gates if g.gate == gate)


def test_good_variant_is_promoted_with_every_gate_reported():
    report = validate(_router(_results()), FAST)
    assert report.promoted == ["v1-dynrank", "ar1-router"]
    adapter, router = report.variants
    assert [g.gate for g in adapter.gates] == [
        "budget_parameters", "budget_flops", "primary_ci_lower", "fdr_primary", "latency_p50",
        "peak_memory", "kv_cache_hit_rate"]
    assert [g.gate for g in router.gates][-2:] == ["router_plan_length", "router_monotonicity"]
    assert all(g.passed and g.reason == "" for g in adapter.gates + router.gates)
    assert adapter.reasons == [] and adapter.decision == "PROMOTE"
    assert _gate(report, "v1-dynrank", "budget_parameters").measured == pytest.approx(1.02)
    assert _gate(report, "v1-dynrank", "latency_p50").measured == pytest.approx(1.08)
    em = adapter.metrics[0]
    assert em.metric == "em" and em.primary and em.ci_lower > 0 and em.fdr_rejected
    assert report.n_hypotheses == 4  # 2 variants × 2 metrics


@pytest.mark.parametrize("change, gate, reason", [
    ({"trainable_parameters": 1_060_000}, "budget_parameters", "trainable parameters is 1.060x"),
    ({"trainable_parameters": 940_000}, "budget_parameters", "trainable parameters is 0.940x"),
    ({"flops_per_token": 2.2e9}, "budget_flops", "FLOPs per token is 1.100x"),
    ({"latency_p50_ms": 116.0}, "latency_p50", "latency p50 is 1.160x the baseline's (limit 1.15x)"),
    ({"peak_memory_bytes": 8_500_000_000}, "peak_memory", "peak memory is 1.062x"),
    ({"kv_cache_hit_rate": 0.79}, "kv_cache_hit_rate", "KV-cache hit rate 0.79 is below 0.8"),
])
def test_each_system_gate_can_fail_alone(change, gate, reason):
    results = _results()
    results["variants"][0].update(change)
    decision = validate(results, FAST).variants[0]
    assert decision.decision == "REJECT"
    assert [g.gate for g in decision.gates if not g.passed] == [gate]
    assert decision.reasons == [_gate_reason(decision, gate)]
    assert reason in decision.reasons[0]


def _gate_reason(decision, gate):
    return next(g.reason for g in decision.gates if g.gate == gate)


@pytest.mark.parametrize("change", [{"trainable_parameters": 1_050_000},
                                    {"latency_p50_ms": 115.0}, {"kv_cache_hit_rate": 0.80}])
def test_gate_boundaries_pass(change):
    results = _results()
    results["variants"][0].update(change)
    assert validate(results, FAST).promoted == ["v1-dynrank"]


def test_router_gates_can_fail_and_apply_to_routers_only():
    report = validate(_router(_results(), avg_plan_length=3.2), FAST)
    assert report.promoted == ["v1-dynrank"]
    assert not _gate(report, "ar1-router", "router_plan_length").passed
    report = validate(_router(_results(), index_swap_monotonic=False), FAST)
    failed = [g.gate for g in report.variants[1].gates if not g.passed]
    assert failed == ["router_monotonicity"]
    assert "monotonicity check failed" in report.variants[1].reasons[0]
    relaxed = validate(_router(_results(), index_swap_monotonic=False),
                       {**FAST, "require_monotonic": False, "plan_length_max": 2.0})
    assert [g.gate for g in relaxed.variants[1].gates if not g.passed] == ["router_plan_length"]


def test_ci_gate_fails_alone_with_a_stricter_bound():
    decision = validate(_results(), {**FAST, "ci_lower_bound_min": 0.2}).variants[0]
    assert [g.gate for g in decision.gates if not g.passed] == ["primary_ci_lower"]
    assert "not > 0.2" in decision.reasons[0]


def test_no_improvement_fails_the_statistical_gates():
    results = _results()
    # The baseline's exact-match scores with three wins and three losses: no real difference.
    em = np.array(results["baseline"]["scores"]["em"])
    zeros, ones = np.flatnonzero(em == 0)[:3], np.flatnonzero(em == 1)[:3]
    em[zeros], em[ones] = 1.0, 0.0
    results["variants"][0]["scores"]["em"] = em.tolist()
    decision = validate(results, FAST).variants[0]
    failed = {g.gate for g in decision.gates if not g.passed}
    assert failed == {"primary_ci_lower", "fdr_primary"}
    assert decision.decision == "REJECT" and len(decision.reasons) == 2


def test_identical_scores_give_an_undefined_interval_and_reject():
    results = _results()
    results["variants"][0]["scores"]["em"] = list(results["baseline"]["scores"]["em"])
    decision = validate(results, FAST).variants[0]
    ci = next(g for g in decision.gates if g.gate == "primary_ci_lower")
    assert not ci.passed and np.isnan(ci.measured) and "undefined" in ci.reason
    assert decision.metrics[0].p_value == 1.0


def _weak_effect_results(extra_null_variants: int) -> dict:
    """One variant with a modest effect (two-sided p about 0.015 alone) plus null variants."""
    n = 100
    rng = np.random.default_rng(11)
    base = rng.normal(0.5, 0.2, n)
    z = rng.standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    results = {
        "schema": "bem.acceptance.results", "schema_version": 1, "experiment": "fdr",
        "example_ids": [str(i) for i in range(n)],
        "metrics": {"score": {"higher_is_better": True}}, "primary_metric": "score",
        "baseline": _system("base", {"score": base}),
        "variants": [_system("weak", {"score": base + 0.1 * (0.25 + z)}, kind="adapter")],
    }
    for k in range(extra_null_variants):
        noise = np.random.default_rng(100 + k).standard_normal(n) * 0.1
        results["variants"].append(_system(f"null{k}", {"score": base + noise - noise.mean()},
                                           kind="adapter"))
    return results


def test_fdr_runs_jointly_over_all_hypotheses_of_the_run():
    alone = validate(_weak_effect_results(0), FAST)
    weak = alone.variants[0].metrics[0]
    assert 0.005 < weak.p_value < 0.03
    assert weak.p_adjusted == weak.p_value and alone.promoted == ["weak"]
    crowded = validate(_weak_effect_results(5), FAST)
    weak_crowded = crowded.variants[0].metrics[0]
    assert weak_crowded.p_value == weak.p_value  # same data, same derived seed
    p_all = sorted(v.metrics[0].p_value for v in crowded.variants)
    assert weak_crowded.p_adjusted == pytest.approx(min(p * 6 / (i + 1) for i, p in
                                                        enumerate(p_all) if p >= weak.p_value))
    assert weak_crowded.p_adjusted > 0.05
    gate = _gate(crowded, "weak", "fdr_primary")
    assert not gate.passed and "not significant after BH over the run" in gate.reason
    assert crowded.n_hypotheses == 6


def test_fdr_gate_threshold_is_configurable():
    decision = validate(_results(), {**FAST, "fdr_alpha": 1e-9}).variants[0]
    assert [g.gate for g in decision.gates if not g.passed] == ["fdr_primary"]


def test_p_value_comes_from_the_configured_paired_test():
    results = _results()
    base = np.array(results["baseline"]["scores"]["f1"])
    variant = np.array(results["variants"][0]["scores"]["f1"])
    report = validate(results, {**FAST, "p_value_test": "t"})
    assert report.variants[0].metrics[1].p_value == pytest.approx(
        paired_test(variant, base, method="t"), rel=1e-12)
    report = validate(results, {**FAST, "p_value_test": "wilcoxon", "p_value_alternative": "greater"})
    assert report.variants[0].metrics[1].p_value == pytest.approx(
        paired_test(variant, base, method="wilcoxon", alternative="greater"), rel=1e-12)


def test_lower_is_better_metrics_count_a_decrease_as_improvement():
    results = _results()
    for system in [results["baseline"], *results["variants"]]:
        system["scores"]["loss"] = [1.0 - s for s in system["scores"]["f1"]]
    results["metrics"]["loss"] = {"higher_is_better": False}
    results["primary_metric"] = "loss"
    decision = validate(results, FAST).variants[0]
    loss = next(m for m in decision.metrics if m.metric == "loss")
    f1 = next(m for m in decision.metrics if m.metric == "f1")
    assert loss.primary and loss.mean_improvement == pytest.approx(f1.mean_improvement)
    assert loss.ci_lower > 0 and decision.decision == "PROMOTE"


def test_reports_are_deterministic_and_json_ready(tmp_path):
    results = _router(_results())
    one = validate(results, FAST).to_dict()
    two = validate(results, FAST).to_dict()
    assert one == two
    assert one["schema"] == "bem.acceptance.report" and one["schema_version"] == 1
    results["variants"][0]["scores"]["em"] = list(results["baseline"]["scores"]["em"])
    report = validate(results, FAST)
    text = report.to_json()
    decoded = json.loads(text)
    gate = next(g for g in decoded["variants"][0]["gates"] if g["gate"] == "primary_ci_lower")
    assert gate["measured"] is None and gate["passed"] is False  # NaN is written as null
    md = report.to_markdown()
    assert "| variant | decision |" in md and "**REJECT**" in md and "**PROMOTE**" in md
    assert "undefined **FAIL**" in md
    write_report(report, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text()) == decoded
    assert (tmp_path / "r.md").read_text() == md
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]  # no temporary files left


def test_default_thresholds_and_path_input(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    report = validate(path)
    assert report.thresholds == AcceptanceThresholds()
    assert report.promoted == ["v1-dynrank"]
    assert validate(load_results(path)).to_dict() == report.to_dict()


# ---- malformed results -------------------------------------------------------------------------

def _drop(path: str):
    def edit(r):
        *parents, last = _walk(r, path)
        del parents[-1][last]
    return edit


def _set(path: str, value):
    def edit(r):
        *parents, last = _walk(r, path)
        parents[-1][last] = value
    return edit


def _walk(r, path):
    """[container, ..., container, last key] along a path like 'variants.0.scores.em'."""
    node, out = r, []
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        out.append(node)
        node = node[key]
    out.append(node)
    return out + [keys[-1]]


def _short_scores(r):
    r["variants"][0]["scores"]["f1"] = r["variants"][0]["scores"]["f1"][:-1]


def _duplicate_variant(r):
    r["variants"].append(copy.deepcopy(r["variants"][0]))


MALFORMED = [
    (_drop("baseline"), "baseline", "missing required field"),
    (_drop("variants.0.latency_p50_ms"), "variants[0].latency_p50_ms", "missing required field"),
    (_drop("variants.0.kind"), "variants[0].kind", "missing"),
    (_drop("variants.0.scores.f1"), "variants[0].scores.f1", "missing"),
    (_set("variants.0.latency_p50", 1.0), "variants[0].latency_p50", "unknown field"),
    (_set("extra", 1), "extra", "unknown field"),
    (_set("schema", "bem.results"), "schema", "expected 'bem.acceptance.results'"),
    (_set("schema_version", 2), "schema_version", "expected 1"),
    (_set("schema_version", "1"), "schema_version", "expected an integer, got string"),
    (_set("variants.0.trainable_parameters", "1020000"), "variants[0].trainable_parameters",
     "expected an integer, got string"),
    (_set("variants.0.trainable_parameters", 1.02e6), "variants[0].trainable_parameters",
     "expected an integer, got number"),
    (_set("baseline.peak_memory_bytes", 0), "baseline.peak_memory_bytes", "expected an integer >= 1"),
    (_set("baseline.flops_per_token", -1.0), "baseline.flops_per_token", "expected a number > 0"),
    (_set("variants.0.kv_cache_hit_rate", 1.2), "variants[0].kv_cache_hit_rate", "in [0, 1], got 1.2"),
    (_set("variants.0.latency_p50_ms", True), "variants[0].latency_p50_ms",
     "expected a finite number, got boolean"),
    (_set("variants.0.scores.em.3", "x"), "variants[0].scores.em[3]", "expected a finite number"),
    (_set("baseline.scores.em.0", None), "baseline.scores.em[0]", "got null"),
    (_set("variants.0.scores.em.7", True), "variants[0].scores.em[7]", "got boolean"),
    (_short_scores, "variants[0].scores.f1", "expected 201 scores (one per example_ids entry), got 200"),
    (_set("variants.0.scores", []), "variants[0].scores", "expected an object, got array"),
    (_set("example_ids.5", "q4"), "example_ids[5]", "duplicate example id 'q4'"),
    (_set("example_ids", ["only"]), "example_ids", "at least 2"),
    (_set("metrics", {}), "metrics", "non-empty object"),
    (_set("metrics.em", {"higher_is_better": 1}), "metrics.em.higher_is_better", "expected true or false"),
    (_set("primary_metric", "bleu"), "primary_metric", "expected one of the metrics"),
    (_set("variants", []), "variants", "non-empty array"),
    (_set("variants.0.kind", "moe"), "variants[0].kind", "expected one of adapter, router"),
    (_set("variants.0.kind", "router"), "variants[0].router", "kind is 'router'"),
    (_set("variants.0.router", {"avg_plan_length": 1.0, "index_swap_monotonic": True}),
     "variants[0].router", "only allowed when kind is 'router'"),
    (_set("variants.0.name", "static-lora"), "variants[0].name", "duplicate system name"),
    (_duplicate_variant, "variants[1].name", "duplicate system name 'v1-dynrank'"),
    (_set("experiment", ""), "experiment", "non-empty string"),
]


@pytest.mark.parametrize("edit, field, message", MALFORMED)
def test_malformed_results_are_rejected_naming_the_field(edit, field, message):
    results = _results()
    edit(results)
    with pytest.raises(ResultsSchemaError) as info:
        validate(results, FAST)
    assert info.value.field == field
    assert message in str(info.value) and str(info.value).startswith(field + ": ")


def test_router_fields_are_checked():
    results = _router(_results())
    results["variants"][1]["router"]["avg_plan_length"] = -1
    with pytest.raises(ResultsSchemaError, match=r"avg_plan_length: expected a number >= 0, got -1"):
        validate(results, FAST)
    results["variants"][1]["router"]["avg_plan_length"] = 2.0
    results["variants"][1]["router"]["index_swap_monotonic"] = "yes"
    with pytest.raises(ResultsSchemaError, match=r"variants\[1\]\.router\.index_swap_monotonic"):
        validate(results, FAST)
    del results["variants"][1]["router"]["avg_plan_length"]
    with pytest.raises(ResultsSchemaError, match=r"variants\[1\]\.router\.avg_plan_length: missing"):
        validate(results, FAST)


@pytest.mark.parametrize("text, message", [
    ('{"schema": NaN}', "non-finite numbers are not allowed"),
    ('{"schema": 1, "schema": 2}', "duplicate key 'schema'"),
    ('{"schema": ', "not valid JSON"),
])
def test_invalid_json_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_results(path)


def test_top_level_must_be_an_object():
    with pytest.raises(ResultsSchemaError, match=r"\(top level\): expected an object, got array"):
        parse_results([1, 2])


@pytest.mark.parametrize("overrides, error, message", [
    ({"latency_ratio": 1.2}, ValueError, "thresholds.latency_ratio: unknown threshold"),
    ({"fdr_alpha": 0.0}, ValueError, "fdr_alpha: expected a float in \\(0, 1\\)"),
    ({"fdr_method": "holm"}, ValueError, "fdr_method: expected one of"),
    ({"p_value_test": "z"}, ValueError, "p_value_test"),
    ({"n_resamples": 0}, ValueError, "n_resamples"),
    ({"budget_tolerance": -0.1}, ValueError, "budget_tolerance: expected a number >= 0"),
    ({"latency_ratio_max": "1.2"}, TypeError, "latency_ratio_max: expected a finite number"),
    ({"require_monotonic": 1}, TypeError, "require_monotonic: expected a bool"),
])
def test_bad_thresholds_are_named(overrides, error, message):
    with pytest.raises(error, match=message):
        validate(_results(), overrides)


def test_bad_argument_types():
    with pytest.raises(TypeError, match="results: expected a path"):
        validate(42)
    with pytest.raises(TypeError, match="thresholds: expected AcceptanceThresholds"):
        validate(_results(), thresholds=[1])


# ---- the command line --------------------------------------------------------------------------

def test_cli_validate_writes_reports(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_router(_results(), avg_plan_length=3.5)))
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps(FAST))
    out_json, out_md = tmp_path / "report.json", tmp_path / "report.md"
    code = main(["validate", str(results), "--json", str(out_json), "--markdown", str(out_md),
                 "--thresholds", str(thresholds)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed == out_md.read_text()
    report = json.loads(out_json.read_text())
    assert report["promoted"] == ["v1-dynrank"]
    assert report["thresholds"]["n_resamples"] == 2000
    assert [v["decision"] for v in report["variants"]] == ["PROMOTE", "REJECT"]
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md", "results.json",
                                            "thresholds.json"]


def test_cli_relaxed_threshold_changes_the_decision(tmp_path, capsys):
    results = _results()
    results["variants"][0]["latency_p50_ms"] = 118.0
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(FAST))
    relaxed = tmp_path / "relaxed.json"
    relaxed.write_text(json.dumps({**FAST, "latency_ratio_max": 1.2}))
    assert main(["validate", str(path), "--thresholds", str(strict)]) == 0
    assert "latency p50 is 1.180x" in capsys.readouterr().out
    assert main(["validate", str(path), "--thresholds", str(relaxed)]) == 0
    assert "every gate passed" in capsys.readouterr().out


def test_cli_rejects_malformed_files(tmp_path, capsys):
    results = _results()
    del results["variants"][0]["peak_memory_bytes"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "report.json"
    assert main(["validate", str(path), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "variants[0].peak_memory_bytes: missing required field" in err
    assert not out.exists()
    assert main(["validate", str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capsys.readouterr().err
    bad = tmp_path / "thresholds.json"
    bad.write_text('{"latency_ratio": 1.2}')
    path.write_text(json.dumps(_results()))
    assert main(["validate", str(path), "--thresholds", str(bad)]) == 2
    assert "thresholds.latency_ratio: unknown threshold" in capsys.readouterr().err
