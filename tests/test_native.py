"""The compiled hot modules (mypyc, ``hatch_build.py``) behave exactly as their Python sources.

A regular wheel runs ``vllm_audit.native.MODULES`` compiled; the editable install the rest of the
suite uses runs the sources. These tests compile the modules once (``hatch_build.native_tree``:
a copy of the package with the extension files beside the sources), check that a process with
that tree on ``PYTHONPATH`` really imports the compiled modules, run the whole privacy test suite
against them (and the tests of the record built from an exchange, and of the writer), and compare
their output with the sources' on the redaction corpora (development, held-out, every adversarial
variant, realistic prompts, records), on random digit soup and on the records of 300 exchanges. They
skip where no C compiler is found; in CI (``VLLM_AUDIT_REQUIRE_SERVICES=1``) they fail instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import need_service

ROOT = Path(__file__).resolve().parent.parent

#: Run in a child process with the tree under test first on PYTHONPATH: every finding and every
#: redacted record of the corpora, as JSON (the same script for the sources and the compiled tree).
PROBE = r"""
import json, random, sys
sys.path[:0] = [sys.argv[1] + "/bench/redaction", sys.argv[1] + "/bench"]
import _writer
from adversarial import variants
from corpus import generate
from realistic import prompts, records
from vllm_audit import native
from vllm_audit.config import Config
from vllm_audit.finalize import finalize
from vllm_audit.privacy import build_redactor
from vllm_audit.privacy.recognizers import find

texts = []
for seed in (20260101, 777):
    items = generate(seed, 20, 150)
    texts += [str(i["text"]) for i in items]
    for group in variants(items, seed).values():
        texts += [str(i["text"]) for i in group if "text" in i]
texts += prompts(seed=11, n=60)
rng = random.Random(5)
soup = "0123456789 -+().:@xX\tIBANGB中文１２３ａ\u200b\uff0d"
texts += ["".join(rng.choice(soup) for _ in range(rng.randrange(1, 90))) for _ in range(3000)]
redact = build_redactor(Config())
recs = records(seed=3, n=150, pii=2, size=800) + records(seed=4, n=50, pii=0, size=2000)
volatile = ("record_id", "request_id", "timestamp", "latency_ms", "ttft_ms")  # per process
finalized = []
for ex in _writer.make_exchanges(300):  # chat, half streamed with usage, 1 KB prompts, some PII
    rec = finalize(ex)
    finalized.append({k: v for k, v in rec.items() if k not in volatile})
out = {
    "native": native.status(),
    "find": [find(t) for t in texts],
    "records": [redact(r) for r in recs],
    "finalize": finalized,
}
print(json.dumps(out, ensure_ascii=False, default=str))
"""


def _hatch_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_audit_hatch_build", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the package with the compiled modules (one mypyc build for this module's tests)."""
    cc = os.environ.get("CC", "cc")
    need_service(shutil.which(cc) is not None, f"a C compiler ({cc}) to build the compiled modules")
    try:
        import mypyc  # noqa: F401
    except ImportError:
        need_service(False, "mypyc (pip install mypy) to build the compiled modules")
    out = tmp_path_factory.mktemp("native")
    try:
        _hatch_build().native_tree(ROOT / "src", out)
    except RuntimeError as exc:
        need_service(False, f"building the compiled modules: {exc}")
    yield out


