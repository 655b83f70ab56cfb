"""A green suite must mean the compiled core ran: this fails when bem._C did not import (unless
BEM_ALLOW_NO_EXT=1 says a torch-only run is intended), and when BEM_REQUIRE_CUDA=1 (set by .ci/run
where nvcc is present) but the CUDA kernels were not built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bem
from bem import _ext


def test_compiled_core_loaded():
    if os.environ.get("BEM_ALLOW_NO_EXT") == "1":
        pytest.skip("BEM_ALLOW_NO_EXT=1: a run without the compiled core was asked for")
    assert _ext.available(), (
        f"bem._C did not import ({_ext.load_error()}): the ops would silently fall back to the "
        "torch reference. Build it (pip install . or the CMake dev build) or set BEM_ALLOW_NO_EXT=1")
    build = _ext.C().build_info()
    assert build["version"] == bem.__version__, "a stale bem._C from another version was imported"
    # The extension imported is the one inside the bem package being tested, not another copy.
    assert Path(_ext.C().__file__).parent == Path(bem.__file__).parent


def test_cuda_kernels_built_where_required():
    if os.environ.get("BEM_REQUIRE_CUDA") != "1":
        pytest.skip("BEM_REQUIRE_CUDA is not 1 (set where a CUDA compiler was present at build)")
    assert _ext.available() and _ext.cuda_built(), (
        "BEM_REQUIRE_CUDA=1 but bem._C was built without the CUDA kernels (the build did not find "
        "nvcc or failed in CUDA); `bem info` says: " + subprocess.run(
            [sys.executable, "-m", "bem", "info"], capture_output=True, text=True).stdout)


def test_missing_core_is_reported_not_hidden(tmp_path):
    """With bem._C unimportable, `import bem` still works, bem info says so loudly and the ops
    warn that they use the torch reference (a subprocess whose import of bem._C is blocked)."""
    code = (
        "import sys, warnings, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bem._C': raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bem import _ext\n"
        "from bem.cli import main\n"
        "from bem.ops import film\n"
        "assert not _ext.available() and 'blocked' in _ext.load_error()\n"
        "main(['info'])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    film(torch.ones(2, 3), torch.ones(3), torch.zeros(3))\n"
        "messages = [str(x.message) for x in w]\n"
        "assert any('bem._C did not import' in m for m in messages), messages\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(bem.__file__).parent.parent)] + sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "compiled core: NOT AVAILABLE" in res.stdout
