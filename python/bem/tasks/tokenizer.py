"""Byte-level tokenizer of the embedded default: every UTF-8 byte is a token, plus four specials.
No vocabulary file, nothing to download, lossless for any text."""
from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """Token ids 0–255 are bytes; then PAD, BOS, EOS and SEP (the prompt/answer separator)."""

    PAD, BOS, EOS, SEP = 256, 257, 258, 259
    vocab_size = 260

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (UTF-8 bytes), optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte tokens in `ids`; specials are dropped, decoding stops at EOS, and an
        invalid UTF-8 sequence (a model can emit one) is replaced, never raised."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} outside [0, {self.vocab_size})")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")
