"""A bounded replay buffer of past stream items (reservoir sampling, so every item seen so far is
equally likely to be kept), seeded, with JSON state for checkpoints."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bem.online._checks import positive_int


class ReplayBuffer:
    """capacity: items kept. seed: the generator (numpy PCG64) that decides what is kept and what
    :meth:`sample` draws; its state is saved with the items."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = positive_int(capacity, "capacity")
        self.items: list[Any] = []
        self.seen = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __len__(self) -> int:
        return len(self.items)

    def add(self, items: Sequence[Any]) -> None:
        """Algorithm R: item t (0-based) replaces a random slot with probability capacity/(t+1)."""
        for item in items:
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.items[j] = item
            self.seen += 1

    def sample(self, k: int) -> list[Any]:
        """k items drawn without replacement (all of them when fewer are kept)."""
        if k <= 0 or not self.items:
            return []
        idx = self.rng.choice(len(self.items), size=min(k, len(self.items)), replace=False)
        return [self.items[i] for i in idx.tolist()]

    def state_dict(self, encode: Callable[[Any], Any]) -> dict[str, Any]:
        """JSON-serialisable state; `encode(item)` turns an item into JSON values."""
        return {"capacity": self.capacity, "seen": self.seen,
                "items": [encode(it) for it in self.items],
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, doc: dict[str, Any], decode: Callable[[Any], Any]) -> None:
        if not isinstance(doc, dict) or doc.get("capacity") != self.capacity:
            raise ValueError(f"state: replay: expected a buffer of capacity {self.capacity}")
        items = [decode(v) for v in doc["items"]]
        if len(items) > self.capacity or not isinstance(doc.get("seen"), int) or \
                doc["seen"] < len(items):
            raise ValueError("state: replay: inconsistent items and count")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = doc["rng"]
        self.items, self.seen, self.rng = items, doc["seen"], rng
