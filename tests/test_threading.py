"""Where bem's CPU kernels run their threads: on the OpenMP runtime torch has loaded (so bem's work
goes to the threads torch's ops leave spinning), on bem's own pool with BEM_CPU_THREADING=pool, and
on a fresh own pool in a forked child (where starting an OpenMP team can hang). Results must not
depend on the backend: the kernels sum every output element in the same order however the work
is split."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch

import bem
from bem import _ext
from bem.ops import film, kron_delta, lora_delta

pytestmark = pytest.mark.skipif(not _ext.available(), reason="compiled core not built")

OPENMP_PREFIXES = ("libgomp", "libiomp", "libomp")  # as bem looks them up (hashed names too)


def _openmp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return False
    return any(os.path.basename(p).startswith(OPENMP_PREFIXES) for p in paths)


def _workload_digest() -> str:
    """sha256 of the outputs (and gradients) of multi-threaded calls of every op, on fixed data."""
    gen = torch.Generator().manual_seed(7)
    T, d_in, d_out, r, k, E = 700, 300, 260, 24, 16, 3
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(E, r, d_in, generator=gen) / 10
    B = torch.randn(E, d_out, r, generator=gen)
    ei = torch.randint(-1, E, (T // 64 + 1,), generator=gen).repeat_interleave(64)[:T].contiguous()
    ri = torch.stack([torch.randperm(r, generator=gen)[:k] for _ in range(T)])
    outs = [lora_delta(x, A, B, scale=0.5, expert_index=ei, rank_index=ri)]
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    lora_delta(xg, Ag, Bg, expert_index=ei, rank_index=ri).pow(2).sum().backward()
    outs += [xg.grad, Ag.grad, Bg.grad]
    xk = torch.randn(600, 32 * 48, generator=gen)
    outs.append(kron_delta(xk, torch.randn(24, 32, generator=gen), torch.randn(40, 48, generator=gen)))
    xf = torch.randn(512, 1024, generator=gen)
    outs.append(film(xf, torch.rand(512, 1024, generator=gen) * 2, torch.randn(512, 1024, generator=gen)))
    h = hashlib.sha256()
    for t in outs:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


_DIGEST_SCRIPT = (
    "import sys; sys.path.insert(0, {tests!r}); import bem, test_threading as t; "
    "bem.set_num_threads(2); print(bem.threading_backend()); print(t._workload_digest())")


def test_backend_follows_the_process_openmp_runtime():
    before = bem.get_num_threads()
    try:
        bem.set_num_threads(2)
        backend = bem.threading_backend()
        if _openmp_loaded():
            assert backend.startswith("openmp ("), backend
        else:
            assert backend == "pool", backend
        bem.set_num_threads(1)
        assert bem.threading_backend() == "serial"
    finally:
        bem.set_num_threads(before)


def test_results_do_not_depend_on_the_threading_backend():
    before = bem.get_num_threads()
    try:
        bem.set_num_threads(2)
        here = bem.threading_backend(), _workload_digest()
        bem.set_num_threads(1)
        serial = _workload_digest()
    finally:
        bem.set_num_threads(before)
    script = _DIGEST_SCRIPT.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "BEM_CPU_THREADING": "pool"}
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0] == "pool"
    assert here[1] == serial, f"{here[0]} differs from one thread"
    assert out[1] == serial, "bem's own pool differs from one thread"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_runs_on_its_own_pool():
    before = bem.get_num_threads()
    bem.set_num_threads(2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 512, generator=gen)
    A = torch.randn(64, 512, generator=gen) / 20
    B = torch.randn(384, 64, generator=gen)
    parent = lora_delta(x, A, B)  # the parent has run a team on the backend (OpenMP if loaded)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no torch parallel ops here (torch's own would hang on libgomp)
        code = 1
        try:
            os.close(read_fd)
            y = lora_delta(x, A, B)
            msg = f"{bem.threading_backend()} {hashlib.sha256(y.numpy().tobytes()).hexdigest()}"
            os.write(write_fd, msg.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("bem call in a forked child hung")
            time.sleep(0.05)
        msg = os.read(read_fd, 4096).decode().split()
    finally:
        os.close(read_fd)
        bem.set_num_threads(before)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert msg[0] == "pool"
    assert msg[1] == hashlib.sha256(parent.numpy().tobytes()).hexdigest()
