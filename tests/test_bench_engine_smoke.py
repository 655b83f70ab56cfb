"""Smoke run of benchmarks/bench_engine.py --quick: every part runs on small models and prints its
table; the HF transformers + PEFT twin gives bem's greedy tokens."""
import os
import sys

import pytest
import torch

import bem

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))


@pytest.fixture(autouse=True)
def _restore_threads():
    n, b = torch.get_num_threads(), bem.get_num_threads()
    yield
    torch.set_num_threads(n)
    bem.set_num_threads(b)


def test_latency_and_overhead_quick(capsys):
    import bench_engine

    assert bench_engine.main(["--quick", "--only", "latency,overhead"]) == 0
    out = capsys.readouterr().out
    for row in ("| baseline |", "| V1 |", "| V3 |", "| V4 |", "| AR1 |", "| full |",
                "overhead / step"):
        assert row in out


def test_throughput_quick(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import bench_engine

    assert bench_engine.main(["--quick", "--only", "throughput"]) == 0
    out = capsys.readouterr().out
    assert "4/4 greedy outputs equal token for token" in out
    assert "gives different outputs" in out
    assert "| 4 |" in out
