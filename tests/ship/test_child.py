"""Sinks in a child process of the gateway ([ship] isolation): records arrive, a dead child is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson

from tests.helpers import gateway

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello shipper"}], "max_tokens": 4}


def _lines(out: Path) -> list[dict[str, object]]:
    rows = []
    for f in sorted(out.glob("*.jsonl")):
        rows += [orjson.loads(line) for line in f.read_bytes().splitlines() if line]
    return rows


def _wait(cond: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_sinks_run_in_a_supervised_child_process(tmp_path: Path) -> None:
    out = tmp_path / "file-out"
    cfg = f'[sinks.file]\ntype = "file"\ndirectory = "{out}"\nformat = "stored"\n'

    async def load(base: str, prefix: str, n: int) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                async with s.post(
                    base + "/v1/chat/completions", json=CHAT, headers={"x-request-id": f"{prefix}{i}"}
                ) as r:
                    await r.read()
                    assert r.status == 200

    with gateway(tmp_path, config=cfg) as (base, _log, proc):
        asyncio.run(load(base, "a", 20))
        _wait(lambda: {f"a{i}" for i in range(20)} <= {str(r.get("request_id")) for r in _lines(out)})
        (child,) = [
            c for c in _children(proc.pid) if b"vllm_audit.ship.child" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        os.kill(child, signal.SIGKILL)  # the shipper dies: the gateway keeps answering, a new one takes over
        asyncio.run(load(base, "b", 20))
        _wait(lambda: {f"b{i}" for i in range(20)} <= {str(r.get("request_id")) for r in _lines(out)})
        ids = [str(r.get("request_id")) for r in _lines(out) if r.get("record_type") == "inference"]
        assert len(ids) == len(set(ids)) == 40  # the file sink is exactly-once across the restart
