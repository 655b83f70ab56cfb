"""The adaptation domains of the embedded suite (bem.tasks.domains, bem.tasks.layout): determinism,
disjoint splits, answers (standard answer + the domain's sign-off word, checked independently),
the chunk layout (document fills one chunk, the question starts the next), switch sequences and
their history, conflicting answers across domains, the answer mask and part chunks, bad
arguments, the "documented" pre-training task, and the causal-oracle routing built on them."""
from __future__ import annotations

import itertools
import re

import pytest

from bem.experiments.routing import causal_oracle
from bem.tasks import (CHUNK_TOKENS, DOMAINS, ByteTokenizer, format_valid, generate,
                       generate_adaptation, part_chunks, prompt_tokens, sequence_tokens)
from bem.tasks.domains import domain_answer
from bem.tasks.layout import document_length, pad_document
from bem.tasks.suite import _TRANSFORMS

TOK = ByteTokenizer()
SPLITS = ("train", "validation", "test")
_ARITH = re.compile(r"Compute (\d+)([+-])(\d+) =")
_STRING = re.compile(r"Apply ([a-z]+) to ([a-z]+) ->")


def _standard_answer(question: str) -> tuple[str, str]:
    """(standard answer, format) of a question, computed here without the suite's generators:
    arithmetic by evaluating the two operands and the operator, transforms by the table."""
    m = _ARITH.fullmatch(question)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b), "number"
    m = _STRING.fullmatch(question)
    assert m, f"unexpected question {question!r}"
    assert m[1] in _TRANSFORMS, question
    return _TRANSFORMS[m[1]](m[2]), "word"


def _question(ex) -> str:
    """The part of the prompt after its chunk-filling document."""
    return ex.prompt[document_length(ex.part):]


@pytest.fixture(scope="module")
def train():
    return generate_adaptation("train", 40, 40, seed=0)


def test_deterministic_per_seed_and_different_across_seeds():
    a = generate_adaptation("train", 5, 4, seed=3)
    assert a == generate_adaptation("train", 5, 4, seed=3)
    assert a != generate_adaptation("train", 5, 4, seed=4)
    assert len(a) == 5 + 2 * 4                    # a switch sequence gives one example per part
    assert [e.task for e in a] == ["domain"] * 5 + ["switch"] * 8
    # A prefix of the counts gives a prefix of the list (each kind is its own stream).
    b = generate_adaptation("train", 5, 0, seed=3)
    assert b == a[:5]


def test_splits_share_no_group_and_no_part_prompt():
    sets = {s: generate_adaptation(s, 40, 40, seed=1) for s in SPLITS}
    groups = {s: {e.group for e in v} for s, v in sets.items()}
    prompts = {s: {e.prompt for e in v} | {h[0] for e in v for h in e.history}
               for s, v in sets.items()}
    for s in SPLITS:
        assert len(groups[s]) == 80                # distinct sequences within a split
    for a, b in itertools.combinations(SPLITS, 2):
        assert not groups[a] & groups[b], (a, b)
        assert not prompts[a] & prompts[b], (a, b)


def test_every_answer_is_the_standard_answer_signed_with_the_domain(train):
    assert {e.domain for e in train} == set(DOMAINS)
    for e in train:
        assert e.domain in DOMAINS, e
        plain, _ = _standard_answer(_question(e))
        assert e.answer == f"{plain} {e.domain}", e
        assert e.fmt == "signed"
        assert format_valid(e.answer, e.fmt) == 1.0, e
        for hp, ha, hd in e.history:                # the history's reference answers too
            assert hd in DOMAINS
            assert ha == _standard_answer(hp[document_length(0):])[0] + " " + hd


def test_domain_is_stated_only_by_the_document(train):
    for e in train:
        doc, question = e.prompt[:document_length(e.part)], _question(e)
        assert re.search(rf"\b{e.domain}\b", doc), e
        assert not re.search(rf"\b{e.domain}\b", question), e
        # The question carries no domain word at all, so only the document can tell.
        assert not any(re.search(rf"\b{d}\b", question) for d in DOMAINS), e
        assert _ARITH.fullmatch(question) or _STRING.fullmatch(question), e
        assert len(doc.encode()) == document_length(e.part) == (63 if e.part == 0 else 64)


def test_document_fills_exactly_one_chunk_and_the_question_starts_the_next(train):
    for e in train:
        ids = prompt_tokens(e.prompt, e.history)
        q = TOK.encode(_question(e)) + [TOK.SEP]
        start = CHUNK_TOKENS * (2 * e.part + 1)
        assert ids[start:] == q, e
        doc_start = 1 if e.part == 0 else CHUNK_TOKENS * 2 * e.part
        assert ids[doc_start:start] == TOK.encode(e.prompt[:document_length(e.part)])
        assert ids[0] == TOK.BOS
        # The answer (and its EOS) stays inside the question's chunk.
        full, _ = sequence_tokens(e.prompt, e.answer, e.history)
        assert len(full) <= start + CHUNK_TOKENS, e


def test_switch_sequences_switch_domain_and_carry_the_first_part():
    ex = generate_adaptation("validation", 0, 30, seed=2)
    assert len(ex) == 60
    for first, second in zip(ex[::2], ex[1::2]):
        assert first.task == second.task == "switch"
        assert first.group == second.group
        assert first.history == () and first.part == 0 and second.part == 1
        assert first.domain != second.domain
        assert second.history == ((first.prompt, first.answer, first.domain),)
    assert len({e.group for e in ex}) == 30
    singles = generate_adaptation("validation", 20, 0, seed=2)
    assert all(e.history == () and e.task == "domain" for e in singles)


