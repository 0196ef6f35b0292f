"""``vllm-audit keys`` and ``vllm-audit index`` (which drives the query-store projection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.access.conftest import sample_entries, write_log
from tests.helpers import read_entries
from vllm_audit.access.apikeys import KeyStore
from vllm_audit.access.store import RecordQuery, Viewer, open_store
from vllm_audit.cli import main
from vllm_audit.config import load_config


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    p = tmp_path / "audit.toml"
    p.write_text(
        f'[log]\ndir = "{tmp_path / "log"}"\n[access]\nauth = "api_key"\n[access.api_keys]\nfile = "keys.json"\n'
    )
    return p


def test_keys_add_list_revoke(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "keys",
                "add",
                "--config",
                str(conf),
                "--user",
                "alice",
                "--org",
                "acme",
                "--role",
                "org_auditor",
                "--json",
            ]
        )
        == 0
    )
    issued = json.loads(capsys.readouterr().out)
    keyfile = conf.parent / "keys.json"  # relative to the config file
    assert issued["key"] not in keyfile.read_text()
    assert KeyStore(keyfile).verify(issued["key"]).roles == ("org_auditor",)
    assert main(["keys", "list", "--config", str(conf)]) == 0
    assert issued["key_id"] in capsys.readouterr().out
    assert main(["keys", "revoke", "--config", str(conf), issued["key_id"]]) == 0
    assert KeyStore(keyfile).verify(issued["key"]).failure_reason == "revoked API key"
    assert main(["keys", "revoke", "--config", str(conf), "000000000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no key with id" in err
    events = [e["event"] for e in read_entries(conf.parent / "log") if e.get("event", "").startswith("key_")]
    assert events == ["key_added", "key_revoked"]


def test_keys_without_key_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[access]\n")
    assert main(["keys", "list", "--config", str(p)]) == 2
    assert "[access.api_keys] file" in capsys.readouterr().err


def test_index_and_rebuild(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(conf.parent / "log", sample_entries())
    assert main(["index", "--config", str(conf)]) == 0
    assert main(["index", "--config", str(conf), "--rebuild"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    store = open_store(load_config(conf))
    recs, _ = store.query(Viewer("platform_admin", "p", "root"), RecordQuery(limit=100))
    assert len(recs) == 9


def test_index_stands_back_while_another_process_runs_the_projection(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the projection running elsewhere (its lock held), ``index`` changes nothing and says why."""
    from vllm_audit.ship.base import ProcessLock

    write_log(conf.parent / "log", sample_entries())
    lock = ProcessLock(conf.parent / "log" / "ship" / "query_store.lock")
    assert lock.try_acquire()
    try:
        assert main(["index", "--config", str(conf), "--rebuild"]) == 2
        assert "another process" in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["index", "--config", str(conf)]) == 0
    assert "updated the query store" in capsys.readouterr().out
