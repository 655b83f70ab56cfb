"""Per-example metrics of the embedded default: exact match, token F1 (SQuAD-style normalisation)
and format validity of the answer's required format."""
from __future__ import annotations

import json
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

# The answer formats a task can require, each with its validity test.
FORMATS = ("number", "word", "json", "bracket", "signed")


def normalize(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised whitespace tokens; two empty
    strings score 1.0, one empty string 0.0."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def format_valid(prediction: str, fmt: str) -> float:
    """1.0 when `prediction` has the required format: "number" an optionally signed integer,
    "word" one token of letters, "json" an object {"answer": <string>} and nothing else,
    "bracket" the form [[...]] with a non-empty inside, "signed" an answer then one word of
    lower-case letters (the adaptation domains' sign-off)."""
    text = prediction.strip()
    if fmt == "number":
        return float(re.fullmatch(r"-?\d+", text) is not None)
    if fmt == "word":
        return float(re.fullmatch(r"[A-Za-z]+", text) is not None)
    if fmt == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return 0.0
        return float(isinstance(obj, dict) and set(obj) == {"answer"} and isinstance(obj["answer"], str))
    if fmt == "bracket":
        return float(re.fullmatch(r"\[\[[^\[\]]+\]\]", text) is not None)
    if fmt == "signed":
        return float(re.fullmatch(r"\S+ [a-z]+", text) is not None)
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")


def score(prediction: str, reference: str, fmt: str) -> dict[str, float]:
    """All three metrics of one example."""
    return {"exact_match": exact_match(prediction, reference),
            "token_f1": token_f1(prediction, reference),
            "format_valid": format_valid(prediction, fmt)}
