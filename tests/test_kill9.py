"""kill -9 safety of `bem run`: a tiny run is killed with SIGKILL at random moments, continued with
`bem run --resume` (and killed again) until it finishes; after every kill each file in the run
folder and the base-model cache must be whole (JSON parses, safetensors pass their SHA-256 check,
PNGs end with their IEND chunk), and the finished folder must equal an uninterrupted run's:
the same predictions and scores, bitwise-equal adapters, the same training losses and results.

CI kills 2 launches; the slow test kills at least 20 times (its result is in
docs/reliability.md)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bem
from bem import serialization as S

# The tiny configuration of tests/test_experiments.py, trimmed to one adapter, one router and a
# reference so that a run takes a few seconds; started through the Python API (the CLI's presets
# are minutes long), continued through the CLI itself.
START = """
import sys
from bem.experiments import PretrainConfig, RunConfig, run_experiment
from bem.model import TransformerConfig
cfg = RunConfig(model=TransformerConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, d_ff=48,
                                        max_positions=320),
                pretrain=PretrainConfig(steps=3, batch_tokens=128, n_per_task=6, warmup=1),
                variants=("V2", "AR1", "per_request"), train_steps=2, train_batch_size=4,
                train_single=6, train_switch=3, eval_single=2, eval_switch=1, max_new_tokens=3,
                budget_fraction=0.3, n_resamples=200, ar1_iterations=2, ar1_batch_size=4)
run_experiment(cfg, out=sys.argv[1], device="cpu", cache=sys.argv[2], progress=False)
"""
STAGES = ["base", "base_eval", "plan", "train:experts", "train:baseline", "eval:baseline",
          "train:V2", "eval:V2", "train:AR1", "eval:AR1", "train:per_request", "eval:per_request",
          "results", "validate", "report"]
# Fields that measure time or name the folder: everything else must be identical.
VOLATILE = ("latency", "ttft", "seconds", "created", "experiment", "cached", "path")


def _env(cache: Path) -> dict[str, str]:
    src = str(Path(bem.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, *sys.path]),
            "BEM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "BEM_NUM_THREADS": "1"}


def _launch(folder: Path, cache: Path) -> subprocess.Popen:
    """A fresh run when the folder has no state yet (killed before its first write), else
    `bem run --resume`."""
    if (folder / "state.json").exists():
        cmd = [sys.executable, "-m", "bem", "run", "--resume", str(folder), "--device", "cpu",
               "--no-progress"]
    else:
        cmd = [sys.executable, "-c", START, str(folder), str(cache)]
    return subprocess.Popen(cmd, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def _visible_files(root: Path) -> list[Path]:
    """Files whose path has no hidden component (writers' temporaries are hidden)."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def assert_whole(root: Path) -> None:
    """Every file under root is complete: no reader can see a half-written one."""
    for p in _visible_files(root):
        data = p.read_bytes()
        if p.suffix == ".json":
            json.loads(data)
        elif p.suffix == ".safetensors":
            S.load_file(p)
        elif p.suffix == ".png":
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), p
        elif p.suffix == ".md":
            assert data.decode("utf-8").strip(), p
        else:
            raise AssertionError(f"unexpected file {p}")


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if not any(w in k for w in VOLATILE)}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def assert_same_results(a: Path, b: Path) -> None:
    files = [p.relative_to(a) for p in _visible_files(a)]
    assert files == [p.relative_to(b) for p in _visible_files(b)]
    evals = 0
    for rel in files:
        if rel.suffix == ".safetensors":
            ta, _ = S.load_file(a / rel)
            tb, _ = S.load_file(b / rel)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
        elif rel.suffix == ".json" and rel.name not in ("acceptance.json", "state.json"):
            # acceptance.json holds latency gates (wall-clock); its inputs are compared here.
            da, db = (_strip(json.loads((f / rel).read_text())) for f in (a, b))
            assert da == db, rel
            if rel.name == "eval.json":
                evals += 1
                assert da["predictions"] and all(isinstance(p, str) for p in da["predictions"])
    assert evals >= 4                           # baseline, V2, AR1, per_request
    sa, sb = (json.loads((f / "state.json").read_text()) for f in (a, b))
    assert sa["completed"] == sb["completed"] == STAGES and _strip(sa) == _strip(sb)


