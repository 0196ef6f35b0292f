"""Shared helpers for the collector tests: a private nats-server with JetStream, a PostgreSQL
schema per test, real logs written through the real Chain and shipped by the real nats sink."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_service
from tests.helpers import free_port

PG_DSN = os.environ.get("VLLM_AUDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsServer:
    """One nats-server with JetStream (optionally one node of a cluster) on its own ports and store."""

    def __init__(
        self, root: Path, name: str = "n1", cluster: list[int] | None = None, cport: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.root = root
        self.name = name
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.conf = root / f"{name}.conf"
        store = root / f"js-{name}"
        text = f'server_name: {name}\nport: {self.port}\nhost: "{host}"\njetstream {{ store_dir: "{store}" }}\n'
        if cluster is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster if p != cport)
            text += f'cluster {{ name: vat\n  host: "127.0.0.1"\n  port: {cport}\n  routes: [{routes}] }}\n'
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        logf = open(self.root / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([NATS_BINARY, "-c", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        wait_until(lambda: _listening(self.port), f"nats-server {self.name} listening", 20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    need_service(os.access(NATS_BINARY, os.X_OK), f"nats-server binary ({NATS_BINARY}; Debian package nats-server)")
    root = tmp_path / "nats"
    root.mkdir()
    s = NatsServer(root)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _pg_ok() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


@pytest.fixture
def pg_prefix() -> Iterator[str]:
    """A unique table prefix (and reader role) for one test, dropped afterwards."""
    need_service(_pg_ok(), f"PostgreSQL at {PG_DSN}")
    import psycopg

    prefix = f"vac_{secrets.token_hex(4)}"
    yield prefix
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for t in ("records", "cursors", "viewers", "db_tenants", "collect_chains", "collect_alerts"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{t}")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_viewer()")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_act_as(TEXT, TEXT, TEXT)")
        conn.execute(f"DROP ROLE IF EXISTS {prefix}_reader")


def collect_toml(
    prefix: str,
    servers: list[str],
    *,
    stream: str,
    subject_prefix: str,
    keys: list[Path],
    log_dir: Path,
    archive: Path | None = None,
    durable: str = "collect",
    extra: str = "",
    nats_extra: str = "",
    dsn: str = PG_DSN,
) -> str:
    """A collector's configuration file (``extra``: more ``[collect]`` keys, ``nats_extra``: more
    ``[collect.nats]`` keys)."""
    srv = ", ".join(f'"{s}"' for s in servers)
    key_list = ", ".join(f'"{k}"' for k in keys)
    return (
        f'[log]\ndir = "{log_dir}"\n'
        f'[access.store]\nkind = "postgresql"\ndsn = "{dsn}"\ntable_prefix = "{prefix}"\n'
        f'reader_role = "{prefix}_reader"\n'
        f"[collect]\npublic_keys = [{key_list}]\n"
        + (f'archive_dir = "{archive}"\n' if archive else "")
        + extra
        + f'[collect.nats]\nservers = [{srv}]\nstream = "{stream}"\nsubject_prefix = "{subject_prefix}"\n'
        f'durable = "{durable}"\n' + nats_extra
    )


def publish(url: str, stream: str, subject_prefix: str, msgs: list[tuple[str, int, bytes]], replicas: int = 1) -> None:
    """Publish ``(writer_id, seq, line)`` with the nats sink's headers (for hand-made failures)."""
    import nats
    from nats.js.api import StreamConfig

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            await js.stream_info(stream)
        except Exception:
            await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject_prefix}.>"], num_replicas=replicas))
        for wid, seq, line in msgs:
            await js.publish(
                f"{subject_prefix}.{wid}",
                line,
                headers={
                    "Nats-Msg-Id": f"{wid}:{seq}",
                    "Vllm-Audit-Writer-Id": wid,
                    "Vllm-Audit-Seq": str(seq),
                },
            )
        await nc.close()

    asyncio.run(go())


def pg_rows(prefix: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return list(conn.execute(sql.replace("{p}", prefix), params).fetchall())
