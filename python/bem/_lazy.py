"""Lazy package exports (PEP 562): a package's public names are imported from their submodules on
first use, so that `import bem.stats` or the `bem` command line does not pay for scipy.stats, the
model or the trainer until something needs them (`bem info`: 3.1 s → 1.6 s)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for `package`, whose name ``n`` lives in submodule
    ``exports[n]``. The first access imports that submodule and caches the value in the package;
    a submodule's own name (``pkg.bootstrap``) imports it, as an eager ``__init__`` would have."""
    def __getattr__(name: str) -> object:
        submodule = exports.get(name)
        if submodule is not None:
            value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # `pkg.submodule` as before
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
