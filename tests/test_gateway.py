"""The real gateway (`vllm-audit serve` subprocess) over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson

from tests.helpers import free_port, gateway, read_entries, read_records, verify_log
from vllm_audit.record import json_schema

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello gateway"}], "max_tokens": 6}


async def post(session: aiohttp.ClientSession, url: str, payload: Any, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with session.post(
        url, data=data, headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def test_demo_gateway_records_every_kind_of_call(tmp_path: Path) -> None:
    """Chat (stream and not), a bad request, a disconnect: each leaves a schema-valid record."""

    async def scenario(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            st, hdr, body = await post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": "gw-plain"})
            assert 200 == st and "gw-plain" == hdr["x-request-id"]
            st, _, body = await post(
                s, base + "/v1/chat/completions", {**CHAT, "stream": True}, headers={"x-request-id": "gw-stream"}
            )
            assert body.endswith(b"data: [DONE]\n\n") and b'"usage"' not in body
            st, _, body = await post(
                s,
                base + "/v1/chat/completions",
                b'{"model": "demo-model", "messages": [',
                headers={"x-request-id": "gw-bad"},
            )
            assert 400 == st and orjson.loads(body)["error"]["message"].startswith("Invalid JSON")
            # a disconnect mid-stream: read the first event, then drop the connection
            hang = {
                "model": "demo-model",
                "messages": [{"role": "user", "content": "wait [[demo:hang]] here"}],
                "max_tokens": 8,
                "stream": True,
            }
            async with s.post(
                base + "/v1/chat/completions", data=orjson.dumps(hang), headers={"x-request-id": "gw-gone"}
            ) as r:
                await r.content.readuntil(b"\n\n")
                r.close()
            await asyncio.sleep(0.5)

    with gateway(tmp_path) as (base, log_dir, proc):
        asyncio.run(scenario(base))
    recs = {r["request_id"]: r for r in read_records(log_dir)}
    assert {"gw-plain", "gw-stream", "gw-bad", "gw-gone"} <= set(recs)
    assert "ok" == recs["gw-plain"]["status"] and recs["gw-plain"]["total_tokens"]
    assert recs["gw-stream"]["stream"] and recs["gw-stream"]["completion_tokens"] == 6
    assert ("client_error", 400) == (recs["gw-bad"]["status"], recs["gw-bad"]["http_status"])
    assert "cancelled" == recs["gw-gone"]["status"]
    assert recs["gw-gone"]["output_response"].startswith("You")
    schema = json_schema()
    for rec in recs.values():
        jsonschema.validate(rec, schema)
        for key in ("timestamp", "client_ip", "request_id", "user_id", "org_id", "auth_status", "status", "latency_ms"):
            assert rec[key] is not None, key


def test_gateway_upstream_failures_are_recorded(tmp_path: Path) -> None:
    """Refused connection -> 502, timeout -> 504, upstream 500 passed on; each recorded."""
    dead = free_port()

    async def scenario(base: str) -> list[int]:
        async with aiohttp.ClientSession() as s:
            st1, _, b1 = await post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": "refused"})
            assert "upstream_unreachable" == orjson.loads(b1)["error"]["code"]
            return [st1]

    with gateway(tmp_path, "--upstream", f"http://127.0.0.1:{dead}") as (base, log_dir, _):
        assert [502] == asyncio.run(scenario(base))
    (rec,) = read_records(log_dir)
    assert ("upstream_error", 502, "upstream_unreachable") == (rec["status"], rec["http_status"], rec["error_type"])

    # a demo upstream that hangs, behind a gateway with a short read timeout
    up_port = free_port()
    with gateway(tmp_path, port=up_port, log_dir=tmp_path / "uplog") as (up, _, _):
        cfg = "[gateway]\nread_timeout_s = 0.5\n"

        async def slow(base: str) -> tuple[int, int]:
            async with aiohttp.ClientSession() as s:
                st, _, _ = await post(
                    s,
                    base + "/v1/chat/completions",
                    {**CHAT, "messages": [{"role": "user", "content": "[[demo:error]]"}]},
                    headers={"x-request-id": "up500"},
                )
                hang = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "a b c d [[demo:hang]]"}]}
                try:
                    async with s.post(
                        base + "/v1/chat/completions", data=orjson.dumps(hang), headers={"x-request-id": "timeout"}
                    ) as r:
                        await r.read()
                    st2 = r.status
                except aiohttp.ClientPayloadError:
                    st2 = -1  # aborted mid-stream, as it must be
                return st, st2

        with gateway(tmp_path, "--upstream", up, config=cfg, log_dir=tmp_path / "gwlog") as (base, log_dir2, _):
            st, st2 = asyncio.run(slow(base))
    assert 500 == st
    assert -1 == st2
    recs = {r["request_id"]: r for r in read_records(tmp_path / "gwlog")}
    assert ("upstream_error", 500) == (recs["up500"]["status"], recs["up500"]["http_status"])
    assert ("timeout", "upstream_timeout") == (recs["timeout"]["status"], recs["timeout"]["error_type"])


def test_kill_9_under_load_loses_no_record_of_a_completed_response(tmp_path: Path) -> None:
    """Every response a client received in full has its record on disk after a SIGKILL."""
    completed: list[str] = []

    async def load(base: str, proc: Any) -> None:
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            async with aiohttp.ClientSession() as s:
                i = 0
                while not stop.is_set():
                    rid = f"k9-{w}-{i}"
                    i += 1
                    payload = {**CHAT, "stream": bool(i % 2)}
                    try:
                        async with s.post(
                            base + "/v1/chat/completions", data=orjson.dumps(payload), headers={"x-request-id": rid}
                        ) as r:
                            body = await r.read()
                        if r.status == 200 and body.endswith((b"[DONE]\n\n", b"}")):
                            completed.append(rid)
                    except (TimeoutError, aiohttp.ClientError):
                        return

        async def killer() -> None:
            await asyncio.sleep(1.5)
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            stop.set()

        await asyncio.gather(killer(), *(worker(w) for w in range(16)))

    with gateway(tmp_path) as (base, log_dir, proc):
        asyncio.run(load(base, proc))
        proc.wait()
    assert len(completed) > 50, "the load did not get going"
    on_disk = {r["request_id"] for r in read_records(log_dir)}
    missing = [rid for rid in completed if rid not in on_disk]
    assert [] == missing, f"{len(missing)} completed responses have no record"

    # the restarted gateway adopts the chain and keeps going
    with gateway(tmp_path, log_dir=log_dir) as (base, _, _):

        async def one() -> int:
            async with aiohttp.ClientSession() as s:
                st, _, _ = await post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": "after-restart"})
                return st

        assert 200 == asyncio.run(one())
    assert "after-restart" in {r["request_id"] for r in read_records(log_dir)}
    out = verify_log(log_dir)
    assert 0 == out.returncode, out.stdout + out.stderr


def listeners(port: int) -> list[str]:
    """Inodes of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.append(cols[9])
    return found


