"""The embedded default task suite, generated in code: the pre-training mixture of general skills
(evidence QA over fact lines with distractors, several questions per passage set as in
retrieval-augmented use; multi-digit arithmetic; string transforms; format-constrained answers;
and questions behind a neutral document chunk, in one or two parts) and the adaptation domains of
bem.tasks.domains. Deterministic per (version, seed, split); splits are disjoint by construction
(an example's split is a hash of its prompt, or of its passage set)."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

SUITE_VERSION = 3
TASKS = ("evidence_qa", "arithmetic", "string_transform", "format", "documented")
SPLITS = ("train", "validation", "test")

_SYLLABLES = ("ka", "lo", "mir", "ta", "ven", "so", "dra", "ul", "pe", "ri", "no", "gas", "be",
              "tor", "mi", "la", "zen", "quo", "fa", "sil")
_ATTRIBUTES = ("mayor", "river", "founded")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer. `fmt` is the answer format the metrics check
    (see bem.tasks.metrics.FORMATS); `group` is shared by examples whose prompts share a prefix
    (the questions over one passage set, or the parts of one multi-part sequence).

    domain: the adaptation domain in force for this question (bem.tasks.domains.DOMAINS), "" for
    the general skills. history: the earlier parts of a multi-part sequence, as (prompt, answer,
    domain) triples with their reference answers; bem.tasks.layout puts each part on chunk
    boundaries (see there). part: index of this question's part (= len(history))."""
    task: str
    prompt: str
    answer: str
    fmt: str
    group: str
    domain: str = ""
    history: tuple[tuple[str, str, str], ...] = ()

    @property
    def part(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        return d


def _split_of(key: str) -> str:
    """Disjoint, stable assignment: 10% test, 10% validation, 80% train."""
    bucket = hashlib.sha256(key.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _evidence_qa(rng: random.Random) -> list[Example]:
    """Facts about 3 distinct towns, one "<town> <attribute>: <value>" line each (the lines about
    the other towns and attributes are the distractors of a question), then 2–3 questions
    "Q: <town> <attribute>?" over them; the passage lines come first, so the questions share them
    as a prefix (one passage set, several queries: the retrieval-augmented pattern). Since v2 the
    question names its key as the passage does (v1's free-form "Who is the mayor of …?" over
    comma-separated records was not learnable by the tiny base within its budget)."""
    towns: list[str] = []
    while len(towns) < 3:
        t = _name(rng, 2)
        if t not in towns:
            towns.append(t)
    facts = {t: {"mayor": _name(rng, 2), "river": _name(rng, 2),
                 "founded": str(rng.randint(1100, 1999))} for t in towns}
    attributes = rng.sample(_ATTRIBUTES, 2)
    lines = [f"{t} {a}: {facts[t][a]}" for t in towns for a in attributes]
    passages = "\n".join(lines)
    group = "qa-" + hashlib.sha256(passages.encode()).hexdigest()[:16]
    asked = rng.sample([(t, a) for t in towns for a in attributes], rng.randint(2, 3))
    return [Example("evidence_qa", f"{passages}\nQ: {t} {a}?\nA:", facts[t][a],
                    "number" if a == "founded" else "word", group) for t, a in asked]


def _arithmetic_problem(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition or subtraction (the larger operand first, so results are >= 0): what a
    byte-level model of a few hundred thousand parameters learns in minutes (v1's up-to-3-digit
    operands with negative results were not learnable at that size and budget)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"{a}+{b}", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}", str(a - b)


def _arithmetic(rng: random.Random) -> list[Example]:
    expr, value = _arithmetic_problem(rng)
    prompt = f"Compute {expr} ="
    return [Example("arithmetic", prompt, value, "number", "ar-" + prompt)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))


_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "reverse": lambda w: w[::-1],
    "upper": str.upper,
    "sort": lambda w: "".join(sorted(w)),
    "double": lambda w: w + w,
}


def _string_transform(rng: random.Random) -> list[Example]:
    op = rng.choice(sorted(_TRANSFORMS))
    w = _word(rng)
    prompt = f"Apply {op} to {w} ->"
    return [Example("string_transform", prompt, _TRANSFORMS[op](w), "word", "st-" + prompt)]


def _format(rng: random.Random) -> list[Example]:
    """The answer must come wrapped: as JSON {"answer": "..."} or as [[...]]."""
    if rng.random() < 0.5:
        inner_prompt, inner = _arithmetic_problem(rng)
    else:
        op = rng.choice(sorted(_TRANSFORMS))
        w = _word(rng)
        inner_prompt, inner = f"{op} {w}", _TRANSFORMS[op](w)
    if rng.random() < 0.5:
        prompt = f"As JSON, answer {inner_prompt} ->"
        return [Example("format", prompt, json.dumps({"answer": inner}), "json", "fm-" + prompt)]
    prompt = f"In brackets, answer {inner_prompt} ->"
    return [Example("format", prompt, f"[[{inner}]]", "bracket", "fm-" + prompt)]


def _documented(rng: random.Random) -> list[Example]:
    from bem.tasks.domains import documented   # domains builds on this module's generators

    return documented(rng)


_GENERATORS: dict[str, Callable[[random.Random], list[Example]]] = {
    "evidence_qa": _evidence_qa, "arithmetic": _arithmetic,
    "string_transform": _string_transform, "format": _format, "documented": _documented,
}


def _stream(task: str, split: str, seed: int) -> Iterator[Example]:
    rng = random.Random(f"bem-suite/v{SUITE_VERSION}/{task}/{seed}")
    seen: set[str] = set()
    while True:
        batch = _GENERATORS[task](rng)
        if batch[0].group in seen or _split_of(batch[0].group) != split:
            continue
        seen.add(batch[0].group)
        yield from batch


def generate(split: str, n_per_task: int, *, seed: int = 0,
             tasks: Sequence[str] = TASKS) -> list[Example]:
    """`n_per_task` examples of each task for `split` ("train", "validation" or "test"),
    interleaved task by task. The same (SUITE_VERSION, seed, split, n_per_task, tasks) always
    gives the same list; different splits never share a prompt (nor a passage set)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"n_per_task: expected a positive int, got {n_per_task!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown or not tasks:
        raise ValueError(f"tasks: expected a non-empty subset of {TASKS}, got {list(tasks)!r}")
    per_task = []
    for task in tasks:
        stream = _stream(task, split, seed)
        per_task.append([next(stream) for _ in range(n_per_task)])
    return [ex for group in zip(*per_task) for ex in group]
