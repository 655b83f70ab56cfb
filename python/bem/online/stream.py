"""The feedback stream of `bem online`, built from the suite's adaptation domains: clean segments
in one domain each, a segment of poisoned feedback (answers signed with the wrong domain's word),
and a slow gradual drift from one domain to another; plus the held-out and canary sets per
domain (different splits of the suite, so no stream item is ever evaluated on)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from bem.tasks import DOMAINS, Example, generate_adaptation


@dataclass(frozen=True)
class Segment:
    """kind: "clean" (domain `domain`), "poison" (domain `domain`, feedback signed with the word
    of `poison_with`), or "gradual" (from `domain` to `to`, the share of `to` rising linearly)."""

    name: str
    kind: str
    domain: str
    items: int
    to: str = ""
    poison_with: str = ""


@dataclass(frozen=True)
class StreamItem:
    example: Example        # the feedback as received (poisoned answers included)
    domain: str             # the domain in force
    segment: int            # index of its segment
    poisoned: bool


def default_segments(clean: int, poison: int, gradual: int) -> list[Segment]:
    """ok → done → poisoned done → over → gradual over→end → end."""
    return [Segment("ok", "clean", "ok", clean), Segment("done", "clean", "done", clean),
            Segment("done (poisoned)", "poison", "done", poison, poison_with="end"),
            Segment("over", "clean", "over", clean),
            Segment("over→end (gradual)", "gradual", "over", gradual, to="end"),
            Segment("end", "clean", "end", clean)]


def _pools(split: str, per_domain: int, seed: int) -> dict[str, list[Example]]:
    pools: dict[str, list[Example]] = {d: [] for d in DOMAINS}
    n = per_domain * len(DOMAINS)
    while min(len(p) for p in pools.values()) < per_domain:
        pools = {d: [] for d in DOMAINS}
        for ex in generate_adaptation(split, n, 0, seed=seed):
            pools[ex.domain].append(ex)
        n *= 2
    return {d: p[:per_domain] for d, p in pools.items()}


def build_stream(segments: list[Segment], seed: int) -> list[StreamItem]:
    """The stream, deterministic per (segments, seed), from the suite's train split."""
    need = {d: 0 for d in DOMAINS}
    for s in segments:
        need[s.domain] += s.items
        if s.to:
            need[s.to] += s.items
    pools = _pools("train", max(need.values()), seed)
    used = {d: 0 for d in DOMAINS}
    rng = random.Random(f"bem-online/stream/{seed}")
    out = []
    for k, s in enumerate(segments):
        for i in range(s.items):
            d = s.domain
            if s.kind == "gradual" and rng.random() < (i + 1) / s.items:
                d = s.to
            ex = pools[d][used[d]]
            used[d] += 1
            poisoned = s.kind == "poison"
            if poisoned:
                plain = ex.answer.rsplit(" ", 1)[0]
                ex = Example(ex.task, ex.prompt, f"{plain} {s.poison_with}", ex.fmt, ex.group,
                             ex.domain, ex.history)
            out.append(StreamItem(ex, d, k, poisoned))
    return out


def held_out_sets(per_domain: int, canary_per_domain: int, seed: int
                  ) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """(held-out evaluation set, canary set) per domain: the suite's test and validation splits."""
    return _pools("test", per_domain, seed), _pools("validation", canary_per_domain, seed)


def selection_sets(per_domain: int, seed: int) -> dict[str, list[Example]]:
    """Evaluation sets per domain for choosing hyper-parameters (λ) on a validation stream: the
    suite's validation split, never the test split the reported numbers come from."""
    return _pools("validation", per_domain, seed)


def change_points(segments: list[Segment]) -> list[int]:
    """Stream index where each segment after the first starts."""
    out, pos = [], 0
    for s in segments[:-1]:
        pos += s.items
        out.append(pos)
    return out
