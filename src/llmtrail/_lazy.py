"""Names a package loads on first use (PEP 562), so importing it stays light.

``__getattr__ = lazy_names(__name__, {"Name": ".module"})``: the first access to ``Name``
imports ``.module`` relative to the package, caches the value in the package's namespace (so
later accesses cost nothing), and returns it. Unknown names raise ``AttributeError`` as usual.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
