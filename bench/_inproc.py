"""Middleware-mode bench (helper of bench/run.py): no server, no sockets.

A bare ASGI app that replays DemoEngine's own response bytes (pre-built, so the app costs almost
nothing) is called in a loop with synthetic scope/receive/send, alone and inside
``AuditMiddleware``. What is measured is the CPU time of the event-loop thread
(``time.thread_time()``), i.e. the request path only: the writer thread runs at the same time
(durability "async", so nothing waits for it) but its CPU is not counted here — bench/_writer.py
measures it. A "strict" pass (c=64, futures resolved by the writer after fsync) is also reported;
its loop-thread CPU includes waiting-side bookkeeping (futures, timers, call_soon_threadsafe).
As inside vLLM, whose API server freezes its start-up heap (``gc.freeze()``) once started, the
heap is frozen after each middleware is built: otherwise every full collection (one per ~1,600
strict requests at c=64) walks the whole start-up heap, 10-23 ms each on the loop thread.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _upstream  # noqa: E402

from vllm_audit.config import load_config  # noqa: E402
from vllm_audit.demo import DemoEngine  # noqa: E402
from vllm_audit._gc import freeze_gc_heap  # noqa: E402
from vllm_audit.middleware import AuditMiddleware  # noqa: E402

_SSE_HDR = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _prebuilt(max_tokens: int) -> dict[str, Any]:
    app = DemoEngine()
    _, _, js = await _upstream.capture(app, _upstream.chat_body(False, max_tokens))
    _, _, sse = await _upstream.capture(app, _upstream.chat_body(True, max_tokens))
    import orjson

    usage_req = orjson.dumps({**orjson.loads(_upstream.chat_body(True, max_tokens)), "stream_options": {"include_usage": True}})
    _, _, sse_u = await _upstream.capture(app, usage_req)
    body = b"".join(js)
    return {
        "json_start": {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        },
        "json": body,
        "sse": sse,
        "sse_usage": sse_u,
    }


class ReplayApp:
    """Answers like DemoEngine (same bytes, one body message per SSE event) at near-zero cost."""

    def __init__(self, pre: dict[str, Any]) -> None:
        self.pre = pre

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        msg = await receive()
        body = msg.get("body", b"")
        pre = self.pre
        if b'"stream":true' not in body:
            await send(pre["json_start"])
            await send({"type": "http.response.body", "body": pre["json"], "more_body": False})
            return
        events = pre["sse_usage"] if b'"include_usage":true' in body else pre["sse"]
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HDR})
        last = len(events) - 1
        for i, ev in enumerate(events):
            await send({"type": "http.response.body", "body": ev, "more_body": i != last})


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _one(app: Any, body: bytes, counter: list[int]) -> None:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        counter[0] += 1

    await app(_scope(body), receive, send)


async def _measure(app: Any, body: bytes, n: int, conc: int = 1) -> tuple[float, float]:
    """(loop-thread CPU µs per request, wall µs per request)."""
    counter = [0]
    for _ in range(min(200, n)):  # warm-up
        await _one(app, body, counter)
    gc.collect()
    t_cpu, t_wall = time.thread_time(), time.perf_counter()
    if conc == 1:
        for _ in range(n):
            await _one(app, body, counter)
    else:
        for _ in range(n // conc):
            await asyncio.gather(*[_one(app, body, counter) for _ in range(conc)])
    cpu = time.thread_time() - t_cpu
    wall = time.perf_counter() - t_wall
    return cpu / n * 1e6, wall / n * 1e6


def _mw(app: Any, log_dir: str, durability: str) -> AuditMiddleware:
    cfg = load_config(None, {"log": {"dir": log_dir, "durability": durability}})
    mw = AuditMiddleware(app, cfg)
    freeze_gc_heap()  # what vLLM's API server does once started (its lifespan: freeze_gc_heap())
    return mw


async def main_async(n: int) -> dict[str, Any]:
    pre20 = await _prebuilt(20)
    pre200 = await _prebuilt(200)
    app20, app200 = ReplayApp(pre20), ReplayApp(pre200)
    b_ns, b_s20, b_s200 = _upstream.chat_body(False, 20), _upstream.chat_body(True, 20), _upstream.chat_body(True, 200)
    out: dict[str, Any] = {"n": n, "events_20": len(pre20["sse"]) + 1, "events_200": len(pre200["sse"]) + 1}
    with tempfile.TemporaryDirectory(prefix="vllm-audit-bench-inproc-") as tmp:
        mw20 = _mw(app20, os.path.join(tmp, "a"), "async")
        mw200 = _mw(app200, os.path.join(tmp, "b"), "async")
        res: dict[str, tuple[float, float]] = {}
        res["bare_ns"] = await _measure(app20, b_ns, n)
        res["audit_ns"] = await _measure(mw20, b_ns, n)
        res["bare_s20"] = await _measure(app20, b_s20, n)
        res["audit_s20"] = await _measure(mw20, b_s20, n)
        n200 = max(200, n // 5)
        res["bare_s200"] = await _measure(app200, b_s200, n200)
        res["audit_s200"] = await _measure(mw200, b_s200, n200)
        mw20.writer.stop()
        mw200.writer.stop()
        # strict durability: 64 concurrent requests per round, futures resolved after each fsync
        mws = _mw(app20, os.path.join(tmp, "c"), "strict")
        ns = max(640, (n // 4) // 64 * 64)
        res["strict_ns_c64"] = await _measure(mws, b_ns, ns, conc=64)
        res["strict_s20_c64"] = await _measure(mws, b_s20, ns, conc=64)
        mws.writer.stop()
        res["bare_ns_c64"] = await _measure(app20, b_ns, ns, conc=64)
        res["bare_s20_c64"] = await _measure(app20, b_s20, ns, conc=64)
    out["raw"] = {k: {"cpu_us": round(v[0], 2), "wall_us": round(v[1], 2)} for k, v in res.items()}
    c = {k: v[0] for k, v in res.items()}
    per_chunk = ((c["audit_s200"] - c["bare_s200"]) - (c["audit_s20"] - c["bare_s20"])) / (
        out["events_200"] - out["events_20"]
    )
    out["added_us_per_request_nonstream"] = round(c["audit_ns"] - c["bare_ns"], 2)
    out["added_us_per_request_stream20"] = round(c["audit_s20"] - c["bare_s20"], 2)
    out["added_us_per_chunk"] = round(per_chunk, 3)
    out["added_us_per_request_stream_fixed"] = round(
        (c["audit_s20"] - c["bare_s20"]) - per_chunk * out["events_20"], 2
    )
    out["added_us_strict_c64_nonstream"] = round(c["strict_ns_c64"] - c["bare_ns_c64"], 2)
    out["added_us_strict_c64_stream20"] = round(c["strict_s20_c64"] - c["bare_s20_c64"], 2)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    try:
        import uvloop

        result = uvloop.run(main_async(n))
    except ImportError:  # pragma: no cover
        result = asyncio.run(main_async(n))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