def test_workers_port_taken_is_a_one_line_error(tmp_path: Path) -> None:
    """--workers 2 on a port another program listens on exits at once, naming the address."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "vllm_audit.cli", "serve", "--workers", "2", "--port", str(port),
             "--log-dir", str(tmp_path / "log")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert 0 != out.returncode
    assert f"cannot bind 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_held_port_takes_no_connection() -> None:
    """The supervisor's socket holds the port without listening: a connection to it is refused
    (the kernel queues nothing on it), and a worker's SO_REUSEPORT socket can join the port."""
    from vllm_audit.gateway import hold_port

    held = hold_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        with socket.socket() as c, contextlib.suppress(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))
            raise AssertionError("a held port accepted a connection")
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            assert [worker_inode(worker)] == listeners(port)
    finally:
        held.close()


def worker_inode(sock: socket.socket) -> str:
    return os.readlink(f"/proc/self/fd/{sock.fileno()}").removeprefix("socket:[").rstrip("]")


def test_two_workers_write_two_chains(tmp_path: Path) -> None:
    """--workers 2 gives two writers in one log directory, with no lost record."""

    async def many(base: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            await asyncio.gather(
                *(post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": f"w-{i}"}) for i in range(200))
            )

    with gateway(tmp_path, "--workers", "2") as (base, log_dir, _):
        port = int(base.rsplit(":", 1)[1])
        # Both workers up: each has claimed its chain and listens on a socket of its own
        # (SO_REUSEPORT), not on one shared socket. The first answers before the second is up
        # (it claims its chain before it listens): polled, with a deadline.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(list(log_dir.glob("writers/*/seg-*.jsonl"))) >= 2 and len(listeners(port)) >= 2:
                break
            time.sleep(0.05)
        assert 2 == len(listeners(port)), "the second worker did not listen within 60 s"
        asyncio.run(many(base))
    recs = read_records(log_dir)
    ids = [r["request_id"] for r in recs]
    assert sorted(ids) == sorted(f"w-{i}" for i in range(200))
    assert 2 == len({e["writer_id"] for e in read_entries(log_dir)})
    out = verify_log(log_dir)
    assert 0 == out.returncode, out.stdout + out.stderr


def test_bad_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    """A config with a wrong value fails at start with exit 2 and names section and key."""

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[log]\ndurability = "sometimes"\n')
    out = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 2 == out.returncode
    assert "[log] durability" in out.stderr and "Traceback" not in out.stderr


def test_access_log_has_ids_and_timings_but_no_content(tmp_path: Path) -> None:
    """With [log] access_log, each call logs id, route, sizes and timings — never prompt or output."""
    from tests.helpers import log_text

    secret = "my-private-words-9f8e7d"

    async def one(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            await post(
                s,
                base + "/v1/chat/completions",
                {**CHAT, "messages": [{"role": "user", "content": secret}]},
                headers={"x-request-id": "acc-1"},
            )

    with gateway(tmp_path, config="[log]\naccess_log = true\n") as (base, _, _):
        asyncio.run(one(base))
    text = log_text(tmp_path)
    assert "acc-1 POST /v1/chat/completions 200" in text
    assert secret not in text


def test_loopback_peer_cannot_spoof_client_ip_without_trust(tmp_path: Path) -> None:
    """A forwarded header from 127.0.0.1 is ignored unless 127.0.0.1 is a configured trusted proxy."""

    async def one(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            await post(
                s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": "spoof", "x-forwarded-for": "6.6.6.6"}
            )

    with gateway(tmp_path) as (base, log_dir, _):
        asyncio.run(one(base))
    (rec,) = [r for r in read_records(log_dir) if r["request_id"] == "spoof"]
    assert ("127.0.0.1", True) == (rec["client_ip"], rec["forwarded_ignored"])


def _small_files() -> None:
    """In the gateway child: files may not grow past 48 KiB (a stand-in for a full disk)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))


def test_write_errors_fail_closed_and_lose_no_answered_record(tmp_path: Path) -> None:
    """When segment writes fail (EFBIG), strict fail_closed answers 503 instead of an unrecorded 200,
    recovers by itself, and every 200 the client got has its record."""
    cfg = "[integrity]\nsegment_max_bytes = 1048576\n"
    statuses: dict[str, int] = {}

    async def load(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(200):
                rid = f"df-{i}"
                st, _, _ = await post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": rid})
                statuses[rid] = st

    with gateway(tmp_path, config=cfg, preexec_fn=_small_files) as (base, log_dir, _):
        asyncio.run(load(base))
    codes = set(statuses.values())
    assert 503 in codes, f"the write limit was never hit: {codes}"
    assert 200 in codes
    recorded = {r["request_id"] for r in read_records(log_dir)}
    answered = [rid for rid, st in statuses.items() if st == 200]
    assert [] == [rid for rid in answered if rid not in recorded]
    out = verify_log(log_dir)
    assert 0 == out.returncode, out.stdout + out.stderr


def test_one_megabyte_header_gets_431_over_a_real_socket(tmp_path: Path) -> None:
    """A 1 MB header through uvicorn reaches the edge, gets an OpenAI-shaped 431 and a record."""

    async def one(base: str) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s:
            st, _, body = await post(
                s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": "big-h", "x-big": "a" * 1_000_000}
            )
            async with s.get(base + "/healthz") as r:
                assert 200 == r.status
            return st, body

    with gateway(tmp_path) as (base, log_dir, _):
        st, body = asyncio.run(one(base))
    assert 431 == st and "request_header_fields_too_large" == orjson.loads(body)["error"]["code"]
    (rec,) = [r for r in read_records(log_dir) if r["request_id"] == "big-h"]
    assert (431, "client_error") == (rec["http_status"], rec["status"])


def test_sigterm_drains_the_writer_and_signs_a_final_checkpoint(tmp_path: Path) -> None:
    """A graceful stop writes every queued record (async durability too), then writer_stopped."""

    async def some(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(50):
                await post(s, base + "/v1/chat/completions", CHAT, headers={"x-request-id": f"term-{i}"})

    with gateway(tmp_path, config='[log]\ndurability = "async"\n') as (base, log_dir, proc):
        asyncio.run(some(base))
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    entries = read_entries(log_dir)
    assert {f"term-{i}" for i in range(50)} <= {e.get("request_id") for e in entries}
    assert "writer_stopped" == entries[-1].get("event")
    out = verify_log(log_dir)
    assert 0 == out.returncode and "live" not in out.stdout, out.stdout + out.stderr


def test_client_leaving_a_proxied_stream_is_cancelled_upstream_and_recorded(tmp_path: Path) -> None:
    """Through the proxy, a client that drops a stream gets a 'cancelled' record with partial output,
    and the gateway stops reading the upstream (its own record there is 'cancelled' too)."""
    hang = {**CHAT, "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "a b c d [[demo:hang]]"}]}

    async def drop(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                base + "/v1/chat/completions", data=orjson.dumps(hang), headers={"x-request-id": "p-gone"}
            ) as r:
                await r.content.readuntil(b"\n\n")
                r.close()
        await asyncio.sleep(0.5)

    with gateway(tmp_path, log_dir=tmp_path / "uplog") as (up, up_log, _):
        with gateway(tmp_path, "--upstream", up, log_dir=tmp_path / "gwlog") as (base, gw_log, _):
            asyncio.run(drop(base))
    (rec,) = [r for r in read_records(gw_log) if r["request_id"] == "p-gone"]
    assert "cancelled" == rec["status"] and rec["output_response"].startswith("You")
    (up_rec,) = [r for r in read_records(up_log) if r["request_id"] == "p-gone"]
    assert "cancelled" == up_rec["status"]


def test_client_leaving_a_slow_unstreamed_request_stops_it_in_time(tmp_path: Path) -> None:
    """A client that gives up on a non-streamed request while the upstream is still working: the
    proxy's disconnect watcher (started WATCH_AFTER_S into a request, so fast requests need none)
    sees it, stops the upstream request and records 'cancelled' at once, not when the upstream
    answers seconds later."""
    slow = {**CHAT, "max_tokens": 8}  # 8 tokens x 1 s of demo delay: the upstream answers after ~8 s

    async def drop(base: str) -> float:
        async with aiohttp.ClientSession() as s:
            with contextlib.suppress(TimeoutError):
                await post(
                    s,
                    base + "/v1/chat/completions",
                    slow,
                    headers={"x-request-id": "ns-gone"},
                    timeout=aiohttp.ClientTimeout(total=0.5),
                )
        return time.monotonic()

    with gateway(tmp_path, config="[gateway]\ndemo_token_delay_ms = 1000\n", log_dir=tmp_path / "uplog") as (up, _, _):
        with gateway(tmp_path, "--upstream", up, log_dir=tmp_path / "gwlog") as (base, gw_log, _):
            left = asyncio.run(drop(base))
            recs: list[dict[str, Any]] = []
            while not recs and time.monotonic() < left + 4.0:  # well before the upstream's answer
                recs = [r for r in read_records(gw_log) if r["request_id"] == "ns-gone"]
                time.sleep(0.05)
    assert recs, "the gateway did not notice the client leaving before the upstream answered"
    assert "cancelled" == recs[0]["status"]
    assert recs[0]["latency_ms"] < 3000


def test_requests_after_a_head_on_a_kept_alive_upstream_connection_are_answered_right(tmp_path: Path) -> None:
    """The upstream client keeps its response parser across requests on one connection, except
    after a HEAD (whose response announces a body that never comes): the next answers are right."""

    async def run(base: str) -> list[tuple[int, str, bytes]]:
        got = []
        async with aiohttp.ClientSession() as s:
            for method in ("HEAD", "GET", "HEAD", "GET", "GET"):  # one at a time: one upstream connection
                async with s.request(method, base + "/v1/models") as r:
                    got.append((r.status, r.headers.get("content-length", ""), await r.read()))
        return got

    with gateway(tmp_path, log_dir=tmp_path / "uplog") as (up, _, _):
        (direct_head, _, _), *_ = asyncio.run(run(up))
        with gateway(tmp_path, "--upstream", up, log_dir=tmp_path / "gwlog") as (base, _, _):
            got = asyncio.run(run(base))
    heads, gets = [got[0], got[2]], [got[1], got[3], got[4]]
    assert all(status == direct_head and int(length) > 0 and body == b"" for status, length, body in heads)
    for status, _, body in gets:
        assert 200 == status and "demo-model" in [m["id"] for m in orjson.loads(body)["data"]]


# -- issue 15 -------------------------------------------------------------------------------------


def test_no_stream_gets_its_done_without_a_durable_record(tmp_path: Path) -> None:
    """Through the proxy, when segment writes fail (EFBIG), a stream whose record is not durable
    ends without `data: [DONE]` (aborted): every stream a client saw complete has its record."""
    cfg = "[integrity]\nsegment_max_bytes = 1048576\n"
    done: list[str] = []
    failed: list[str] = []

    async def load(base: str) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(120):
                rid = f"st-{i}"
                got = b""
                try:
                    async with s.post(
                        base + "/v1/chat/completions",
                        data=orjson.dumps({**CHAT, "stream": True}),
                        headers={"x-request-id": rid},
                    ) as r:
                        async for chunk in r.content.iter_any():
                            got += chunk
                except aiohttp.ClientError:
                    pass
                (done if got.endswith(b"data: [DONE]\n\n") else failed).append(rid)

    with gateway(tmp_path, log_dir=tmp_path / "uplog") as (up, _, _):
        with gateway(tmp_path, "--upstream", up, config=cfg, preexec_fn=_small_files) as (base, log_dir, _):
            asyncio.run(load(base))
    assert failed, "the write limit was never hit"
    assert done, "nothing was delivered"
    recorded = {r["request_id"] for r in read_records(log_dir)}
    assert [] == [rid for rid in done if rid not in recorded]


def _closed_within(sock: Any, deadline: float) -> bool:
    """Whether the server closes ``sock`` before ``deadline`` (monotonic), reading what it sends."""
    import select

    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            try:
                if sock.recv(65536) == b"":
                    return True
            except ConnectionError:
                return True
    return False


def test_idle_and_slow_header_connections_are_reaped(tmp_path: Path) -> None:
    """A connection that sends nothing, or dribbles its headers, is closed after header_timeout_s."""
    import socket

    cfg = "[gateway]\nheader_timeout_s = 0.5\n"
    with gateway(tmp_path, config=cfg) as (base, _, _):
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 15
        try:
            drip_until = time.monotonic() + 3
            while time.monotonic() < drip_until:  # a header byte every 0.1 s keeps arriving...
                try:
                    slow.sendall(b"X")
                except OSError:
                    break
                if _closed_within(slow, time.monotonic() + 0.1):
                    break
            assert _closed_within(slow, deadline), "a slow-header connection was never closed"
            assert all(_closed_within(s, deadline) for s in idle), "idle connections were never closed"
            # and the server still serves
            with urllib_get(base + "/healthz") as status:
                assert 200 == status
        finally:
            for s in [*idle, slow]:
                s.close()


@contextlib.contextmanager
def urllib_get(url: str) -> Iterator[int]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        yield resp.status


def test_connection_cap_answers_503_and_the_ops_port_still_answers(tmp_path: Path) -> None:
    """Beyond max_client_connections new requests get 503 at once; /healthz and /readyz on the
    separate ops listener keep answering, and the metrics there need no main-port connection."""
    ops = free_port()
    cfg = f"[gateway]\nmax_client_connections = 4\nops_port = {ops}\n"
    hang = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "a b c d [[demo:hang]]"}]}

    async def scenario(base: str) -> tuple[int, int, int]:
        conns = [aiohttp.ClientSession() for _ in range(4)]
        streams = []
        try:
            for s in conns:
                r = await s.post(base + "/v1/chat/completions", data=orjson.dumps(hang))
                await r.content.readuntil(b"\n\n")
                streams.append(r)
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/v1/models") as r:
                    over = r.status
                async with s.get(f"http://127.0.0.1:{ops}/healthz") as r:
                    health = r.status
                async with s.get(f"http://127.0.0.1:{ops}/readyz") as r:
                    ready = r.status
            return over, health, ready
        finally:
            for r in streams:
                r.close()
            for s in conns:
                await s.close()

    with gateway(tmp_path, config=cfg) as (base, _, _):
        assert (503, 200, 200) == asyncio.run(scenario(base))


def test_a_stalled_body_gets_408_over_a_real_socket(tmp_path: Path) -> None:
    """A client that announces 100 bytes and sends 10 is answered 408 after body_timeout_s."""
    import socket

    with gateway(tmp_path, config="[edge]\nbody_timeout_s = 0.5\n") as (base, log_dir, _):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nx-request-id: slow-body\r\n"
                b"content-type: application/json\r\ncontent-length: 100\r\n\r\n" + b'{"prompt":'
            )
            head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 408"), head[:100]
    (rec,) = [r for r in read_records(log_dir) if r["request_id"] == "slow-body"]
    assert (408, "client_error") == (rec["http_status"], rec["status"])


def test_proxied_streams_match_the_upstream_for_n2_and_continuous_usage(tmp_path: Path) -> None:
    """Through the gateway, streams with n=2 and continuous_usage_stats reach the client exactly as
    the upstream sends them to a direct client (fingerprints on every finish chunk, no usage)."""
    reqs = [
        {**CHAT, "stream": True, "n": 2},
        {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
        {**CHAT, "stream": "true", "n": 2, "stream_options": {"include_usage": False, "continuous_usage_stats": True}},
    ]

    async def fetch(base: str) -> list[bytes]:
        out = []
        async with aiohttp.ClientSession() as s:
            for i, req in enumerate(reqs):
                _, _, body = await post(s, base + "/v1/chat/completions", req, headers={"x-request-id": f"same-{i}"})
                out.append(re.sub(rb'"created":\d+', b"", body))
        return out

    with gateway(tmp_path, log_dir=tmp_path / "uplog") as (up, _, _):
        direct = asyncio.run(fetch(up))
        with gateway(tmp_path, "--upstream", up, log_dir=tmp_path / "gwlog") as (base, gw_log, _):
            proxied = asyncio.run(fetch(base))
    assert direct == proxied
    assert all(b'"usage"' not in body and b'"system_fingerprint"' in body for body in proxied)
    recs = read_records(gw_log)
    assert 3 == len(recs) and all(r["usage_source"] == "injected" and r["total_tokens"] for r in recs)


async def _startup(app: Any) -> tuple[int, Any]:
    """Run ``app``'s lifespan start-up; returns the collector's freeze count then, and a shutdown."""
    import gc

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    inbox.put_nowait({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await asyncio.wait_for(started.wait(), 30)
    frozen = gc.get_freeze_count()

    async def shutdown() -> None:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 30)

    return frozen, shutdown


async def test_the_gateway_tunes_its_collector_once_started_and_the_middleware_leaves_it(tmp_path: Path) -> None:
    """``vllm-audit serve`` moves its start-up heap out of the collector's way once started (as
    vLLM's API server does) and raises the young generation's threshold; the middleware on its
    own never touches a host's collector."""
    import gc

    from vllm_audit._gc import GC_YOUNG_THRESHOLD
    from vllm_audit.config import config_from_mapping
    from vllm_audit.demo import DemoEngine
    from vllm_audit.gateway import create_app
    from vllm_audit.middleware import AuditMiddleware

    threshold = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, threshold[1], threshold[2])
    try:
        mw = AuditMiddleware(DemoEngine(), config_from_mapping({"log": {"dir": str(tmp_path / "mw")}}))
        frozen, shutdown = await _startup(mw)
        await shutdown()
        assert (frozen, gc.get_threshold()[0]) == (0, 700)
        app = create_app(config_from_mapping({"log": {"dir": str(tmp_path / "gw")}}))
        frozen, shutdown = await _startup(app)
        await shutdown()
        assert frozen > 10_000  # the interpreter, the server's modules, the redactor, the writer
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, threshold[1], threshold[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
