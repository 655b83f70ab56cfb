"""The OpenAI request and response shapes of `bem serve`: validation of /v1/completions and
/v1/chat/completions bodies (a RequestError names the field at fault), text ↔ token ids with
bem's ByteTokenizer, the chat template, stop strings and incremental UTF-8 decoding.

Text → ids. A completion prompt string is BOS followed by its UTF-8 bytes; a prompt given as a
list of token ids is used as it is. A chat is laid out as bem's embedded suite lays out
multi-part sequences (bem.tasks.layout): BOS, then every earlier turn as
`user SEP assistant EOS`, padded with spaces to the next 64-token chunk boundary, then the last
user message and SEP; system (or developer) messages are prepended, each followed by a newline,
to the next user message. Generation stops at EOS (never part of the text) or max_tokens."""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Any

from bem.engine import SamplingParams
from bem.tasks import ByteTokenizer, prompt_tokens

TOKENIZER = ByteTokenizer()
MAX_N = 16               # choices per request (n, or prompts × n for a list of prompts)
MAX_STOP = 4             # stop strings, as OpenAI


class RequestError(ValueError):
    """A request the server refuses: HTTP `status` (400 bad field, 404 unknown model), the
    field at fault (`param`) and a message that names it."""

    def __init__(self, param: str | None, message: str, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class GenerationSpec:
    """A validated request: its model name, one prompt (token ids) and SamplingParams per
    choice, and how to answer (stream, usage in the stream, stop strings)."""

    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    n: int = 1                       # choices per prompt (prompts[i] = the (i // n)-th prompt)


# ---- field checks ---------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            v < lo or v > hi or (lo_open and v == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(name, f"{name}: expected a number in {span}, got {v!r}")
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None
             ) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(name, f"{name}: expected an integer {span}, got {v!r}")
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(name, f"{name}: expected true or false, got {v!r}")
    return v


def _unsupported(body: dict, allowed: dict[str, Any]) -> None:
    """Fields bem serve does not implement are refused unless they hold their neutral value."""
    for name, neutral in allowed.items():
        v = body.get(name)
        if v is not None and v != neutral:
            raise RequestError(name, f"{name}: not supported by bem serve (got {v!r}; leave it "
                               f"out{'' if neutral is None else f' or use {neutral!r}'})")


def _known(body: dict, names: set[str]) -> None:
    unknown = sorted(set(body) - names)
    if unknown:
        raise RequestError(unknown[0], f"{unknown[0]}: unrecognized request argument")


def _model(body: dict, served: set[str]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise RequestError("model", f"model: expected a model name (one of {sorted(served)}), "
                           f"got {m!r}")
    if m not in served:
        raise RequestError("model", f"model: {m!r} is not served here; expected one of "
                           f"{sorted(served)}", status=404, code="model_not_found")
    return m


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP or \
            any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop", f"stop: expected a non-empty string or a list of 1-{MAX_STOP} "
                           f"of them, got {v!r}")
    return stops


def _stream_options(body: dict, stream: bool) -> bool:
    v = body.get("stream_options")
    if v is None:
        return False
    if not stream:
        raise RequestError("stream_options", "stream_options: only allowed with stream: true")
    if not isinstance(v, dict) or set(v) - {"include_usage"} or \
            not isinstance(v.get("include_usage", False), bool):
        raise RequestError("stream_options", f"stream_options: expected "
                           f"{{\"include_usage\": true|false}}, got {v!r}")
    return bool(v.get("include_usage", False))


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
           "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
           "logit_bias", "logprobs", "user", "ignore_eos"}


