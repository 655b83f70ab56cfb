"""The human-readable report of a run: report.md (base model scores, systems, budgets,
measurements, metric deltas with BCa intervals, the acceptance verdicts with reasons) and PNG
plots (metric deltas with intervals; latency and memory overheads), drawn with matplotlib's
object API (no global pyplot state, no display needed)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from bem.experiments.config import BASELINE, VARIANT_TITLES
from bem.experiments.evaluation import METRICS, Evaluation, per_task
from bem.experiments.systems import BudgetRow
from bem.serialization import atomic_write
from bem.stats import AcceptanceReport

METRIC_TITLES = {"exact_match": "exact match", "token_f1": "token F1",
                 "format_valid": "format validity"}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def figure_png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes (110 dpi, tight box): the one rendering of bem's reports."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_deltas(report: AcceptanceReport) -> bytes:
    """One panel per metric: each variant's mean improvement over the baseline with its BCa
    interval (the interval of the primary metric is the promotion gate)."""
    from matplotlib.figure import Figure

    names = [v.name for v in report.variants]
    fig = Figure(figsize=(4.2 * len(METRICS), 0.55 * len(names) + 1.6))
    axes = fig.subplots(1, len(METRICS), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, METRICS):
        y = np.arange(len(names))
        for i, v in enumerate(report.variants):
            m = next(r for r in v.metrics if r.metric == metric)
            lo, hi = m.ci_lower, m.ci_upper
            color = "tab:green" if v.decision == "PROMOTE" else "tab:red"
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.plot([lo, hi], [i, i], color=color, lw=2)
            ax.plot([m.mean_improvement], [i], "o", color=color)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(y, names)
        ax.set_title(f"{METRIC_TITLES[metric]} − baseline"
                     + (" (primary)" if metric == report.primary_metric else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Mean improvement with {report.thresholds.confidence:.0%} BCa intervals "
                 "(green: PROMOTE, red: REJECT)")
    return figure_png(fig)


def plot_overheads(evals: dict[str, Evaluation], report: AcceptanceReport) -> bytes:
    """Latency p50 (per generated token) and peak memory of each variant relative to the
    baseline, with the gates' limits."""
    from matplotlib.figure import Figure

    names = [v.name for v in report.variants]
    base = evals[BASELINE]
    lat = [evals[n].latency_p50_ms / base.latency_p50_ms for n in names]
    mem = [evals[n].peak_memory_bytes / base.peak_memory_bytes for n in names]
    fig = Figure(figsize=(9, 0.5 * len(names) + 1.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, vals, limit, title in ((axes[0], lat, report.thresholds.latency_ratio_max,
                                    "latency p50 / baseline"),
                                   (axes[1], mem, report.thresholds.memory_ratio_max,
                                    "peak memory / baseline")):
        ax.barh(np.arange(len(names)), vals, color=["tab:red" if v > limit else "tab:blue"
                                                     for v in vals])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"limit {limit:.2f}x")
        ax.set_yticks(np.arange(len(names)), names)
        ax.set_title(title)
        ax.legend(loc="lower right")
    return figure_png(fig)


def _base_section(state: dict, base_eval: dict) -> list[str]:
    m = state["base"]
    cfg = m["model"]
    lines = ["## The base model", "",
             f"bem's built-in transformer (d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
             f"{cfg['n_heads']} heads, d_ff {cfg['d_ff']}, byte vocabulary), pre-trained by bem on "
             f"the suite's train split: {m['pretrain']['steps']} steps of "
             f"about {m['pretrain']['batch_tokens']} tokens, loss {m['loss_first']:.3f} → "
             f"{m['loss_last']:.3f}, {m['train_seconds']:.0f} s "
             f"({'loaded from the cache' if m['cached'] else 'trained in this run'}; cache key "
             f"`{m['key']}`).", "",
             "Its own scores on the held-out adaptation test split (greedy, no adapter):", "",
             "| task | n | exact match | token F1 | format validity |", "|---|---:|---:|---:|---:|"]
    for task, row in base_eval["per_task"].items():
        lines.append(f"| {task} | {row['n']} | {_fmt(row['exact_match'])} | "
                     f"{_fmt(row['token_f1'])} | {_fmt(row['format_valid'])} |")
    s = base_eval["scores"]
    lines.append(f"| **all** | {len(s['exact_match'])} | {_fmt(float(np.mean(s['exact_match'])))} | "
                 f"{_fmt(float(np.mean(s['token_f1'])))} | "
                 f"{_fmt(float(np.mean(s['format_valid'])))} |")
    general = base_eval.get("general_teacher_forced")
    if general:
        lines += ["", "Its general skills (the pre-training tasks, 40 test examples each, "
                  "teacher-forced exact match): " + ", ".join(
                      f"{task} {_fmt(v)}" for task, v in general.items()) + "."]
    return lines + [""]


def _adaptation_section(examples, base_eval: dict, evals: dict[str, Evaluation]) -> list[str]:
    """Exact match per adaptation domain and on the parts after a domain switch, every system."""
    slices = list(base_eval["per_task"])
    lines = ["## Adaptation domains: exact match per domain and after a switch", "",
             "`switched`: the second part of two-part sequences, whose domain differs from the "
             "first part's (one adapter per request cannot serve both parts).", "",
             "| system | " + " | ".join(slices) + " | all |",
             "|---|" + "---:|" * (len(slices) + 1)]
    rows = {"base (no adapter)": base_eval["scores"]}
    rows.update({n: ev.scores for n, ev in evals.items()})
    for name, scores in rows.items():
        table = per_task(examples, scores)
        lines.append(f"| {name} | " + " | ".join(_fmt(table[s]["exact_match"]) for s in slices)
                     + f" | {_fmt(float(np.mean(scores['exact_match'])))} |")
    return lines + [""]


def _comparisons_section(evals: dict[str, Evaluation], n_resamples: int, seed: int
                         ) -> list[str]:
    """Paired exact-match differences between the routed systems and the references (BCa 95%
    intervals): what routing per chunk adds over one adapter per request and over the static
    baseline, and how far it stays from the oracle."""
    from bem.stats import bca_interval

    pairs = [(a, b) for a, b in (("AR1", BASELINE), ("AR1", "per_request"), ("oracle", "AR1"),
                                 ("per_request", BASELINE), ("oracle", BASELINE),
                                 ("full_AR1", "full"), ("full_AR1", BASELINE))
             if a in evals and b in evals]
    if not pairs:
        return []
    lines = ["## Routing against the references (exact match, paired, BCa 95%)", "",
             "per_request and oracle share AR1's experts; they are references, not candidates "
             "(not validated). full_AR1 − full: what AR1's per-chunk routing of the dynamic-rank "
             "experts adds to the full stack at equal budget.", "", "| comparison | mean Δ | CI lower | CI upper |",
             "|---|---:|---:|---:|"]
    for a, b in pairs:
        x = np.asarray(evals[a].scores["exact_match"])
        y = np.asarray(evals[b].scores["exact_match"])
        if np.all(x == y):
            lines.append(f"| {a} − {b} | +0.0000 | — | — |")
            continue
        ci = bca_interval(x, paired_with=y, n_resamples=n_resamples, seed=seed)
        lines.append(f"| {a} − {b} | {ci.observed:+.4f} | {_fmt(ci.lower, 4)} | "
                     f"{_fmt(ci.upper, 4)} |")
    return lines + [""]


def _routing_section(routing: dict[str, dict | None]) -> list[str]:
    """Routing telemetry of the routed systems (AR1, full_AR1, per request, oracle)."""
    routing = {k: v for k, v in routing.items() if v}
    if not routing:
        return []
    lines = ["## Routing telemetry", "",
             "Greedy routing on the evaluation sequences. Expert chosen at each part's question "
             "chunk, by the part's domain; switch rate = chunk-to-chunk action changes / "
             "(chunks − 1); plan length = distinct actions per sequence; index swap = exact match "
             "(teacher-forced) with every chosen expert e replaced by (e + 1) mod 4; projection = "
             "the trust region's factors min(1, τ/‖ΔW‖_F) over evaluation forwards.", "",
             "| system | switch rate | mean plan length | plan lengths | EM routed / swapped | "
             "projected / evaluated | mean factor (projected) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name, r in routing.items():
        p = r["projection"]
        lines.append(f"| {name} | {_fmt(r['switch_rate'])} | {_fmt(r['avg_plan_length'], 2)} | "
                     f"{r['plan_length_histogram']} | "
                     f"{_fmt(r['index_swap']['routed_exact_match'])} / "
                     f"{_fmt(r['index_swap']['swapped_exact_match'])} | "
                     f"{p['projected']} / {p['evaluations']} | {_fmt(p['mean_factor'])} |")
    for name, r in routing.items():
        experts = sorted({e for row in r["domain_expert"].values() for e in row})
        lines += ["", f"**{name}: domain × expert** (parts)", "",
                  "| domain | " + " | ".join(experts) + " |", "|---|" + "---:|" * len(experts)]
        for domain, row in r["domain_expert"].items():
            lines.append(f"| {domain} | " + " | ".join(str(row.get(e, 0)) for e in experts) + " |")
    return lines + [""]


def _systems_section(evals: dict[str, Evaluation], budgets: dict[str, BudgetRow],
                     target: int) -> list[str]:
    lines = ["## Systems", "",
             f"Every system trains only its adapter on the frozen base, with the same seed, data "
             f"order, steps and learning rate. Budget target: {target} trainable parameters; the "
             f"baseline is a static LoRA on the attention input, and each variant is sized to within a rank or width step of it. Latency is the wall time "
             f"of a request's decode steps per generated token after the first (single requests, "
             f"greedy, through the KV cache; requests of one token are left out); TTFT is the time "
             f"to the first token (V2's gate shaping and the prefill).", "",
             "| system | what | trainable params | FLOPs/token | EM | F1 | format | latency p50 "
             "(ms/token) | p95 | TTFT p50 (ms) | peak memory (MiB) | KV hit rate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ev in evals.items():
        b = budgets[name]
        what = "static LoRA" if name == BASELINE else VARIANT_TITLES[name]
        lines.append(
            f"| {name} | {what} | {b.trainable_parameters} | {b.flops_per_token:.4g} | "
            f"{_fmt(float(np.mean(ev.scores['exact_match'])))} | "
            f"{_fmt(float(np.mean(ev.scores['token_f1'])))} | "
            f"{_fmt(float(np.mean(ev.scores['format_valid'])))} | {_fmt(ev.latency_p50_ms, 2)} | "
            f"{_fmt(ev.latency_p95_ms, 2)} | {_fmt(ev.ttft_p50_ms, 2)} | "
            f"{ev.peak_memory_bytes / 2**20:.1f} | "
            f"{_fmt(ev.kv_cache_hit_rate)} |")
    return lines + [""]


def _verdict_section(report: AcceptanceReport) -> list[str]:
    lines = ["## Verdicts", "",
             "| variant | decision | reasons |", "|---|---|---|"]
    for v in report.variants:
        lines.append(f"| {v.name} | **{v.decision}** | {'; '.join(v.reasons) or '—'} |")
    rejected = [v.name for v in report.variants if v.decision == "REJECT"]
    lines.append("")
    if rejected:
        lines.append(f"Rejected: {', '.join(rejected)}. A REJECT means this run's measurements do "
                     "not meet every gate (for the metric gates: the data do not show an "
                     "improvement over the baseline at the stated confidence after FDR control). "
                     "bem reports it as measured; nothing is re-run or tuned toward a verdict.")
    else:
        lines.append("Every variant passed every gate in this run.")
    lines += ["", "### Metric deltas (variant − baseline, BCa intervals, BH-adjusted p-values)", "",
              "| variant | metric | mean Δ | CI lower | CI upper | p | p adjusted |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for v in report.variants:
        for m in v.metrics:
            lines.append(f"| {v.name} | {m.metric}{' (primary)' if m.primary else ''} | "
                         f"{m.mean_improvement:+.4f} | {_fmt(m.ci_lower, 4)} | "
                         f"{_fmt(m.ci_upper, 4)} | {_fmt(m.p_value, 4)} | "
                         f"{_fmt(m.p_adjusted, 4)} |")
    return lines + ["", "![metric deltas](deltas.png)", "",
                    "![latency and memory overheads](overheads.png)", ""]


def write_report_folder(folder: Path, state: dict, report: AcceptanceReport, examples,
                        base_eval: dict, evals: dict[str, Evaluation],
                        budgets: dict[str, BudgetRow], *, machine: str,
                        routing: dict[str, dict | None] | None = None, n_resamples: int = 10_000,
                        seed: int = 0) -> Path:
    """Write deltas.png, overheads.png and report.md into `folder` (atomically). Returns the
    report's path."""
    atomic_write(folder / "deltas.png", plot_deltas(report))
    atomic_write(folder / "overheads.png", plot_overheads(evals, report))
    cfg = state["config"]
    seconds = state["seconds"]
    lines = [f"# bem run `{folder.name}`", "",
             f"Machine: {machine}. Seed {cfg['seed']}, suite seed {cfg['suite_seed']}, "
             f"{len(examples)} held-out test examples of the adaptation domains "
             f"({cfg['eval_single']} one-part sequences, {cfg['eval_switch']} two-part sequences "
             f"that switch domain), "
             f"{cfg['train_steps']} adapter training steps of {cfg['train_batch_size']} examples. "
             f"Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".",
             ""]
    lines += _verdict_section(report)
    lines += _base_section(state, base_eval)
    lines += _systems_section(evals, budgets, state["target_parameters"])
    lines += _adaptation_section(examples, base_eval, evals)
    lines += _comparisons_section(evals, n_resamples, seed)
    lines += _routing_section(routing or {})
    lines += ["## Acceptance gates (bem validate)", "", report.to_markdown(), ""]
    path = folder / "report.md"
    atomic_write(path, "\n".join(lines).encode())
    return path