def _run(pythonpath: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_tree_imports_every_module_compiled(tree: Path) -> None:
    """With the tree first on the path, each module of ``native.MODULES`` is an extension module
    (so the tests below test compiled code), and ``--version`` says so."""
    got = _run(tree, "-c", "import json; from vllm_audit import native; print(json.dumps(native.status()))")
    assert got.returncode == 0, got.stderr
    status = json.loads(got.stdout)
    assert status and all(status.values()), status
    version = _run(tree, "-m", "vllm_audit.cli", "--version")
    n = len(status)
    assert f"compiled (mypyc), {n} of {n} modules" in version.stdout, version.stdout + version.stderr
    pure = _run(ROOT / "src", "-m", "vllm_audit.cli", "--version")
    assert "(pure Python)" in pure.stdout, pure.stdout + pure.stderr


def test_the_privacy_and_capture_tests_pass_against_the_compiled_modules(tree: Path) -> None:
    """Every test of ``tests/privacy`` (property tests included), of the record built from an
    exchange and of the writer passes with the compiled modules."""
    got = _run(tree, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/privacy", "tests/test_capture.py",
               "tests/test_writer.py")  # fmt: skip
    assert got.returncode == 0, got.stdout[-6000:] + got.stderr[-2000:]
    assert " passed" in got.stdout and " failed" not in got.stdout


def test_compiled_and_python_modules_give_the_same_findings_and_records(tree: Path) -> None:
    """The sources are the compiled code's oracle: identical findings on ~9,000 texts (corpora,
    adversarial variants, prompts, random soup), identical redacted records and identical records
    finalized from 300 exchanges (streamed and not)."""
    pure = _run(ROOT / "src", "-c", PROBE, str(ROOT))
    compiled = _run(tree, "-c", PROBE, str(ROOT))
    assert pure.returncode == 0, pure.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    a, b = json.loads(pure.stdout), json.loads(compiled.stdout)
    assert not any(a["native"].values()) and all(b["native"].values())
    assert len(a["find"]) > 9_000 and sum(map(bool, a["find"])) > 2_000  # the corpus finds things
    diffs = [i for i, (x, y) in enumerate(zip(a["find"], b["find"], strict=True)) if x != y]
    assert not diffs, f"{len(diffs)} texts differ, first at {diffs[0]}: {a['find'][diffs[0]]} != {b['find'][diffs[0]]}"
    assert a["records"] == b["records"]
    assert len(a["finalize"]) == 300 and a["finalize"] == b["finalize"]


def _wheel(tmp: Path, env_extra: dict[str, str], isolated: bool) -> tuple[Path, str]:
    """Build this checkout's wheel with the build hook: ``isolated`` as the README's first command
    does (the pip of a fresh venv, in an isolated build environment holding only the pinned build
    requirements, none of the package's own dependencies), else in this environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_AUDIT_PURE_PYTHON", "VIRTUAL_ENV")}
    env.update(env_extra)
    out = tmp / "wheel"
    python, flags = sys.executable, ["--no-build-isolation"]
    if isolated:
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=120)
        python, flags = str(tmp / "venv" / "bin" / "python"), []
    got = subprocess.run(
        [python, "-m", "pip", "wheel", "-v", "--no-deps", *flags, "-w", str(out), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    wheels = list(out.glob("vllm_audit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], got.stdout + got.stderr


@pytest.mark.parametrize("case", ["compiled", "pure_by_request", "no_compiler"])
def test_the_wheel_build_compiles_or_falls_back_to_pure_python(tree: Path, tmp_path: Path, case: str) -> None:
    """``pip wheel .`` (the hook in ``hatch_build.py``): a platform wheel holding every compiled
    module and its source, built in an isolated build environment as a user's install is (where
    the package's dependencies, hyperscan among them, are not installed: the sources must
    type-check without them); with ``VLLM_AUDIT_PURE_PYTHON=1`` or a C compiler that fails, a pure
    wheel (the second saying why), never a failed install."""
    import zipfile

    pytest.importorskip("hatchling", reason="hatchling (the build backend) for an in-place wheel build")
    env = {"VLLM_AUDIT_PURE_PYTHON": "1"} if case == "pure_by_request" else {}
    if case == "no_compiler":
        env["CC"] = "/bin/false"
    wheel, log = _wheel(tmp_path, env, isolated=case == "compiled")
    names = zipfile.ZipFile(wheel).namelist()
    compiled = [n for n in names if n.endswith(".so")]
    assert "vllm_audit/privacy/recognizers.py" in names and "vllm_audit/finalize.py" in names
    if case == "compiled":
        assert "-cp3" in wheel.name and not wheel.name.endswith("-none-any.whl"), wheel.name
        for module in _hatch_build().NATIVE_MODULES:
            stem = module.removesuffix(".py")
            assert any(n.startswith(stem + ".") for n in compiled), (module, compiled)
    else:
        assert wheel.name.endswith("-py3-none-any.whl") and not compiled, (wheel.name, compiled)
    if case == "no_compiler":
        assert "compiling the hot modules failed; building a pure-Python wheel" in log
