"""A write that fails half-way (a full disk) leaves a log that still verifies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from vllm_audit.integrity.chain import Chain

CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from vllm_audit.errors import LogWriteError
    from vllm_audit.integrity.chain import Chain
    from vllm_audit.integrity.config import IntegrityConfig

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    chain = Chain(sys.argv[1], IntegrityConfig(signing_key=sys.argv[2]))
    pad = "x" * 200
    chain.append([*chain.pending_events(), *({"record_type": "inference", "n": i, "pad": pad} for i in range(10))])
    chain.sync()
    # Files may now grow only a little: the next batch of 200 lines is written in part,
    # complete lines first, then a partial one, then EFBIG.
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (chain._segment_bytes + 5000, hard))
    try:
        chain.append([{"record_type": "inference", "n": 100 + i, "pad": pad} for i in range(200)])
        raise SystemExit("the write limit was not hit")
    except LogWriteError:
        pass
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is back
    if sys.argv[3] == "stop":  # stopped right after the failure: no append came to recover it
        chain.close()
        raise SystemExit(0)
    chain.append([{"record_type": "inference", "n": 100 + i, "pad": pad} for i in range(200)])
    chain.sync()
    chain.after_commit()
    chain.close()
    """
)


def _write_and_verify(tmp_path: Path, mode: str) -> tuple[Path, list[int]]:
    """Run the child (``retry`` the failed batch, or ``stop`` right after it), verify, return the ns."""
    key = tmp_path / "k"
    subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "keygen", "--out", str(key)], check=True, capture_output=True
    )
    log = tmp_path / "log"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(log), str(key) + ".key", mode], capture_output=True, text=True, timeout=60
    )
    assert 0 == child.returncode, child.stderr
    out = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "verify", str(log), "--public-key", str(key) + ".pub"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == out.returncode, out.stdout + out.stderr
    lines = [ln for seg in sorted(log.glob("writers/*/seg-*.jsonl")) for ln in seg.read_bytes().splitlines()]
    ns = [int(ln.split(b'"n":')[1].split(b",")[0]) for ln in lines if b'"n":' in ln]
    assert list(log.glob("writers/*/quarantine/*")), "the cut bytes are kept in quarantine"
    return log, ns


def test_partial_write_with_complete_lines_is_cut_back_and_verifies(tmp_path: Path) -> None:
    """Complete lines of a failed batch do not stay in the log; the retried batch verifies."""
    _, ns = _write_and_verify(tmp_path, "retry")
    assert list(range(10)) + list(range(100, 300)) == ns  # each entry once, in order


def test_a_writer_stopped_right_after_a_failed_write_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    """Closing a chain whose last write failed part-way cuts the partial entry back and records the
    recovery (before, the stopped log ended in torn bytes that no recovery event explained)."""
    log, ns = _write_and_verify(tmp_path, "stop")
    assert list(range(10)) == ns  # none of the failed batch stays
    events = [ln for seg in sorted(log.glob("writers/*/seg-*.jsonl")) for ln in seg.read_bytes().splitlines()]
    assert any(b'"event":"recovery"' in ln for ln in events)
    assert any(b'"event":"writer_stopped"' in ln for ln in events)
    assert callable(Chain)  # the class under test (imported so a rename breaks this test loudly)
