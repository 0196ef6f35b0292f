"""``vllm-audit rules test`` offline over a log, ``alerts list|show``, ``rules sigma``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.detect.conftest import attack_traffic, write_log
from vllm_audit.cli import main


def test_rules_test_then_alerts_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rules test` finds the attacks offline (no Redis, nothing written); `alerts list` is empty then."""
    log_dir = tmp_path / "log"
    write_log(log_dir, attack_traffic(0))
    assert 0 == main(["rules", "test", "--log-dir", str(log_dir)])
    out = capsys.readouterr()
    assert "sql-injection" in out.out and "pii-in-output" in out.out
    assert "3 alerts" in out.err
    assert 0 == main(["alerts", "list", "--log-dir", str(log_dir)])
    assert "" == capsys.readouterr().out
    assert 1 == main(["alerts", "show", "--log-dir", str(log_dir), "nope"])


def test_rules_sigma_converts(capsys: pytest.CaptureFixture[str]) -> None:
    """`rules sigma --backend splunk` prints Splunk searches."""
    assert 0 == main(["rules", "sigma", "--backend", "splunk"])
    assert "input_prompt" in capsys.readouterr().out


def test_bad_rules_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed rules file exits 2 with a message naming it, no traceback."""
    bad = tmp_path / "r.yaml"
    bad.write_text("rules: [{id: x, kind: rate}]")
    (tmp_path / "log" / "writers").mkdir(parents=True)
    assert 2 == main(["rules", "test", str(bad), "--log-dir", str(tmp_path / "log")])
    assert "r.yaml" in capsys.readouterr().err
