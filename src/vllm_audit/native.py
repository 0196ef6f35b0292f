"""Which of the record path's hot modules this process runs compiled.

A regular wheel (``pip install .``) holds these modules compiled to C extension modules by mypyc
beside their Python sources (``hatch_build.py``); an editable install, a build with
``VLLM_AUDIT_PURE_PYTHON=1`` or a machine without a C compiler runs the sources. Both behave the
same (``tests/test_native.py`` runs the privacy, capture and writer tests and a differential
corpus against the compiled modules); the compiled ones take less CPU per record
(``docs/performance.md``). ``vllm-audit --version`` says which is in use.
"""

from __future__ import annotations

import importlib

#: The compiled modules, in build order (``hatch_build.py`` reads this tuple from this file).
MODULES = (
    "vllm_audit.privacy.checksums",
    "vllm_audit.privacy.normalize",
    "vllm_audit.privacy.gate",
    "vllm_audit.privacy.recognizers",
    "vllm_audit.privacy.redactor",
    "vllm_audit.finalize",
)


def status() -> dict[str, bool]:
    """Each module of ``MODULES``: True when the imported module is an extension (compiled)."""
    out: dict[str, bool] = {}
    for name in MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        out[name] = not path.endswith((".py", ".pyc"))
    return out


def summary() -> str:
    """``"compiled (mypyc), 6 of 6 modules"``, ``"pure Python"`` or a partial count."""
    st = status()
    n = sum(st.values())
    if n == 0:
        return "pure Python"
    return f"compiled (mypyc), {n} of {len(st)} modules"
