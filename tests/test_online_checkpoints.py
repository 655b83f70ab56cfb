"""bem.online.checkpoints: the ring keeps the newest N, loads what it saved bit for bit, refuses
corrupted checkpoints by name and falls back past them, and a kill -9 in the middle of a write
leaves the previous checkpoint loadable; rollback of an OnlineLearner restores it bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bem.online import CheckpointRing, OnlineLearner
from bem.online.checkpoints import STATE, TENSORS

sys.path.insert(0, str(Path(__file__).parent))
from test_online_learner import TinyAdapted, _assert_same, _state, item_loss, make_items  # noqa: E402


def test_ring_keeps_newest_and_round_trips(tmp_path):
    ring = CheckpointRing(tmp_path / "ck", capacity=3)
    saved = {}
    for i in range(5):
        t = {"w": torch.randn(4, 3, dtype=torch.float64), "step": torch.tensor(float(i))}
        saved[ring.save(t, {"position": i * 16})] = t
    assert ring.sequence() == [2, 3, 4]
    seq, tensors, doc = ring.latest()
    assert seq == 4 and doc == {"position": 64}
    assert all(torch.equal(tensors[k], saved[4][k]) for k in saved[4])
    with pytest.raises(ValueError, match="doc: not JSON-serialisable"):
        ring.save({"w": torch.zeros(1)}, {"x": float("nan")})
    assert ring.sequence() == [2, 3, 4]


@pytest.mark.parametrize("damage", ["flip-tensor-byte", "truncate-state", "drop-manifest"])
def test_corrupted_checkpoint_refused_by_name_and_skipped(tmp_path, damage):
    ring = CheckpointRing(tmp_path, capacity=4)
    ring.save({"w": torch.ones(8)}, {"position": 1})
    ring.save({"w": torch.full((8,), 2.0)}, {"position": 2})
    folder = ring.path(1)
    if damage == "flip-tensor-byte":
        data = bytearray((folder / TENSORS).read_bytes())
        data[-3] ^= 0xFF
        (folder / TENSORS).write_bytes(bytes(data))
        match = TENSORS
    elif damage == "truncate-state":
        (folder / STATE).write_text('{"posi')
        match = STATE
    else:
        (folder / "manifest.json").unlink()
        match = "manifest.json"
    with pytest.raises(ValueError, match=match):
        ring.load(1)
    seq, tensors, doc = ring.latest()
    assert seq == 0 and doc == {"position": 1} and torch.equal(tensors["w"], torch.ones(8))
    (ring.path(0) / STATE).write_text("{}")
    with pytest.raises(ValueError, match="no loadable checkpoint"):
        ring.latest()


def test_kill_minus_9_during_writes_leaves_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parents[1] / 'python')!r})
        from bem.online import CheckpointRing
        ring = CheckpointRing({str(tmp_path)!r}, capacity=3)
        i = 0
        while True:
            t = {{"w": torch.full((1 << 21,), float(i))}}      # 8 MB: writes take a while
            ring.save(t, {{"i": i}})
            print(i, flush=True)
            i += 1
    """)
    for delay in (0.7,):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()        # at least one checkpoint is complete
        assert first.strip().isdigit()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ring = CheckpointRing(tmp_path, capacity=3)     # removes the unfinished temporary folder
        assert not list(tmp_path.glob(".tmp-*"))
        seq, tensors, doc = ring.latest()
        assert torch.equal(tensors["w"], torch.full((1 << 21,), float(doc["i"])))
        for s in ring.sequence():                       # every listed checkpoint verifies
            ring.load(s)


def test_rollback_restores_learner_bit_for_bit_and_stream_continues(tmp_path):
    items = make_items(96, 7)
    learner = OnlineLearner(TinyAdapted(), item_loss, lr=0.05, prox_mu=0.01)
    ring = CheckpointRing(tmp_path, capacity=2)
    for k in range(3):
        learner.update(items[k * 8:(k + 1) * 8])
    learner.promote()
    good = _state(learner)
    tensors, doc = learner.state_dict()
    ring.save(tensors, {"learner": doc, "position": 24})
    for k in range(3, 8):                                  # updates that get rejected
        learner.update(items[k * 8:(k + 1) * 8])
    _, tensors, doc = ring.latest()
    learner.load_state_dict(tensors, json.loads(json.dumps(doc["learner"])))
    _assert_same(good, _state(learner))
    assert doc["position"] == 24
    # Continuing from the restored state equals continuing from the original one.
    twin = OnlineLearner(TinyAdapted(), item_loss, lr=0.05, prox_mu=0.01)
    twin.load_state_dict(tensors, doc["learner"])
    for k in range(3, 6):
        learner.update(items[k * 8:(k + 1) * 8])
        twin.update(items[k * 8:(k + 1) * 8])
    _assert_same(_state(twin), _state(learner))
