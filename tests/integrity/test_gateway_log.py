"""The verifier on logs written by the real gateway (`vllm-audit serve`) under concurrent load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import gateway
from vllm_audit.integrity.keys import load_signing_key, write_keypair

from ._logtools import cli, copy_log, read_lines, rechain, write_lines

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello audit"}], "max_tokens": 8}


def config(base: Path) -> str:
    return (
        "[integrity]\n"
        f'signing_key = "{base / "k.key"}"\n'
        f'anchors = ["{base / "anchor"}"]\n'
        "checkpoint_every_records = 40\n"
        "segment_max_bytes = 65536\n"
    )


async def load(base_url: str, n: int, prefix: str, concurrency: int = 24) -> int:
    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal ok
        async with sem:
            payload = {**CHAT, "stream": bool(i % 2)}
            try:
                async with s.post(
                    base_url + "/v1/chat/completions",
                    data=orjson.dumps(payload),
                    headers={"x-request-id": f"{prefix}-{i}", "content-type": "application/json"},
                ) as r:
                    await r.read()
                    ok += r.status == 200
            except aiohttp.ClientError:
                pass

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, i) for i in range(n)))
    return ok


@pytest.fixture(scope="module")
def gwlog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("gw")
    write_keypair(base / "k", "test/gateway")
    (base / "anchor").mkdir()
    with gateway(base, "--workers", "2", config=config(base)) as (url, log_dir, _):
        assert asyncio.run(load(url, 400, "r")) == 400
    return log_dir


@pytest.fixture()
def log(gwlog: Path, tmp_path: Path) -> Path:
    for name in ("k.key", "k.pub"):
        (tmp_path / name).write_bytes((gwlog.parent / name).read_bytes())
    os.chmod(tmp_path / "k.key", 0o600)
    copy_log(gwlog.parent / "anchor", tmp_path / "anchor")
    return copy_log(gwlog, tmp_path / "log")


def run_verify(log: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    r = cli("verify", str(log), "--public-key", str(log.parent / "k.pub"), "--json", *extra)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def record_segment(log: Path) -> tuple[Path, list[bytes], int]:
    """A sealed segment of some writer, and the index of an inference record in it."""
    for seg in sorted(log.glob("writers/*/seg-*.jsonl")):
        lines = read_lines(seg)
        idx = [i for i, ln in enumerate(lines) if b'"record_type":"inference"' in ln]
        if seg.with_name(seg.name.replace(".jsonl", ".manifest.json")).exists() and len(idx) > 5:
            return seg, lines, idx[3]
    raise AssertionError("no sealed segment with records")


def test_gateway_log_verifies(log: Path) -> None:
    """Two gateway workers under load: two writers, every record, intact (exit 0)."""
    code, rep = run_verify(log, "--anchor", str(log.parent / "anchor"))
    assert code == 0, rep["problems"]
    assert rep["summary"]["writers"] == 2 and rep["summary"]["records"] == 400


@pytest.mark.parametrize("attack", ["flip", "delete", "swap"])
def test_gateway_log_tampering(log: Path, attack: str) -> None:
    """Byte flip, deletion and reordering of gateway records are named by the verifier."""
    seg, lines, i = record_segment(log)
    seq = orjson.loads(lines[i])["seq"]
    if attack == "flip":
        lines[i] = lines[i].replace(b"demo-model", b"demo-modem", 1)
        want = ("modified", seq)
    elif attack == "delete":
        del lines[i]
        want = ("missing", seq)
    else:
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        want = ("reordered", seq + 1)
    write_lines(seg, lines)
    code, rep = run_verify(log)
    assert code == 1
    first = rep["problems"][0]
    assert (first["kind"], first["seq"]) == want
    assert first["writer_id"] == seg.parent.name


def test_gateway_log_stolen_key_rewrite_vs_anchor(log: Path) -> None:
    """A rewrite re-signed with the stolen key is caught only with the anchored checkpoints."""
    seg, lines, i = record_segment(log)
    obj = orjson.loads(lines[i])
    obj["user_id"] = "nobody"
    lines[i] = orjson.dumps(obj)
    write_lines(seg, lines)
    # rechain() handles one writer directory at a time: point it at a log dir holding only this writer.
    tmp = log.parent / "one"
    (tmp / "writers").mkdir(parents=True)
    os.rename(seg.parent, tmp / "writers" / seg.parent.name)
    rechain(tmp, key=load_signing_key(log.parent / "k.key"))
    os.rename(tmp / "writers" / seg.parent.name, seg.parent)
    assert run_verify(log)[0] == 0
    code, rep = run_verify(log, "--anchor", str(log.parent / "anchor"))
    assert code == 1 and rep["problems"][0]["kind"] == "anchor_mismatch"


def test_gateway_record_proof(log: Path, tmp_path: Path) -> None:
    """The proof of one gateway record verifies alone and fails once the record is changed."""
    out = tmp_path / "p.json"
    assert cli("prove", "r-123", "--log-dir", str(log), "--out", str(out)).returncode == 0
    pub = str(log.parent / "k.pub")
    assert cli("verify-proof", str(out), "--public-key", pub).returncode == 0
    doc = json.loads(out.read_text())
    doc["record"] = doc["record"].replace('"r-123"', '"r-124"')
    out.write_text(json.dumps(doc))
    assert cli("verify-proof", str(out), "--public-key", pub).returncode == 1


def test_gateway_kill_9_and_restart_still_verifies(tmp_path: Path) -> None:
    """SIGKILL mid-load, restart, more load, clean stop: the log verifies (recovery explained)."""
    write_keypair(tmp_path / "k", "test/gateway")
    (tmp_path / "anchor").mkdir()

    async def load_then_kill(url: str, proc: object) -> None:
        async def killer() -> None:
            # Mid-load: once a few hundred KB of records are on disk, whatever the machine's speed.
            while sum(p.stat().st_size for p in log_dir.glob("writers/*/seg-*.jsonl")) < 300_000:
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]

        await asyncio.gather(killer(), load(url, 3000, "k"))

    with gateway(tmp_path, config=config(tmp_path)) as (url, log_dir, proc):
        asyncio.run(load_then_kill(url, proc))
        proc.wait()
    with gateway(tmp_path, config=config(tmp_path), log_dir=log_dir) as (url, _, _):
        asyncio.run(load(url, 50, "after"))
    r = cli("verify", str(log_dir), "--public-key", str(tmp_path / "k.pub"), "--anchor", str(tmp_path / "anchor"))
    assert r.returncode == 0, r.stdout + r.stderr
