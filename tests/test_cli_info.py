"""`bem info`: version, build options, compiled backends and what is usable now, including the
SIMD path the CPU kernels actually take (the CPU's best, capped by BEM_CPU_SIMD)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bem import _ext
from bem.cli import main


def test_info_prints_build_and_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bem" in out and "torch sees CUDA" in out
    if _ext.available():
        assert "kernels use" in out and "bem threads" in out and "threading: " in out


@pytest.mark.skipif(not _ext.available(), reason="compiled core not built")
def test_info_reports_the_simd_cap():
    env = {**os.environ, "BEM_CPU_SIMD": "scalar"}
    out = subprocess.run([sys.executable, "-m", "bem", "info"], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "kernels use scalar" in out
