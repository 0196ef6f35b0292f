"""The access projections on the lead's runner, against real PostgreSQL and a real Redis.

The query store resumes from its cursor after ``kill -9`` mid-batch (nothing lost, nothing twice);
quota charging never charges twice on replay and is charged by the recorded quota subject (not
by redactable fields); a paused Redis does not hold up the writer's group commit, and the charge
catches up once Redis is back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.access.conftest import inference, write_log
from vllm_audit.access.identity import Identity
from vllm_audit.access.projection import QuotaProjection, build_projections
from vllm_audit.access.quota import Quota, local_table
from vllm_audit.config import Config, load_config
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.base import Context, CursorFile, Quarantine, Status

CAROL = Identity("carol", "globex", ("user",), "authenticated", "jwt")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def charged(ident: Identity, total: int, *, user_id: str | None = None) -> dict[str, Any]:
    """An inference entry as the edge records it: a quota subject from the raw identity, and a
    ``user_id`` as the privacy policy left it."""
    rec = inference(secrets.token_hex(4), ident.org_id, user_id or ident.user_id, ts=now_iso(), total=total)
    rec["quota_subject"] = ident.quota_subject
    return rec


def quota_config(tmp_path: Path, redis_url: str = "", **quota: Any) -> Config:
    q: dict[str, Any] = {"redis_prefix": f"vat-qp:{secrets.token_hex(4)}", "per_user": {"tokens_per_min": 100}}
    if redis_url:
        q["redis_url"] = redis_url
    q.update(quota)
    return load_config(
        None,
        {
            "log": {"dir": str(tmp_path / "log")},
            "ship": {"state_dir": str(tmp_path / "ship")},
            "access": {"api": {"enabled": False}, "quota": q},
        },
    )


def entries_of(log_dir: Path) -> dict[str, list[Any]]:
    reader = LogReader(log_dir, limit="all")
    return {w: list(reader.entries(w)) for w in reader.writer_ids()}


def ctx(tmp_path: Path) -> Context:
    return Context(Quarantine(tmp_path / "q.jsonl"), Status("quota", "quota"))


@pytest.fixture(params=["memory", "redis"])
def redis_or_not(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


async def test_charged_by_recorded_subject_not_by_redacted_fields(tmp_path: Path, redis_or_not: str) -> None:
    """A policy that drops ``user_id`` does not change who is charged: the charge lands on the counter
    the check reads, so carol's next call is refused once her tokens are spent."""
    config = quota_config(tmp_path, redis_or_not)
    write_log(Path(config.log.dir), [charged(CAROL, 60, user_id="<dropped>"), charged(CAROL, 50, user_id="<dropped>")])
    [proj] = build_projections(config)
    assert isinstance(proj, QuotaProjection)
    quota = Quota(config.access.quota)
    try:
        assert await quota.check(CAROL, "/v1/chat/completions") is None
        proj.open()
        for wid, entries in entries_of(Path(config.log.dir)).items():
            proj.apply(wid, entries, ctx(tmp_path))
        assert await quota.check(CAROL, "/v1/chat/completions") is not None  # 110 >= 100
        other = Identity("carol", "acme", ("user",), "authenticated", "jwt")  # same user id, other org
        assert await quota.check(other, "/v1/chat/completions") is None
    finally:
        proj.close()
        await quota.aclose()


def test_replay_never_double_charges(tmp_path: Path, redis_url: str) -> None:
    """Applying a batch again (a crash after the charge, before anything else noticed) charges nothing:
    the cursor moved in the same Lua script as the counters; a batch overlapping the cursor charges
    only what is new."""
    import redis

    config = quota_config(tmp_path, redis_url, per_user={"tokens_per_min": 10_000})
    write_log(Path(config.log.dir), [charged(CAROL, 7) for _ in range(5)])
    [(wid, entries)] = entries_of(Path(config.log.dir)).items()
    key = Quota(config.access.quota).token_keys({"quota_subject": CAROL.quota_subject})[0]
    r = redis.Redis.from_url(redis_url)
    for attempt in range(3):  # the first run, then two replays by fresh processes
        proj = QuotaProjection(config.access.quota, CursorFile(tmp_path / "unused.json"))
        proj.open()
        proj.apply(wid, entries[: 4 if attempt == 0 else len(entries)], ctx(tmp_path))
        cursors = proj.load_cursors()
        proj.close()
    assert int(r.get(key) or 0) == 35
    assert cursors[wid] == Cursor(wid, entries[-1].seq + 1, entries[-1].leaf_hex)
    r.close()


