"""docs/online.md's code example runs as written (a tiny frozen-base model with a trainable
adapter, the learner, the canary judge, the checkpoint ring and rollback)."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "online.md"


def test_docs_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/online.md: no python example"
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "docs_online_example"})
    out = capsys.readouterr().out
    assert "refused: weights: feedback weight nan at index 1 is not finite" in out
    assert "rejected" in out            # the gate rejects the rounds that forget domain a