def _sampling(body: dict, max_tokens: int, max_positions: int, prompt_len: int,
              choices: int, max_name: str = "max_tokens") -> list[SamplingParams]:
    """SamplingParams of each choice (choice i samples with seed + i when seed is given). Beyond
    OpenAI's fields, as vLLM: top_k (-1 or absent: none) and ignore_eos (generate max_tokens
    tokens, EOS or not — for benchmarks)."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k == -1:              # vLLM's spelling of "no top-k"
        top_k = None
    top_k = _integer({"top_k": top_k}, "top_k", None, 1)
    seed = _integer(body, "seed", None, 0, 2**63 - 1 - MAX_N)
    stops = () if _boolean(body, "ignore_eos") else (TOKENIZER.EOS,)
    if prompt_len + max_tokens > max_positions:
        raise RequestError(max_name, f"{max_name}: the prompt ({prompt_len} tokens) and "
                           f"{max_name} ({max_tokens}) exceed the model's context of "
                           f"{max_positions} tokens")
    return [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                           top_k=top_k, top_p=None if top_p == 1.0 else top_p,
                           seed=None if seed is None else seed + i,
                           stop_token_ids=stops)
            for i in range(choices)]


# ---- /v1/completions ------------------------------------------------------------------------

def completion_prompts(prompt: Any, vocab_size: int) -> list[list[int]]:
    """`prompt` (a string, a list of strings, a list of token ids, or a list of such lists) →
    token ids per prompt; a string becomes BOS + its UTF-8 bytes."""
    def ids_of(p, where):
        if isinstance(p, str):
            if not p:
                raise RequestError("prompt", f"{where}: expected a non-empty string")
            return TOKENIZER.encode(p, bos=True)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                             for t in p):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise RequestError("prompt", f"{where}: token ids must be in [0, {vocab_size}), "
                                   f"got {bad[0]}")
            return list(p)
        raise RequestError("prompt", f"{where}: expected a string, a list of strings, a list of "
                           f"token ids or a list of such lists, got {p!r:.80}")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [ids_of(prompt, "prompt")]


def parse_completion(body: Any, served: dict[str, int], vocab_size: int = 260) -> GenerationSpec:
    """A validated /v1/completions body. served: model name → its max_positions."""
    if not isinstance(body, dict):
        raise RequestError(None, f"body: expected a JSON object, got {type(body).__name__}")
    _known(body, _COMMON | {"prompt", "echo", "best_of", "suffix"})
    model = _model(body, set(served))
    _unsupported(body, {"echo": False, "best_of": 1, "suffix": None, "logprobs": None,
                        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}})
    if "prompt" not in body:
        raise RequestError("prompt", "prompt: required")
    prompts = completion_prompts(body["prompt"], vocab_size)
    n = _integer(body, "n", 1, 1, MAX_N)
    if n * len(prompts) > MAX_N:
        raise RequestError("n", f"n: {len(prompts)} prompts × n={n} choices exceed {MAX_N}")
    max_tokens = _integer(body, "max_tokens", 16, 1)
    stream = _boolean(body, "stream")
    params = _sampling(body, max_tokens, served[model], max(len(p) for p in prompts), n)
    return GenerationSpec(model, [p for p in prompts for _ in range(n)], params * len(prompts),
                          stream, _stream_options(body, stream), _stop(body), n)


# ---- /v1/chat/completions ---------------------------------------------------------------------

def _content(message: dict, i: int) -> str:
    c = message.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c:
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content", f"messages[{i}].content[{j}]: only "
                                   f"text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                   f"supported, got {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content", f"messages[{i}].content: expected a string or a "
                       f"list of text parts, got {c!r:.80}")


def chat_prompt(messages: Any) -> list[int]:
    """Token ids of a chat (the template in this module's docstring)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages: expected a non-empty list of "
                           "{\"role\": ..., \"content\": ...} objects")
    turns: list[list[str]] = []          # [user, assistant] pairs; the last has no assistant
    system = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", f"messages[{i}]: expected an object, got "
                               f"{m!r:.80}")
        role = m.get("role")
        text = _content(m, i)
        if role in ("system", "developer"):
            system += text + "\n"
        elif role == "user":
            if turns and len(turns[-1]) == 1:
                raise RequestError(f"messages[{i}].role", f"messages[{i}].role: two user "
                                   "messages in a row; the template alternates user and "
                                   "assistant turns")
            turns.append([system + text])
            system = ""
        elif role == "assistant":
            if not turns or len(turns[-1]) != 1:
                raise RequestError(f"messages[{i}].role", f"messages[{i}].role: an assistant "
                                   "message must follow a user message")
            turns[-1].append(text)
        else:
            raise RequestError(f"messages[{i}].role", f"messages[{i}].role: expected 'system', "
                               f"'developer', 'user' or 'assistant', got {role!r}")
    if not turns or len(turns[-1]) != 1 or system:
        raise RequestError("messages", "messages: the last message must be the user's")
    history = [(u, a, "") for u, a in turns[:-1]]
    return prompt_tokens(turns[-1][0], history)


