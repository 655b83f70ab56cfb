"""The embedded task suite: determinism, disjoint splits, prompt lengths, the tokenizer, and the
metrics on hand-made cases."""
from __future__ import annotations

import json

import pytest

from bem.tasks import (TASKS, ByteTokenizer, exact_match, format_valid, generate, normalize, score,
                       token_f1)
from bem.tasks.suite import _TRANSFORMS


def test_deterministic_per_seed_and_different_across_seeds():
    a = generate("train", 20, seed=3)
    assert a == generate("train", 20, seed=3)
    assert a != generate("train", 20, seed=4)
    assert len(a) == 20 * len(TASKS)
    assert [e.task for e in a[:len(TASKS)]] == list(TASKS)


def test_splits_are_disjoint_in_prompts_and_passage_sets():
    sets = {s: generate(s, 60, seed=0) for s in ("train", "validation", "test")}
    prompts = {s: {e.prompt for e in v} for s, v in sets.items()}
    groups = {s: {e.group for e in v} for s, v in sets.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[a] & prompts[b]
        assert not groups[a] & groups[b]


def test_answers_are_correct_and_prompts_fit_one_to_four_chunks():
    tok = ByteTokenizer()
    for e in generate("test", 40, seed=1):
        n = len(tok.encode(e.prompt))
        assert 1 <= n <= 4 * 64, (e.prompt, n)
        assert format_valid(e.answer, e.fmt) == 1.0, e
        if e.task == "arithmetic":
            expr = e.prompt.removeprefix("Compute ").removesuffix(" =")
            assert str(eval(expr, {"__builtins__": {}})) == e.answer  # noqa: S307 - digits and +/- only
        elif e.task == "string_transform":
            _, op, _, word, _ = e.prompt.split(" ")
            assert _TRANSFORMS[op](word) == e.answer
        elif e.task == "evidence_qa":
            lines = e.prompt.split("\n")
            key = lines[-2].removeprefix("Q: ").removesuffix("?")   # "<town> <attribute>"
            facts = dict(line.split(": ", 1) for line in lines[:-2])
            assert len(facts) == 6 and facts[key] == e.answer, (key, facts)
            assert len({k.split()[0] for k in facts}) == 3           # 3 towns: 2 distract


def test_evidence_questions_share_their_passages_as_a_prefix():
    qa = [e for e in generate("train", 30, seed=2) if e.task == "evidence_qa"]
    by_group: dict[str, list[str]] = {}
    for e in qa:
        by_group.setdefault(e.group, []).append(e.prompt)
    shared = [p for p in by_group.values() if len(p) > 1]
    assert shared, "several questions per passage set expected"
    for prompts in shared:
        prefix = prompts[0].split("\nQ:")[0]
        assert all(p.startswith(prefix + "\nQ:") for p in prompts)


def test_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "Compute 12+5 = naïve → ok"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert tok.decode(ids) == text
    assert tok.decode([104, 105, tok.EOS, 106]) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("pred, ref, em, f1", [
    ("Mimir", "Mimir", 1.0, 1.0),
    (" the Mimir. ", "mimir", 1.0, 1.0),
    ("Mimir river", "Mimir", 0.0, 2 / 3),
    ("", "Mimir", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("x y z w", "z w v", 0.0, 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),
    ('{"answer": "17"}', '{"answer": "17"}', 1.0, 1.0),
])
def test_exact_match_and_token_f1(pred, ref, em, f1):
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1)


@pytest.mark.parametrize("pred, fmt, ok", [
    ("-12", "number", 1.0), ("12a", "number", 0.0), (" 7 ", "number", 1.0),
    ("abc", "word", 1.0), ("ab c", "word", 0.0),
    (json.dumps({"answer": "x"}), "json", 1.0), ('{"answer": 3}', "json", 0.0),
    ('{"answer": "x", "b": "y"}', "json", 0.0), ("{answer: x}", "json", 0.0),
    ("[[cba]]", "bracket", 1.0), ("[[]]", "bracket", 0.0), ("[cba]", "bracket", 0.0),
])
def test_format_validity(pred, fmt, ok):
    assert format_valid(pred, fmt) == ok


def test_score_and_bad_arguments():
    assert score("17", "17", "number") == {"exact_match": 1.0, "token_f1": 1.0, "format_valid": 1.0}
    assert normalize("The  A, b!") == "b"
    with pytest.raises(ValueError, match="fmt"):
        format_valid("x", "yaml")
    with pytest.raises(ValueError, match="split"):
        generate("dev", 3)
    with pytest.raises(ValueError, match="n_per_task"):
        generate("train", 0)
    with pytest.raises(ValueError, match="tasks"):
        generate("train", 2, tasks=["poetry"])
    with pytest.raises(TypeError, match="seed"):
        generate("train", 2, seed="1")
