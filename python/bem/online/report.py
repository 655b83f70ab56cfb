"""The report of a `bem online` run: report.md with the headline numbers (regressions shipped with
and without the canary gate, forgetting with and without EWC, detection delays, rejections and
why) and a PNG of the stream (prequential accuracy, held-out accuracy per domain at each release,
drift alarms, released and rejected rounds, rollbacks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bem.experiments.report import figure_png
from bem.online.stream import Segment, StreamItem, change_points
from bem.serialization import atomic_write


def plot_stream(logs: dict, segments: list[Segment], stream_length: int) -> bytes:
    """Top: the guarded arm's prequential accuracy (rolling mean of 64; the unguarded arm's dotted)
    and held-out accuracy per domain after each release, segment boundaries, released (▲) and
    rejected (✕) rounds. Bottom: each detector's alarms on the guarded arm."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5))
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    g = logs["guarded"]
    pre = np.array(g["prequential"], dtype=float)
    pre_u = np.array(logs["unguarded"].get("prequential", []), dtype=float)
    if pre_u.size:
        k = min(64, pre_u.size)
        roll = np.convolve(pre_u, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, pre_u.size), roll, color="tab:purple", lw=1, ls=":",
                label="unguarded: prequential accuracy (rolling 64)")
    if pre.size:
        k = min(64, pre.size)
        roll = np.convolve(pre, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, pre.size), roll, color="0.4", lw=1.2,
                label="prequential accuracy on the feedback (rolling 64)")
    rounds = [r for r in g["rounds"] if "heldout" in r]
    domains = sorted({d for r in rounds for d in r["heldout"]})
    for d in domains:
        xs = [r["end"] for r in rounds if d in r["heldout"]]
        ys = [r["heldout"][d] for r in rounds if d in r["heldout"]]
        ax.plot(xs, ys, marker=".", lw=1, label=f"held-out {d} (released adapter)")
    for r in g["rounds"]:
        ax.plot(r["end"], 1.04, marker="^" if r["released"] else "x",
                color="tab:green" if r["released"] else "tab:red", ms=6, clip_on=False)
    pos = 0
    for k, s in enumerate(segments):
        ax.axvline(pos, color="0.8", lw=0.8)
        ax.text(pos + 4, -0.12 if k % 2 == 0 else -0.06, s.name, fontsize=7, rotation=0)
        pos += s.items
    ax.set_ylim(-0.15, 1.08)
    ax.set_ylabel("accuracy (teacher-forced exact match)")
    ax.set_title("guarded arm: ▲ released, ✕ rejected by the canary and rolled back")
    ax.legend(fontsize=7, loc="center right")
    for row, (name, alarms) in enumerate(g["alarms"].items()):
        ax2.scatter(alarms, [row] * len(alarms), marker="|", s=120)
    for cp in change_points(segments):
        ax2.axvline(cp, color="0.6", lw=0.8, ls="--")
    ax2.set_yticks(range(len(g["alarms"])), list(g["alarms"]))
    ax2.set_xlim(0, stream_length)
    ax2.set_xlabel("stream position (items)")
    ax2.set_title("the guarded arm's drift alarms (dashed: true change points; the unguarded "
                  "arm's are in report.md)", fontsize=9)
    return figure_png(fig)


