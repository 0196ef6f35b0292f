"""Wheel build hook: compile the record path's hot modules with mypyc (falls back to pure Python).

The modules named in ``vllm_audit.native.MODULES`` (the record built from an exchange, the
recognizers, their checksums, the detection copy, the gate and the redactor: what the writer runs
for every record) are plain, mypy-strict Python. When a regular wheel is built (``pip install .``,
``pip wheel .``) this hook compiles them to C extension modules with mypyc (the compiler mypy
ships) and puts them in the wheel beside their ``.py`` sources; Python imports the extension, the
source stays as documentation and as the oracle the tests compare the compiled code with
(``tests/test_native.py``). ``vllm_audit.native.status()`` says which modules a process uses.

Nothing is compiled for an editable install (``pip install -e .``: the source tree is what runs,
as a developer expects), when ``VLLM_AUDIT_PURE_PYTHON=1`` is set, or when compiling fails (no C
compiler, no Python headers): the wheel is then pure Python, with the same behaviour, and the
build says so on stderr. The compiled wheel needs nothing at run time that the pure one does not.

``python hatch_build.py OUT`` writes a copy of the package with its compiled modules into ``OUT``
(a tree to put on ``PYTHONPATH`` in front of the source: the tests and the benchmarks use it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _modules() -> tuple[str, ...]:
    """The files to compile: ``vllm_audit.native.MODULES`` (read from the source, not imported)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent / "src" / "vllm_audit" / "native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets):
            return tuple(name.replace(".", "/") + ".py" for name in ast.literal_eval(node.value))
    raise RuntimeError("src/vllm_audit/native.py defines no MODULES")


#: Compiled together (one shared library, so calls between them are direct C calls).
NATIVE_MODULES = _modules()
#: The shared library's name: ``vllm_audit_native__mypyc.<abi>.so`` at the top of site-packages.
GROUP = "vllm_audit_native"

_SETUP = """\
from setuptools import setup
from mypyc.build import mypycify

setup(
    name="vllm-audit-native",
    ext_modules=mypycify(
        ["--ignore-missing-imports", "--python-version", "3.11", *{modules!r}],
        group_name={group!r},
        opt_level="3",
    ),
)
"""


def compile_native(src: Path, out: Path) -> list[Path]:
    """Compile ``NATIVE_MODULES`` of the source tree ``src`` into ``out``; the files made, relative to ``out``.

    Raises ``RuntimeError`` with the compiler's output when mypyc or the C compiler fails.
    """
    src, out = src.resolve(), out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vllm-audit-mypyc-") as tmp:
        # mypyc works on a copy: its build files and caches never land in the source tree.
        work = Path(tmp) / "src"
        shutil.copytree(src / "vllm_audit", work / "vllm_audit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        (Path(tmp) / "setup.py").write_text(_SETUP.format(modules=list(NATIVE_MODULES), group=GROUP))
        lib = Path(tmp) / "lib"
        env = dict(os.environ, MYPY_CACHE_DIR=str(Path(tmp) / "mypy-cache"))
        proc = subprocess.run(
            [sys.executable, str(Path(tmp) / "setup.py"), "build_ext", "--build-lib", str(lib),
             "--build-temp", str(Path(tmp) / "build")],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"mypyc failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        made = sorted(p.relative_to(lib) for p in lib.rglob("*") if p.is_file() and p.suffix in (".so", ".pyd"))
        if len(made) < len(NATIVE_MODULES):
            raise RuntimeError(f"mypyc made {len(made)} extension files for {len(NATIVE_MODULES)} modules")
        for rel in made:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib / rel, out / rel)
    return made


_Base: Any
try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface as _Base  # type: ignore[import-not-found, no-redef, unused-ignore]
except ImportError:  # run as a script (tests, bench) without hatchling installed
    _Base = object


class NativeBuildHook(_Base):  # type: ignore[misc, unused-ignore]
    """Hatch build hook: regular wheels get the compiled modules when they compile."""

    PLUGIN_NAME = "vllm-audit-native"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "standard":
            return  # editable installs run the source tree as it is
        if os.environ.get("VLLM_AUDIT_PURE_PYTHON", "") not in ("", "0"):
            sys.stderr.write("vllm-audit: VLLM_AUDIT_PURE_PYTHON set: building a pure-Python wheel\n")
            return
        out = Path(tempfile.mkdtemp(prefix="vllm-audit-native-"))  # removed in finalize()
        self._native_out = out
        try:
            made = compile_native(Path(self.root) / "src", out)
        except Exception as exc:  # no compiler, no headers, no mypyc: the pure wheel works the same
            sys.stderr.write(f"vllm-audit: compiling the hot modules failed; building a pure-Python wheel ({exc})\n")
            return
        for rel in made:
            build_data["force_include"][str(out / rel)] = str(rel)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        out = getattr(self, "_native_out", None)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


def native_tree(src: Path, out: Path) -> list[Path]:
    """``out``: a copy of the package ``src/vllm_audit`` with the compiled modules beside their sources.

    Put ``out`` on ``PYTHONPATH`` in front of the source (a regular package is taken from the first
    ``sys.path`` entry that holds it, so the extension files must sit in a whole copy).
    """
    out = out.resolve()
    if (out / "vllm_audit").exists():
        shutil.rmtree(out / "vllm_audit")
    shutil.copytree(src / "vllm_audit", out / "vllm_audit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return compile_native(src, out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hatch_build.py OUT_DIR  (a copy of src/ with the compiled modules)")
    for rel in native_tree(Path(__file__).resolve().parent / "src", Path(sys.argv[1])):
        print(rel)