def _reference(tmp: Path) -> tuple[Path, float]:
    """An uninterrupted run's folder (its state file holds each stage's duration), and the wall
    time of starting Python and importing bem's run machinery."""
    folder, cache = tmp / "reference", tmp / "reference-cache"
    _finish(_launch(folder, cache))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bem.experiments.runner, bem.cli"], check=True,
                   env=_env(cache))
    return folder, time.perf_counter() - t


def _completed(folder: Path) -> list[str]:
    state = folder / "state.json"
    return json.loads(state.read_text())["completed"] if state.exists() else []


def _kill_at(proc: subprocess.Popen, folder: Path, target: int, delay: float) -> bool:
    """SIGKILL `proc` `delay` seconds after `target` stages are completed (polled from the state
    file, which is written atomically); False when it exits first."""
    while proc.poll() is None and len(_completed(folder)) < target:
        time.sleep(0.005)
    if proc.poll() is None:
        time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def kill_episode(folder: Path, cache: Path, rng: random.Random, startup: float,
                 durations: dict[str, float], max_kills: int) -> list[str]:
    """Launch/resume until the run finishes, SIGKILLing launches while kills remain: one in ten
    during start-up (a random time under `startup`), the others inside a stage drawn uniformly
    from those not completed yet, at a random point of its duration in the uninterrupted run
    (`durations`), so that its writes, the last ones included, are hit. Returns where each kill
    landed (the stage running at the kill)."""
    landed = []
    while True:
        done = len(_completed(folder))
        proc = _launch(folder, cache)
        if len(landed) < max_kills and done < len(STAGES):
            if rng.random() < 0.1:
                killed = _kill_at(proc, folder, 0, rng.uniform(0.0, startup))
            else:
                target = rng.randrange(done, len(STAGES))
                killed = _kill_at(proc, folder, target,
                                  rng.uniform(0.0, durations[STAGES[target]]))
            if killed:
                now = _completed(folder)
                landed.append(f"in {STAGES[len(now)]}" if len(now) < len(STAGES)
                              else "after the last stage")
                assert_whole(folder)
                if cache.exists():
                    assert_whole(cache)
                continue
            assert proc.returncode == 0, proc.stderr.read().decode(errors="replace")[-3000:]
            proc.stderr.close()
            return landed
        _finish(proc)
        return landed


def kill_and_compare(tmp: Path, kills: int, seed: int) -> tuple[list[str], int]:
    """Episodes of up to 3 kills (each from an empty folder and an empty cache, so that kills
    land all over the run, pre-training and the cache's writes included) until `kills` launches
    were killed; every episode's finished folder must equal the uninterrupted run's. Returns
    (where the kills landed, the number of episodes)."""
    reference, startup = _reference(tmp)
    assert_whole(reference)
    durations = json.loads((reference / "state.json").read_text())["seconds"]
    rng = random.Random(seed)
    landed: list[str] = []
    episode = 0
    while len(landed) < kills:
        folder, cache = tmp / f"killed-{episode}", tmp / f"cache-{episode}"
        landed += kill_episode(folder, cache, rng, startup, durations,
                               min(3, kills - len(landed)))
        assert_same_results(reference, folder)
        episode += 1
        assert episode <= 4 * kills, f"only {len(landed)} kills landed in {episode} episodes"
    return landed, episode


def test_kill9_during_run_then_resume_gives_identical_results(tmp_path):
    landed, _ = kill_and_compare(tmp_path, kills=2, seed=20)
    assert len(landed) >= 2


@pytest.mark.slow
def test_kill9_at_twenty_random_points(tmp_path):
    landed, episodes = kill_and_compare(tmp_path, kills=20, seed=2024)
    print(f"\nkill -9: {len(landed)} kills in {episodes} episodes, landing {landed}")
