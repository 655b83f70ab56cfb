"""The embedded image task of `bem run --suite multimodal`, generated in code (nothing is
downloaded): 32×32 RGB images of two kinds, each with 2–3 questions whose answers need the image,
some of them the image and a text passage together.

* "shapes": a 2×2 grid of cells, each holding a coloured shape (square, circle or cross).
  Questions: "Q: top left colour?" → "red", "Q: bottom right shape?" → "circle".
* "bars": four vertical bars of distinct colours with heights 1–7 (4 px a unit).
  Questions: "Q: blue bar height?" → "5", "Q: tallest bar?" → "green".

Word answers come with their options in the prompt ("Options: blue red yellow green", in a
seeded order), as in multiple-choice VQA: the byte-level model copies the chosen word instead of
spelling it, so what is measured is the choice, which needs the image.
* "shapes_passage": a shapes image with a passage of four price lines ("red price: 41"), one per
  colour. Question "Q: top left price?" → the price of the colour in that cell (image + text).

Every question names its evidence: the image patches (8×8 patches of 4×4 px; a cell is 4×4
patches, a bar's column 2×8) and, for passage questions, the passage line that holds the answer;
the other cells, columns and lines are the distractors (bem.multimodal.coverage).

Deterministic per (MULTIMODAL_VERSION, seed, split, counts); splits are disjoint by construction
(an image's split is a hash of its content spec, and all questions about an image share it).
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from bem.tasks.suite import SPLITS, _split_of

MULTIMODAL_VERSION = 1
KINDS = ("shapes", "bars", "shapes_passage")
IMAGE_SIZE = 32
PATCH = 4
GRID = IMAGE_SIZE // PATCH          # 8×8 patches = 64 visual tokens = one routing chunk
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "cross")
CELLS = ("top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class ImageExample:
    """One question about one image.

    kind: one of KINDS. spec: the image's content (JSON text; :func:`render` draws it). prompt:
    the text after the image (the passage, if any, then "Q: …?\\nA:"). answer / fmt: reference
    answer and its format ("word" or "number", bem.tasks.metrics). group: the image's id (shared
    by its questions). evidence_patches: indices (row·8 + column) of the image patches holding
    the answer; distractor_patches: those of the other cells / columns. passage_lines: the
    passage lines (empty without a passage); evidence_line: index of the line holding the answer
    (−1 without a passage). needs: "image" or "image+text"."""

    kind: str
    spec: str
    prompt: str
    answer: str
    fmt: str
    group: str
    evidence_patches: tuple[int, ...]
    distractor_patches: tuple[int, ...]
    passage_lines: tuple[str, ...] = ()
    evidence_line: int = -1

    @property
    def needs(self) -> str:
        return "image+text" if self.passage_lines else "image"

    @property
    def task(self) -> str:
        return self.kind

    def image(self) -> np.ndarray:
        """(3, 32, 32) float32 pixels in [0, 1]."""
        return render(self.spec)

    def to_dict(self) -> dict:
        return asdict(self)


def _cell_patches(cell: int) -> tuple[int, ...]:
    r0, c0 = (cell // 2) * 4, (cell % 2) * 4
    return tuple((r0 + r) * GRID + c0 + c for r in range(4) for c in range(4))


def _column_patches(bar: int) -> tuple[int, ...]:
    return tuple(r * GRID + 2 * bar + c for r in range(GRID) for c in range(2))


def _draw_shape(img: np.ndarray, cell: int, shape: str, rgb: np.ndarray) -> None:
    y0, x0 = (cell // 2) * 16, (cell % 2) * 16
    yy, xx = np.mgrid[0:16, 0:16]
    if shape == "square":
        mask = (yy >= 3) & (yy < 13) & (xx >= 3) & (xx < 13)
    elif shape == "circle":
        mask = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 5.5 ** 2
    else:   # cross
        mask = (((yy >= 6) & (yy < 10)) & (xx >= 2) & (xx < 14)) | \
               (((xx >= 6) & (xx < 10)) & (yy >= 2) & (yy < 14))
    img[:, y0:y0 + 16, x0:x0 + 16][:, mask] = rgb[:, None]


@functools.lru_cache(maxsize=4096)
def _render_cached(spec: str) -> bytes:
    d = json.loads(spec)
    rng = np.random.default_rng(int(d["noise"]))
    img = rng.uniform(0.0, 0.08, size=(3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    jitter = rng.uniform(-0.08, 0.08, size=(4, 3)).astype(np.float32)
    if d["kind"] == "bars":
        for i, (colour, h) in enumerate(zip(d["colours"], d["heights"])):
            rgb = np.clip(np.array(COLOURS[colour], np.float32) + jitter[i], 0, 1)
            img[:, IMAGE_SIZE - 4 * h:, 8 * i + 1:8 * i + 7] = rgb[:, None, None]
    else:
        for cell, (colour, shape) in enumerate(zip(d["colours"], d["shapes"])):
            rgb = np.clip(np.array(COLOURS[colour], np.float32) + jitter[cell], 0, 1)
            _draw_shape(img, cell, shape, rgb)
    return img.tobytes()


def render(spec: str) -> np.ndarray:
    """The (3, 32, 32) float32 image in [0, 1] of a content spec (deterministic)."""
    if not isinstance(spec, str):
        raise TypeError(f"spec: expected a JSON string, got {type(spec).__name__}")
    return np.frombuffer(_render_cached(spec), dtype=np.float32).reshape(
        3, IMAGE_SIZE, IMAGE_SIZE).copy()


def _group(spec: str) -> str:
    return "img-" + hashlib.sha256(spec.encode()).hexdigest()[:16]


def _options(rng: random.Random, words) -> str:
    return "Options: " + " ".join(rng.sample(sorted(words), len(words))) + "\n"


def _shapes(rng: random.Random, passage: bool) -> list[ImageExample]:
    colours = [rng.choice(sorted(COLOURS)) for _ in range(4)]
    shapes = [rng.choice(SHAPES) for _ in range(4)]
    kind = "shapes_passage" if passage else "shapes"
    spec = json.dumps({"kind": kind, "colours": colours, "shapes": shapes,
                       "noise": rng.randrange(2**31)}, sort_keys=True)
    group = _group(spec)
    out = []
    if passage:
        order = rng.sample(sorted(COLOURS), 4)
        prices = {c: rng.randint(10, 99) for c in order}
        lines = tuple(f"{c} price: {prices[c]}" for c in order)
        for cell in rng.sample(range(4), rng.randint(2, 3)):
            others = tuple(p for c in range(4) if c != cell for p in _cell_patches(c))
            out.append(ImageExample(kind, spec, "\n".join(lines) + f"\nQ: {CELLS[cell]} price?\nA:",
                                    str(prices[colours[cell]]), "number", group,
                                    _cell_patches(cell), others, lines,
                                    order.index(colours[cell])))
        return out
    asked = rng.sample([(c, a) for c in range(4) for a in ("colour", "shape")], rng.randint(2, 3))
    for cell, attr in asked:
        others = tuple(p for c in range(4) if c != cell for p in _cell_patches(c))
        answer = colours[cell] if attr == "colour" else shapes[cell]
        opts = _options(rng, COLOURS if attr == "colour" else SHAPES)
        out.append(ImageExample(kind, spec, f"{opts}Q: {CELLS[cell]} {attr}?\nA:", answer, "word",
                                group, _cell_patches(cell), others))
    return out


def _bars(rng: random.Random) -> list[ImageExample]:
    colours = rng.sample(sorted(COLOURS), 4)
    while True:
        heights = [rng.randint(1, 7) for _ in range(4)]
        if heights.count(max(heights)) == 1:
            break
    spec = json.dumps({"kind": "bars", "colours": colours, "heights": heights,
                       "noise": rng.randrange(2**31)}, sort_keys=True)
    group = _group(spec)
    questions = [(i, "height") for i in range(4)] + [(heights.index(max(heights)), "tallest")]
    out = []
    for bar, what in rng.sample(questions, rng.randint(2, 3)):
        others = tuple(p for b in range(4) if b != bar for p in _column_patches(b))
        if what == "height":
            out.append(ImageExample("bars", spec, f"Q: {colours[bar]} bar height?\nA:",
                                    str(heights[bar]), "number", group, _column_patches(bar),
                                    others))
        else:
            out.append(ImageExample("bars", spec, f"{_options(rng, COLOURS)}Q: tallest bar?\nA:",
                                    colours[bar], "word",
                                    group, _column_patches(bar), others))
    return out


def _stream(kind: str, split: str, seed: int) -> Iterator[list[ImageExample]]:
    rng = random.Random(f"bem-multimodal/v{MULTIMODAL_VERSION}/{kind}/{seed}")
    seen: set[str] = set()
    while True:
        batch = _bars(rng) if kind == "bars" else _shapes(rng, kind == "shapes_passage")
        # The split of an image hashes its content without the noise seed, so the same picture
        # (up to pixel noise) never lands in two splits.
        content = json.loads(batch[0].spec)
        content.pop("noise")
        key = json.dumps(content, sort_keys=True)
        if key in seen or _split_of(key) != split:
            continue
        seen.add(key)
        yield batch


def generate_images(split: str, n_images: int, *, seed: int = 0,
                    kinds: tuple[str, ...] = KINDS) -> list[ImageExample]:
    """All questions about `n_images` images of each kind in `kinds` for `split` ("train",
    "validation" or "test"), interleaved kind by kind, an image's questions together. The same
    (MULTIMODAL_VERSION, seed, split, n_images, kinds) always gives the same list; different
    splits never share an image content."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images: expected a positive int, got {n_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    if isinstance(kinds, str) or not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {kinds!r}")
    streams = [_stream(k, split, seed) for k in kinds]
    out: list[ImageExample] = []
    for _ in range(n_images):
        for s in streams:
            out += next(s)
    return out