def test_charges_off_the_writer_while_redis_is_paused(tmp_path: Path, redis_url: str) -> None:
    """With Redis paused for writes (CLIENT PAUSE on the real server), the writer keeps committing
    group after group durably (each awaited in turn) while not one token is charged; after UNPAUSE
    the quota projection catches up with every record."""
    import redis

    config = quota_config(tmp_path, redis_url, per_user={"tokens_per_min": 1_000_000})
    key = Quota(config.access.quota).token_keys({"quota_subject": CAROL.quota_subject})[0]
    r = redis.Redis.from_url(redis_url, socket_timeout=30)
    from vllm_audit.writer import AuditWriter

    writer = AuditWriter(config)
    writer.start()
    n = 20
    try:
        r.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # type: ignore[no-untyped-call]
        try:

            async def commit_all() -> None:
                for _ in range(n):
                    fut = writer.submit(charged(CAROL, 3), wait=True)
                    assert fut is not None
                    await asyncio.wait_for(fut, 20)  # one batch each: twenty group commits in a row

            asyncio.run(commit_all())
            assert writer.failure is None
            assert int(r.get(key) or 0) == 0  # reads still work: nothing was charged during the pause
        finally:
            r.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        while int(r.get(key) or 0) < 3 * n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(r.get(key) or 0) == 3 * n
    finally:
        writer.stop()
        r.close()


def test_local_counters_are_shared_with_the_check(tmp_path: Path) -> None:
    """Without Redis the projection charges this process's counters, the ones the check reads."""
    config = quota_config(tmp_path)
    write_log(Path(config.log.dir), [charged(CAROL, 11)])
    [proj] = build_projections(config)
    proj.open()
    for wid, entries in entries_of(Path(config.log.dir)).items():
        proj.apply(wid, entries, ctx(tmp_path))
    key = Quota(config.access.quota).token_keys({"quota_subject": CAROL.quota_subject})[0]
    assert local_table(config.access.quota).value(key) == 11


def test_store_projection_resumes_after_kill_9(tmp_path: Path, pg_dsn: str, pg_names: dict[str, str]) -> None:
    """``vllm-audit index`` killed with SIGKILL in the middle of projecting into PostgreSQL, then run
    again: every inference record is in the store exactly once and the cursor is at the log's end."""
    import psycopg

    log_dir = tmp_path / "log"
    n = 1500
    write_log(log_dir, [inference(f"k-{i}", "acme", "alice", total=1) for i in range(n)])
    conf = tmp_path / "audit.toml"
    conf.write_text(
        f'[log]\ndir = "{log_dir}"\n[ship]\nbatch_max = 10\n[access.store]\nkind = "postgresql"\n'
        f'dsn = "{pg_dsn}"\ntable_prefix = "{pg_names["prefix"]}"\nreader_role = "{pg_names["role"]}"\n'
    )
    cmd = [sys.executable, "-m", "vllm_audit.cli", "index", "--config", str(conf)]
    cursors = f"{pg_names['prefix']}_cursors"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = 0
    deadline = time.monotonic() + 60
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                row = conn.execute(f"SELECT COALESCE(MAX(next_seq), 0) FROM {cursors}").fetchone()
            except psycopg.errors.UndefinedTable:
                continue
            seen = int(row[0]) if row else 0
            if seen > 100:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, "the indexer finished before it could be killed mid-way"
    assert 0 < seen < n
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = f"{pg_names['prefix']}_records"
    with psycopg.connect(pg_dsn) as conn:
        total, distinct_pos, distinct_rid = conn.execute(
            f"SELECT count(*), count(DISTINCT (writer_id, seq)), count(DISTINCT request_id) FROM {table}"
        ).fetchone() or (0, 0, 0)
        [(next_seq,)] = conn.execute(f"SELECT next_seq FROM {cursors}").fetchall()
    assert (total, distinct_pos, distinct_rid) == (n, n, n)
    end = LogReader(log_dir).signed_size(next(iter(entries_of(log_dir))))
    assert next_seq == end
