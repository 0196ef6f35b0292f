from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from vllm_audit import cli
from vllm_audit.config import Config
from vllm_audit.writer import append_events

from .conftest import record

PROMPT = "身份证11010519491231002X，手机13812345678"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(
        f'[log]\ndir = "{tmp_path / "log"}"\n[privacy]\nkey_file = "keys/master.json"\n'
        f'[privacy.default.fields.input_prompt]\nmode = "encrypt"\n{extra}'
    )
    return path


def log_entries(tmp_path: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted((tmp_path / "log").glob("writers/*/seg-*.jsonl")):
        out += [orjson.loads(line) for line in seg.read_bytes().splitlines() if line.strip()]
    return out


def seed_record(tmp_path: Path, conf: Path) -> None:
    from vllm_audit.config import load_config
    from vllm_audit.privacy import build_redactor

    config = load_config(conf)
    rec = build_redactor(config)(record(request_id="req-42", input_prompt=PROMPT))
    append_events(config, [dict(rec, record_type="inference")])


def test_keygen_erase_decrypt_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen, decrypt (audited), erase (audited), then decrypt fails with exit code 2."""
    conf = write_config(tmp_path)
    assert cli.main(["privacy-keygen", "--config", str(conf)]) == 0
    assert (tmp_path / "keys" / "master.json").stat().st_mode & 0o777 == 0o600
    seed_record(tmp_path, conf)
    capsys.readouterr()
    assert cli.main(["decrypt", "--config", str(conf), "--request-id", "req-42", "--auditor", "carol"]) == 0
    assert capsys.readouterr().out.strip() == PROMPT
    assert cli.main(["erase", "--config", str(conf), "--org", "acme", "--reason", "GDPR art. 17"]) == 0
    assert cli.main(["decrypt", "--config", str(conf), "--request-id", "req-42"]) == 2
    assert "erased" in capsys.readouterr().err
    events = [e for e in log_entries(tmp_path) if e.get("event", "").startswith("privacy.")]
    assert [(e["event"], e["detail"].get("outcome")) for e in events] == [
        ("privacy.decrypt", "ok"),
        ("privacy.erase", None),
        ("privacy.decrypt", "erased"),
    ]
    assert events[0]["detail"]["auditor"] == "carol"
    assert PROMPT.encode() not in b"".join(p.read_bytes() for p in (tmp_path / "log").rglob("*") if p.is_file())


def test_group_readable_key_file_is_refused_by_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI refuses a key file readable by group or others with one line and exit code 2."""
    conf = write_config(tmp_path)
    assert cli.main(["privacy-keygen", "--config", str(conf)]) == 0
    (tmp_path / "keys" / "master.json").chmod(0o644)
    assert cli.main(["erase", "--config", str(conf), "--org", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chmod 600" in err


def test_redact_command_filters_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`vllm-audit redact` reads stdin and writes the tagged text."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("mail bob@example.com"))
    assert cli.main(["redact"]) == 0
    assert capsys.readouterr().out == "mail <EMAIL>"


def test_config_fixture_builds(make_config: Callable[..., Config]) -> None:
    """The shared fixture builds a config with a key file."""
    assert make_config().privacy.key_file
