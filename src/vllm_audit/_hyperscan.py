"""The optional ``hyperscan`` module (Intel Hyperscan wheels exist for Linux/macOS x86-64).

``HS`` is the module, or None where no wheel is installed. It is imported through ``importlib``
so that its type is ``ModuleType | None`` either way: the modules that use it (the privacy gate,
the detection pre-filter) type-check, and compile with mypyc, in a build environment that does
not have it installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("hyperscan")
    except ImportError:  # pragma: no cover - exercised where no wheel exists
        return None


HS = _load()