def parse_chat(body: Any, served: dict[str, int]) -> GenerationSpec:
    """A validated /v1/chat/completions body. served: model name → its max_positions. Without
    max_tokens (or max_completion_tokens) a reply may fill the rest of the context."""
    if not isinstance(body, dict):
        raise RequestError(None, f"body: expected a JSON object, got {type(body).__name__}")
    _known(body, _COMMON | {"messages", "max_completion_tokens", "top_logprobs",
                            "response_format", "tools", "tool_choice", "parallel_tool_calls",
                            "functions", "function_call"})
    model = _model(body, set(served))
    _unsupported(body, {"logprobs": False, "top_logprobs": None, "tools": None,
                        "functions": None, "function_call": None, "parallel_tool_calls": None,
                        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}})
    if body.get("tool_choice") not in (None, "none"):
        raise RequestError("tool_choice", "tool_choice: not supported by bem serve")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError("response_format", "response_format: only {\"type\": \"text\"} is "
                           "supported")
    if "messages" not in body:
        raise RequestError("messages", "messages: required")
    prompt = chat_prompt(body["messages"])
    ctx = served[model]
    if len(prompt) >= ctx:
        raise RequestError("messages", f"messages: the chat takes {len(prompt)} tokens; the "
                           f"model's context is {ctx}")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, name, ctx - len(prompt), 1)
    if name == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise RequestError("max_tokens", "max_tokens: give max_tokens or max_completion_tokens, "
                           "not both")
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _boolean(body, "stream")
    params = _sampling(body, max_tokens, ctx, len(prompt), n, name)
    return GenerationSpec(model, [prompt] * n, params, stream, _stream_options(body, stream),
                          _stop(body), n)


# ---- ids → text ------------------------------------------------------------------------------

class TextDecoder:
    """Generated token ids → text, incrementally: byte tokens through a UTF-8 decoder (a
    character split over tokens waits for its last byte; invalid bytes become U+FFFD, as
    ByteTokenizer.decode), specials dropped, EOS ends the text; stop strings end it too (the
    text stops before the first one). take() returns the text not yet taken, holding back what
    might still become a stop string."""

    def __init__(self, stop: list[str] | None = None):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.stopped = False         # a stop string was found
        self._ended = False          # EOS seen or finish() called
        self._taken = 0

    def feed(self, ids: list[int]) -> None:
        if self._ended or self.stopped:
            return
        data = bytearray()
        for i in ids:
            if i == TOKENIZER.EOS:
                self._ended = True
                break
            if i < 256:
                data.append(i)
        self._append(self._decoder.decode(bytes(data), final=self._ended))

    def finish(self) -> None:
        """No more tokens: flush an incomplete character."""
        if not self._ended and not self.stopped:
            self._ended = True
            self._append(self._decoder.decode(b"", final=True))

    def _append(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += new
        if self.stop:
            hits = [j for j in (self.text.find(s, start) for s in self.stop) if j >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True

    def take(self) -> str:
        end = len(self.text) if self.stopped or self._ended else len(self.text) - self._hold
        if end <= self._taken:
            return ""
        out = self.text[self._taken:end]
        self._taken = end
        return out
