"""Token layout of the suite's examples on 64-token chunks: BOS, then each part of a sequence as
prompt SEP answer EOS padded with spaces to the next chunk boundary, then the current prompt and
SEP. A documented part's prompt is a document that fills its first chunk exactly, then the
question, so the question (and its answer) always sit in the chunk after the document."""
from __future__ import annotations

from collections.abc import Sequence

from bem.tasks.tokenizer import ByteTokenizer

CHUNK_TOKENS = 64           # one routing chunk = one KV block (bem.modules.control.CHUNK_SIZE)
PAD_BYTE = ord(" ")         # in-sequence padding to a chunk boundary: a real, visible token
TOKENIZER = ByteTokenizer()


def document_length(part: int) -> int:
    """Bytes a part's document must have to fill its chunk exactly (the first part's chunk also
    holds BOS)."""
    return CHUNK_TOKENS - 1 if part == 0 else CHUNK_TOKENS


def pad_document(text: str, part: int) -> str:
    """`text` padded with spaces to :func:`document_length`; ValueError when it is longer."""
    n = document_length(part)
    if len(text.encode()) > n:
        raise ValueError(f"document of {len(text.encode())} bytes does not fit one chunk "
                         f"({n} bytes): {text!r}")
    return text + " " * (n - len(text.encode()))


def _part_tokens(prompt: str, answer: str) -> list[int]:
    return TOKENIZER.encode(prompt) + [TOKENIZER.SEP] + TOKENIZER.encode(answer, eos=True)


def history_tokens(history: Sequence[tuple[str, str, str]]) -> tuple[list[int], list[int]]:
    """(ids, part_chunks): BOS and the earlier parts, each padded to a chunk boundary, and the
    chunk where each of them starts."""
    ids = [TOKENIZER.BOS]
    chunks = []
    for prompt, answer, _ in history:
        chunks.append((len(ids) - 1) // CHUNK_TOKENS)      # part 0 starts at 0 (with BOS)
        ids += _part_tokens(prompt, answer)
        ids += [PAD_BYTE] * (-len(ids) % CHUNK_TOKENS)
    return ids, chunks


def prompt_tokens(prompt: str, history: Sequence[tuple[str, str, str]] = ()) -> list[int]:
    """Model input of a request: the history (reference answers), the prompt, SEP."""
    ids, _ = history_tokens(history)
    return ids + TOKENIZER.encode(prompt) + [TOKENIZER.SEP]


def sequence_tokens(prompt: str, answer: str, history: Sequence[tuple[str, str, str]] = ()
                    ) -> tuple[list[int], list[bool]]:
    """(ids, is_answer): the whole training sequence (history, prompt SEP answer EOS) and which
    tokens are answers (every part's answer and EOS)."""
    ids = [TOKENIZER.BOS]
    mask = [False]
    for i, (p, a, _) in enumerate([*history, (prompt, answer, "")]):
        q = TOKENIZER.encode(p) + [TOKENIZER.SEP]
        ans = TOKENIZER.encode(a, eos=True)
        ids += q + ans
        mask += [False] * len(q) + [True] * len(ans)
        if i < len(history):
            pad = -len(ids) % CHUNK_TOKENS
            ids += [PAD_BYTE] * pad
            mask += [False] * pad
    return ids, mask


def part_chunks(history: Sequence[tuple[str, str, str]], domain: str) -> list[tuple[int, str]]:
    """(first chunk, domain) of every part of a sequence whose earlier parts are `history` and
    whose current part is in `domain`."""
    ids, chunks = history_tokens(history)
    last = len(ids) // CHUNK_TOKENS if history else 0
    return [(c, h[2]) for c, h in zip(chunks, history)] + [(last, domain)]
