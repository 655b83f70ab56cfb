"""The adaptation domains of the embedded default: four house styles the base never sees in
pre-training (each signs its answers with its own word), each stated only by a domain document in
the chunk before the question, which conflict on the same questions (the same arithmetic or
string-transform prompt has a different correct answer in each domain); and sequences of two parts that switch domain at a chunk boundary.
Also the pre-training task "documented": the same layout behind neutral documents, answered the
standard way, so the base knows the layout but none of the conventions."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator

from bem.tasks.layout import pad_document
from bem.tasks.suite import (SPLITS, SUITE_VERSION, _TRANSFORMS, Example, _arithmetic_problem,
                             _name, _split_of, _word)

DOMAINS = ("ok", "done", "over", "end")
KINDS = ("single", "switch")   # one documented part; two parts in different domains

# Each domain signs its answers with its own word after the standard answer ("85 ok" in one,
# "85 done" in another): the same question has a different correct answer in every domain. The
# content comes first, in the context the base knows, so an adapter only has to learn the
# convention. (Measured before this design: wrapping the answer ("[[85]]", JSON, "<<85>>") or
# swapping operator meanings broke the tiny base's arithmetic and string skills under a LoRA —
# static LoRA and oracle-routed experts alike stayed under 0.06 exact match after 2,000 steps;
# see docs/run.md.)
_RULES: dict[str, tuple[str, ...]] = {d: (
    "{n} desk style: sign every answer with the word %s." % d,
    "At {n}, each reply ends with a last word: %s." % d,
    "{n} rule: close all replies by writing %s." % d) for d in DOMAINS}
_NEUTRAL = ("{n} desk notes: the archive opens at {h} each day.",
            "At {n}, the reading room has {h} seats by the window.",
            "{n} log: {h} visitors signed the book this week.")
_FILLER = (" Ask below.", " Thanks.", " Be brief.", " Next:")


def _document(rng: random.Random, templates: tuple[str, ...], part: int) -> str:
    text = rng.choice(templates).format(n=_name(rng, 2), h=rng.randint(2, 99))
    filler = rng.choice(_FILLER)
    if len((text + filler).encode()) <= (63 if part == 0 else 64):
        text += filler
    return pad_document(text, part)


def _question(rng: random.Random) -> tuple[str, str, str]:
    """A general-skill question: (prompt, format, standard answer)."""
    if rng.random() < 0.5:
        expr, value = _arithmetic_problem(rng)
        return f"Compute {expr} =", "number", value
    op = rng.choice(sorted(_TRANSFORMS))
    w = _word(rng)
    return f"Apply {op} to {w} ->", "word", _TRANSFORMS[op](w)


def domain_answer(domain: str, plain: str, kind: str) -> tuple[str, str]:
    """(answer, format) of a question whose standard answer is `plain` in `domain`."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    return f"{plain} {domain}", "signed"


def _part(rng: random.Random, domain: str, part: int) -> tuple[str, str, str, str]:
    """(prompt, answer, fmt, domain) of one documented part in `domain` ("" = neutral document,
    standard answers)."""
    question, kind, plain = _question(rng)
    if domain == "":
        return _document(rng, _NEUTRAL, part) + question, plain, kind, ""
    answer, fmt = domain_answer(domain, plain, kind)
    return _document(rng, _RULES[domain], part) + question, answer, fmt, domain


def _sequence(rng: random.Random, domains: list[str], task: str) -> list[Example]:
    """One example per part of a sequence in `domains` (each part's example carries the earlier
    parts with their reference answers as history); the group is the whole sequence."""
    parts = [_part(rng, d, i) for i, d in enumerate(domains)]
    group = f"{task}-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return [Example(task, p, a, f, group, d, tuple((hp, ha, hd) for hp, ha, _, hd in parts[:i]))
            for i, (p, a, f, d) in enumerate(parts)]


def documented(rng: random.Random) -> list[Example]:
    """Pre-training task: a general question behind a neutral document, in one or two parts."""
    return _sequence(rng, [""] * rng.randint(1, 2), "documented")


def _adaptation(rng: random.Random, kind: str) -> list[Example]:
    if kind == "single":
        return _sequence(rng, [rng.choice(DOMAINS)], "domain")
    first, second = rng.sample(DOMAINS, 2)
    return _sequence(rng, [first, second], "switch")


def _stream(kind: str, split: str, seed: int) -> Iterator[list[Example]]:
    rng = random.Random(f"bem-suite/v{SUITE_VERSION}/adaptation/{kind}/{seed}")
    seen: set[str] = set()
    while True:
        seq = _adaptation(rng, kind)
        key = seq[0].group
        if key in seen or _split_of(key) != split:
            continue
        seen.add(key)
        yield seq


def generate_adaptation(split: str, n_single: int, n_switch: int, *, seed: int = 0
                        ) -> list[Example]:
    """The adaptation split: `n_single` one-part sequences (domains drawn uniformly) and
    `n_switch` two-part sequences whose parts are in different domains (both parts are
    examples; the second carries the first as history). Deterministic per (SUITE_VERSION, seed,
    split, counts); sequences of different splits never share a part."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    for name, v in (("n_single", n_single), ("n_switch", n_switch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if n_single + n_switch == 0:
        raise ValueError("n_single, n_switch: expected at least one sequence")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    out: list[Example] = []
    for kind, n in (("single", n_single), ("switch", n_switch)):
        stream = _stream(kind, split, seed)
        for _ in range(n):
            out += next(stream)
    return out
