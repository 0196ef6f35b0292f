"""The middleware in ``vllm serve --api-server-count 2``: two API processes, two writers, one log.

Every API process has its own middleware instance and so its own writer chain under
``LOGDIR/writers/<writer_id>/``. Under a few hundred concurrent requests no record may be lost or
duplicated: every request id sent appears exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vllmtest_support import chat_body, completion_body, harness, log_entries, records, verify_log, write_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_REQUESTS = 300
CONCURRENCY = 100


@dataclasses.dataclass
class MultiServer:
    srv: harness.Server
    log_dir: Path
    config: Path


@pytest.fixture(scope="module")
def multi(vllm_setup: harness.Setup, start_server: Any, module_dir: Path, integrity: Any) -> MultiServer:
    log_dir = module_dir / "audit-log"
    config = write_config(module_dir / "audit.toml", log_dir, integrity.config_toml)
    srv = start_server(
        harness.start_vllm,
        vllm_setup,
        module_dir / "vllm-multi.log",
        extra_args=["--middleware", "vllm_audit.AuditMiddleware", "--api-server-count", "2"],
        env={"VLLM_AUDIT_CONFIG": str(config)},
        timeout_s=300,
    )
    return MultiServer(srv=srv, log_dir=log_dir, config=config)


async def _one(
    session: aiohttp.ClientSession, url: str, i: int, rid: str, sem: asyncio.Semaphore
) -> tuple[str, int, str]:
    kind = ("chat", "completions")[i % 2]
    stream = i % 3 == 0
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    if kind == "chat":
        body = chat_body(f"request number {i}", max_tokens=4)
    else:
        body = completion_body(f"# {i}\n", max_tokens=4)
    if stream:
        body["stream"] = True
    async with sem, session.post(url + path, json=body, headers={"X-Request-Id": rid}) as r:
        raw = await r.read()
        return rid, r.status, raw.decode(errors="replace")[-200:]


async def _fire(url: str, rids: list[str]) -> list[tuple[str, int, str]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    # A new connection per request: the two API processes share one listening socket, and the
    # kernel hands each new connection to whichever process accepts first.
    conn = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        return await asyncio.gather(*(_one(s, url, i, rid, sem) for i, rid in enumerate(rids)))


def test_concurrent_requests_exactly_once(multi: MultiServer) -> None:
    # Two API server processes (children of the launcher) must be running.
    rids = [f"mp-{i:04d}-{uuid.uuid4().hex[:8]}" for i in range(N_REQUESTS)]
    results = asyncio.run(_fire(multi.srv.url, rids))
    bad = [(rid, st, tail) for rid, st, tail in results if st != 200]
    assert not bad, f"{len(bad)} requests failed, e.g. {bad[:3]}"

    counts = collections.Counter(r.get("request_id") for r in records(multi.log_dir))
    sent = set(rids)
    missing = sorted(sent - set(counts))
    dup = {rid: n for rid, n in counts.items() if rid in sent and n > 1}
    assert not missing, f"{len(missing)} of {N_REQUESTS} requests have no record, e.g. {missing[:5]}"
    assert not dup, f"duplicated records: {dict(list(dup.items())[:5])}"

    # Two API processes -> two chains in the one directory, each started by its own process.
    dirs = sorted(p.name for p in (multi.log_dir / "writers").iterdir() if p.is_dir())
    assert len(dirs) == 2, f"expected two writer chains (one per API process), got {dirs}"
    writers = collections.Counter(r["writer_id"] for r in records(multi.log_dir) if r.get("request_id") in sent)
    assert set(writers) <= set(dirs), (dirs, writers)
    if len(writers) < 2:
        # The kernel gave every connection of the burst to one process (possible on a loaded
        # 2-core box). Fresh connections one by one until the other process answers one.
        for i in range(100):
            rid = f"mp-extra-{i:03d}-{uuid.uuid4().hex[:8]}"
            st = asyncio.run(_fire(multi.srv.url, [rid]))[0][1]
            assert st == 200
            rec = [r for r in records(multi.log_dir) if r.get("request_id") == rid]
            assert len(rec) == 1, rid
            writers[rec[0]["writer_id"]] += 1
            if len(writers) == 2:
                break
    assert len(writers) == 2, f"every request was recorded by one writer: {dict(writers)}"


def test_each_writer_chain_is_contiguous(multi: MultiServer) -> None:
    by_writer: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in log_entries(multi.log_dir):
        by_writer[e["writer_id"]].append(e)
    assert len(by_writer) >= 2, list(by_writer)
    for wid, entries in by_writer.items():
        seqs = [e["seq"] for e in entries]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"writer {wid}: seq not contiguous"
        assert seqs[0] == 0, f"writer {wid}: chain does not start at 0"


def test_log_verifies(multi: MultiServer, vllm_setup: harness.Setup, integrity: Any) -> None:
    verify_log(vllm_setup, integrity, multi.log_dir)


def test_records_are_json_lines(multi: MultiServer) -> None:
    for seg in multi.log_dir.glob("writers/*/seg-*.jsonl"):
        data = seg.read_bytes()
        assert data.endswith(b"\n"), seg
        for line in data.splitlines():
            json.loads(line)
