"""bem.stats and bem.experiments export their names lazily (bem._lazy): `bem info` must not pay for
scipy.stats or the trainer, and every documented name must still resolve as before."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bem.experiments
import bem.stats


def test_command_line_does_not_import_heavy_modules():
    code = ("import sys, bem.cli; bem.cli.build_parser(); "
            "heavy = [m for m in ('scipy.stats', 'bem.stats.bootstrap', 'bem.experiments.runner') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("package", [bem.stats, bem.experiments], ids=["stats", "experiments"])
def test_every_exported_name_resolves(package):
    for name in package.__all__:
        assert name in dir(package)
        module = package._EXPORTS.get(name)
        if module is not None:  # the very object its submodule defines
            source = importlib.import_module(f"{package.__name__}.{module}")
            assert getattr(package, name) is getattr(source, name), name
        else:
            assert getattr(package, name) is not None


def test_submodules_and_shadowing_names():
    import bem.stats.fdr  # noqa: F401  (importing the submodule must not rebind the function)

    assert callable(bem.stats.fdr) and bem.stats.fdr.__module__ == "bem.stats.fdr"
    assert bem.stats.bootstrap.__name__ == "bem.stats.bootstrap"  # a submodule by attribute
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        bem.stats.no_such_name  # noqa: B018
    from bem.stats import bca_interval, validate  # noqa: F401