def test_the_same_question_has_a_different_answer_in_every_domain():
    for plain, kind in (("85", "number"), ("zbhlael", "word")):
        answers = {d: domain_answer(d, plain, kind) for d in DOMAINS}
        assert len({a for a, _ in answers.values()}) == len(DOMAINS)
        for d, (a, fmt) in answers.items():
            assert a == f"{plain} {d}" and fmt == "signed" and format_valid(a, fmt) == 1.0
    with pytest.raises(ValueError, match="domain"):
        domain_answer("nope", "85", "number")
    with pytest.raises(ValueError, match="domain"):
        domain_answer("", "85", "number")


def test_generated_conflicts_exist_and_disagree():
    """Questions asked in several domains do occur in the data, and their answers differ."""
    ex = generate_adaptation("train", 400, 0, seed=0)
    by_question: dict[str, dict[str, str]] = {}
    for e in ex:
        by_question.setdefault(_question(e), {})[e.domain] = e.answer
    conflicts = {q: d for q, d in by_question.items() if len(d) > 1}
    assert conflicts, "expected some question asked in two domains"
    for q, answers in conflicts.items():
        assert len(set(answers.values())) == len(answers), (q, answers)


def test_answer_mask_covers_every_part_answer_and_eos(train):
    for e in train:
        ids, mask = sequence_tokens(e.prompt, e.answer, e.history)
        assert len(ids) == len(mask)
        runs = [list(g) for k, g in itertools.groupby(range(len(ids)), key=lambda i: mask[i]) if k]
        answers = [a for _, a, _ in e.history] + [e.answer]
        assert len(runs) == len(answers), e
        for run, ans in zip(runs, answers):
            assert [ids[i] for i in run] == TOK.encode(ans, eos=True)
            assert ids[run[0] - 1] == TOK.SEP
        assert sum(mask) == sum(len(TOK.encode(a)) + 1 for a in answers)
        # The sequence is the prompt input followed by the current answer.
        assert ids == prompt_tokens(e.prompt, e.history) + TOK.encode(e.answer, eos=True)


def test_part_chunks(train):
    for e in train:
        got = part_chunks(e.history, e.domain)
        if e.part == 0:
            assert got == [(0, e.domain)]
        else:
            assert got == [(0, e.history[0][2]), (2, e.domain)]


def test_bad_arguments_name_the_argument():
    for args, match in ((("train", -1, 1), "n_single"), (("train", 1, -2), "n_switch"),
                        (("train", 1.0, 1), "n_single"), (("train", True, 1), "n_single"),
                        (("train", 1, None), "n_switch"), (("train", 0, 0), "n_single, n_switch"),
                        (("dev", 1, 1), "split")):
        with pytest.raises(ValueError, match=match):
            generate_adaptation(*args)
    for seed in (1.5, "0", True, None):
        with pytest.raises(TypeError, match="seed"):
            generate_adaptation("train", 1, 1, seed=seed)


def test_pad_document():
    assert pad_document("abc", 0) == "abc" + " " * 60
    assert pad_document("abc", 1) == "abc" + " " * 61
    assert pad_document("x" * 63, 0) == "x" * 63
    assert pad_document("x" * 64, 1) == "x" * 64
    with pytest.raises(ValueError, match="does not fit"):
        pad_document("x" * 64, 0)
    with pytest.raises(ValueError, match="does not fit"):
        pad_document("x" * 65, 1)
    with pytest.raises(ValueError, match="does not fit"):   # bytes, not characters
        pad_document("é" * 32, 0)


def test_documented_pretraining_task_has_no_domain_and_standard_answers():
    ex = generate("train", 30, seed=5, tasks=["documented"])
    assert len(ex) == 30
    assert any(e.part == 1 for e in ex) and any(e.part == 0 for e in ex)
    for e in ex:
        assert e.task == "documented" and e.domain == ""
        plain, fmt = _standard_answer(_question(e))
        assert e.answer == plain and e.fmt == fmt, e
        assert format_valid(e.answer, e.fmt) == 1.0
        assert not any(re.search(rf"\b{d}\b", e.prompt) for d in DOMAINS), e
        for hp, ha, hd in e.history:
            assert hd == "" and ha == _standard_answer(hp[document_length(0):])[0]
        ids = prompt_tokens(e.prompt, e.history)
        assert ids[CHUNK_TOKENS * (2 * e.part + 1):] == TOK.encode(_question(e)) + [TOK.SEP]


def test_causal_oracle():
    e_of = {d: i for i, d in enumerate(DOMAINS)}
    singles = generate_adaptation("test", 12, 0, seed=0)
    for e in singles:
        assert causal_oracle(e) == [-1, e_of[e.domain]], e
    switches = generate_adaptation("test", 0, 12, seed=0)
    for first, second in zip(switches[::2], switches[1::2]):
        d1, d2 = e_of[first.domain], e_of[second.domain]
        assert causal_oracle(first) == [-1, d1]
        assert causal_oracle(second) == [-1, d1, d1, d2]
        assert causal_oracle(second, 6) == [-1, d1, d1, d2, d2, d2]  # later chunks keep it
    # Neutral documents route to "no adapter".
    doc = next(e for e in generate("train", 10, seed=0, tasks=["documented"]) if e.part == 1)
    assert causal_oracle(doc) == [-1, -1, -1, -1]
