"""A running gateway (subprocess) over real PostgreSQL, five signed-up people, and Debian's Chromium.

People: ``alice`` and ``bob`` (users of org ``acme``), ``carol`` (user of ``globex``), ``dave``
(tenant auditor of ``acme``) and ``erin`` (platform admin). Each of the three users makes calls
through the gateway; one alert of ``acme`` and one of ``globex`` are appended to the log.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import need_service

PG_DSN = os.environ.get("VLLM_AUDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CHROMIUM = os.environ.get("VLLM_AUDIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = "demo-model"


@dataclasses.dataclass
class Person:
    name: str
    org: str
    roles: tuple[str, ...]
    key: str = ""


@dataclasses.dataclass
class Gateway:
    url: str
    base: str  # the console's URL
    dir: Path
    config: Path
    people: dict[str, Person]
    records: dict[str, list[dict[str, Any]]]  # user -> their records (from the audit API)
    alerts: dict[str, str]  # org -> alert id
    proc: subprocess.Popen[bytes]
    pg_prefix: str

    def api(self, who: str, path: str, **params: str) -> Any:
        r = httpx.get(
            f"{self.url}/audit/v1/{path}",
            params=params,
            headers={"authorization": f"Bearer {self.people[who].key}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    def events(self, **match: Any) -> list[dict[str, Any]]:
        """Every event entry in the log (all writers, complete lines) whose fields equal ``match``."""
        from vllm_audit.integrity.reader import LogReader

        reader = LogReader(self.dir / "log", limit="all")
        out = []
        for wid in reader.writer_ids():
            for entry in reader.entries(wid):
                if entry.record_type != "event":
                    continue
                e = entry.record()
                if all(e.get(k) == v for k, v in match.items()):
                    out.append(e)
        return out


def _pg_ok() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Any, what: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as exc:  # not ready yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)  # polling a condition with a deadline
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def write_config(d: Path, prefix: str, role: str, port: int) -> Path:
    cfg = d / "vllm-audit.toml"
    cfg.write_text(
        f"""
[log]
dir = "{d / "log"}"

[integrity]
checkpoint_every_records = 1
checkpoint_every_seconds = 0.2
heartbeat_seconds = 0.5

[gateway]
port = {port}

[access]
auth = "api_key"

[access.api_keys]
file = "keys.json"

[access.store]
kind = "postgresql"
dsn = "{PG_DSN}"
table_prefix = "{prefix}"
reader_role = "{role}"
read_wait_s = 5.0
"""
    )
    return cfg


def drop_pg(prefix: str, role: str) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for t in ("records", "cursors", "viewers", "db_tenants"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{t}")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_viewer()")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_act_as(TEXT, TEXT, TEXT)")
        conn.execute(f"DROP ROLE IF EXISTS {role}")


PEOPLE = {
    "alice": Person("alice", "acme", ()),
    "bob": Person("bob", "acme", ()),
    "carol": Person("carol", "globex", ()),
    "dave": Person("dave", "acme", ("org_auditor",)),
    "erin": Person("erin", "platform", ("platform_admin",)),
}


def _alert(org: str, triggers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "record_type": "alert",
        "schema_version": 1,
        "alert_id": f"al_{org}_{secrets.token_hex(4)}",
        "rule": {"id": "burst_of_calls", "name": "burst_of_calls", "kind": "rate", "description": "many calls"},
        "severity": "high",
        "reason": f"3 records in 60s for one user_id of {org} (threshold 2)",
        "org_id": org,
        "group_by": "user_id",
        "group_value": triggers[0]["user_id"] if triggers else "",
        "value": 3,
        "count": len(triggers),
        "window_start": "2026-01-01T00:00:00+00:00",
        "window_s": 60,
        "triggers": [
            {
                "writer_id": t["writer_id"],
                "seq": t["seq"],
                "record_id": t.get("record_id"),
                "request_id": t["request_id"],
            }
            for t in triggers
        ],
        "detector": "test",
    }


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    need_service(_pg_ok(), f"PostgreSQL at {PG_DSN}")
    from vllm_audit.access.apikeys import KeyStore
    from vllm_audit.config import load_config
    from vllm_audit.writer import append_events

    d = tmp_path_factory.mktemp("console")
    tag = secrets.token_hex(4)
    prefix, role = f"vac_{tag}", f"vac_reader_{tag}"
    port = _free_port()
    cfg = write_config(d, prefix, role, port)
    ks = KeyStore(d / "keys.json")
    people = {n: dataclasses.replace(p) for n, p in PEOPLE.items()}
    for p in people.values():
        p.key, _ = ks.add(p.name, p.org, p.roles, None, f"console test {p.name}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(d / "gateway.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_audit.cli", "serve", "--config", str(cfg)],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, "the gateway to start")
        prompts = {
            "alice": ["hello from alice, mail me at alice@example.com", "second question from alice"],
            "bob": ["bob asks something"],
            "carol": ["carol at globex, phone +1 415 555 0100"],
        }
        for who, texts in prompts.items():
            for text in texts:
                r = httpx.post(
                    url + "/v1/chat/completions",
                    json={"model": DEMO_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8},
                    headers={"authorization": f"Bearer {people[who].key}"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
        g = Gateway(url, url + "/audit/console", d, cfg, people, {}, {}, proc, prefix)

        def all_in() -> bool:
            recs = g.api("erin", "records", limit="100")["records"]
            return sum(1 for r in recs if r.get("route") == "/v1/chat/completions") >= 4

        wait_for(all_in, "the records to reach the query store")
        for who in prompts:
            g.records[who] = g.api(who, "records", limit="100")["records"]
        config = load_config(cfg)
        for org, who in (("acme", "alice"), ("globex", "carol")):
            alert = _alert(org, g.records[who])
            append_events(config, [alert])
            g.alerts[org] = alert["alert_id"]
        yield g
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        drop_pg(prefix, role)


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One Chromium for the console tests. Package-scoped, not session-scoped: Playwright's sync API
    keeps an event loop marked running in this thread while it lives, which would break every
    later test that calls ``asyncio.run``."""
    need_service(Path(CHROMIUM).is_file(), f"Chromium at {CHROMIUM} (scripts/services.d/chromium.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_service(False, "the playwright package (pip install -e '.[test]')")
        raise
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