def plot_forgetting(logs: dict, segments: list[Segment], clean_segments: list[Segment]) -> bytes:
    """Held-out accuracy per domain: the unguarded arm after every release (the whole stream),
    and no EWC, EWC and replay at the end of each clean segment."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5))
    axes = fig.subplots(2, 2, sharey=True).reshape(-1)
    rounds = [r for r in logs["unguarded"]["rounds"] if "heldout" in r]
    domains = sorted({d for r in rounds for d in r["heldout"]} |
                     {s.domain for s in clean_segments})
    ax = axes[0]
    for d in domains:
        pts = [(r["end"], r["heldout"][d]) for r in rounds if d in r["heldout"]]
        if pts:
            ax.plot(*zip(*pts), marker=".", lw=1, label=d)
    for cp in change_points(segments):
        ax.axvline(cp, color="0.8", lw=0.8)
    ax.set_title("unguarded: held-out after every release", fontsize=9)
    ax.set_xlabel("stream position (items)")
    ax.legend(fontsize=7)
    for ax, name, title in zip(axes[1:], ("plain", "ewc", "replay"),
                               ("no EWC", "EWC", "replay, no EWC")):
        ends = logs[name]["segment_ends"]
        for d in domains:
            ax.plot(range(len(ends)), [e["heldout"][d] for e in ends], marker="o", lw=1, label=d)
        ax.set_xticks(range(len(ends)), [f"after {clean_segments[e['segment']].name}"
                                         for e in ends], fontsize=7)
        ax.set_title(f"{title}: held-out at the end of each domain", fontsize=9)
    axes[0].set_ylabel("held-out accuracy")
    axes[2].set_ylabel("held-out accuracy")
    fig.tight_layout()
    return figure_png(fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def report_markdown(results: dict, segments: list[Segment]) -> str:
    g, u, fg = results["guarded"], results["unguarded"], results["forgetting"]
    sh = results["shadow"]
    lines = ["# bem online", "",
             "Stream: " + " → ".join(f"{s.name} ({s.items})" for s in segments) + ".", "",
             "## Releases and regressions", "",
             "A regression is a released round after which some domain's held-out accuracy is "
             "lower than under the previous release, with the paired BCa 95% interval of the "
             "difference wholly below 0.", "",
             "| arm | rounds | released | rejected | rollbacks | regressions shipped |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in (("guarded (canary + rollback)", g), ("shadow (canary, learner kept)", sh),
                    ("unguarded", u)):
        lines.append(f"| {name} | {r['rounds']} | {r['released']} | {r['rejected']} | "
                     f"{r['rollbacks']} | {r['regressions_shipped']} |")
    lines += ["", f"Poisoned segment: {g['poison_rounds']} rounds; released: guarded "
              f"{g['poison_rounds_released']}, shadow {sh['poison_rounds_released']}.", ""]
    for name, r in (("guarded", g), ("shadow", sh)):
        if r["rejections_by_reason"]:
            lines += [f"Rejections of the {name} arm by reason (a round can have several):", "",
                      "| reason | rounds |", "|---|---:|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(r["rejections_by_reason"].items())]
            lines.append("")
    for name, r in (("unguarded", u), ("guarded", g), ("shadow", sh)):
        if r["regressions"]:
            lines += [f"Regressions shipped by the {name} arm:", "",
                      "| round start | domain | Δ held-out | 95% CI |", "|---:|---|---:|---|"]
            lines += [f"| {x['round_start']} | {x['domain']} | {x['delta']:+.3f} | "
                      f"[{x['ci_lower']:+.3f}, {x['ci_upper']:+.3f}] |" for x in r["regressions"]]
            lines.append("")
    lines += ["Final held-out accuracy per domain:", "",
              "| arm | " + " | ".join(g["final_heldout"]) + " |",
              "|---|" + "---:|" * len(g["final_heldout"])]
    for name, r in (("guarded", g), ("shadow", sh), ("unguarded", u)):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["final_heldout"].values())
                     + " |")
    sel = results["selection"]
    dom = list(fg["plain"]["per_domain"])
    lines += ["", "## Forgetting with and without EWC (clean domain sequence, every round "
              "released, test split)", ""]
    if sel.get("given"):
        lines += [f"λ = {sel['lambda']:g}, given in the configuration (no selection).", ""]
    else:
        lines += [f"λ chosen before the test runs, on a validation stream (train-split items, "
                  f"seed {sel['stream_seed']}; evaluated on the validation split): the λ > 0 of "
                  f"the grid {sel['grid']} with the least forgetting among those whose plasticity "
                  f"is at least plasticity(λ = 0) − {sel['margin']:g} = "
                  f"{sel['plasticity_floor']:.3f}; the grid stops at the first λ below that floor.",
                  "", "| λ (validation) | forgetting | plasticity |", "|---:|---:|---:|"]
        lines += [f"| {r['lambda']:g} | {r['forgetting']:.3f} | {r['plasticity']:.3f} |"
                  for r in sel["rows"]]
        lines += ["", f"Chosen: λ = {sel['lambda']:g}" + (
            "" if sel["equal_plasticity"] else " (no λ of the grid kept the plasticity: the "
            "smallest was taken)") + ".", ""]
    lines += ["| learner (test stream) | forgetting (mean over earlier domains) | plasticity | " +
              " | ".join(f"forgot {d}" for d in dom) + " |",
              "|---|---:|---:|" + "---:|" * len(dom)]
    for name, label in (("plain", "no EWC (λ = 0)"), ("ewc", f"EWC λ = {sel['lambda']:g}"),
                        ("replay", "replay, no EWC")):
        f = fg[name]
        lines.append(f"| {label} | {f['mean']:.3f} | {f['plasticity']:.3f} | " +
                     " | ".join(f"{f['per_domain'].get(d, float('nan')):.3f}" for d in dom)
                     + " |")
    lines += ["", f"EWC removes {_pct(fg['ewc_reduction'])} of the forgetting (plasticity "
              + ("within" if fg["ewc_equal_plasticity"] else "NOT within")
              + f" {sel.get('margin', results['config']['plasticity_margin']):g} of no EWC); "
              f"replay removes {_pct(fg['replay_reduction'])} (plasticity "
              + ("within" if fg["replay_equal_plasticity"] else "NOT within") + "). Forgetting "
              "of a domain: its best held-out accuracy at the end of its own or a later segment "
              "minus its accuracy at the end; plasticity: mean held-out accuracy of each "
              "segment's domain at the end of that segment.", "",
              "## Drift detection (prequential correctness of the served adapter on the "
              "feedback)", "",
              "| arm | detector | " + " | ".join(f"delay @ {cp}" for cp in
                                                results["detectors"]["change_points"]) +
              " | alarms | unmatched alarms |",
              "|---|---|" + "---:|" * (len(results["detectors"]["change_points"]) + 2)]
    for arm, table in (("guarded", results["detectors"]["per_detector"]),
                       ("unguarded", results["detectors"].get("unguarded", {}))):
        for name, d in table.items():
            lines.append(f"| {arm} | {name} | " + " | ".join("missed" if v is None else str(v)
                                                           for v in d["delays"]) +
                         f" | {len(d['alarms'])} | {len(d['unmatched_alarms'])} |")
    lines += ["", "Delay: items from a change point to the detector's first alarm in that segment. "
              "Unmatched alarms are later alarms within a segment (the monitored accuracy also "
              "moves as releases land).", "",
              "![stream](stream.png)", "", "![forgetting](forgetting.png)", "",
              "Time per arm (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                              results["seconds"].items()), ""]
    return "\n".join(lines)


def write_report(folder: Path, results: dict, logs: dict, segments: list[Segment],
                 stream: list[StreamItem]) -> None:
    atomic_write(folder / "stream.png", plot_stream(logs, segments, len(stream)))
    atomic_write(folder / "forgetting.png", plot_forgetting(
        logs, segments, [s for s in segments if s.kind == "clean"]))
    atomic_write(folder / "report.md", report_markdown(results, segments).encode())
