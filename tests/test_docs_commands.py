"""Commands the docs tell a new user to run (docs/vllm.md, README "With vLLM")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_keygen_creates_the_directory_of_its_prefix(tmp_path: Path) -> None:
    """`vllm-audit keygen --out DIR/prefix` works when DIR does not exist yet."""
    prefix = tmp_path / "etc" / "vllm-audit" / "checkpoint"
    out = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "keygen", "--out", str(prefix)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == out.returncode, out.stderr
    assert prefix.with_suffix(".key").exists() and prefix.with_suffix(".pub").exists()
