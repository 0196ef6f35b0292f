"""Bench upstreams (helper of bench/run.py).

``python bench/_upstream.py PORT``
    A fast fake OpenAI server: raw asyncio + uvloop protocol, HTTP/1.1 keep-alive, answers every
    POST with bytes pre-built by :class:`vllm_audit.demo.DemoEngine` itself (so the payloads are
    byte-for-byte what the demo engine sends; only the request id and ``created`` are frozen).
    ``"stream": true`` bodies get an SSE response in chunked encoding, one HTTP chunk per event,
    written separately with one event-loop turn between them (like a server emitting tokens);
    ``stream_options.include_usage`` adds the usage-only chunk, as vLLM does. This is the
    PERFORMANCE.md harness's upstream: cheap enough to share CPU 0 with wrk without being the limit.

``uvicorn bench._upstream:demo_app``
    ``DemoEngine`` served directly (no middleware), for the "uvicorn floor" reference row.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import orjson

from vllm_audit.demo import DemoEngine

#: The request the bench sends (wrk and the in-process bench use the same bodies).
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the audit policy for ticket 4711 in two sentences, please."},
]


def chat_body(stream: bool, max_tokens: int = 20) -> bytes:
    req: dict[str, Any] = {"model": "demo-model", "messages": MESSAGES, "max_tokens": max_tokens}
    if stream:
        req["stream"] = True
    return orjson.dumps(req)


demo_app = DemoEngine()


async def capture(app: Any, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
    """Run one request through an ASGI app in-process; return status, headers, body messages."""
    sent = False
    out: list[bytes] = []
    start: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            start.update(msg)
        elif msg.get("body"):
            out.append(msg["body"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"bench-0001")],
        "client": ("127.0.0.1", 5555),
    }
    await app(scope, receive, send)
    return start["status"], list(start.get("headers", [])), out


def _prebuild() -> dict[str, bytes | list[bytes]]:
    async def go() -> dict[str, bytes | list[bytes]]:
        app = DemoEngine()
        _, _, nonstream = await capture(app, chat_body(False))
        _, _, stream = await capture(app, chat_body(True))
        usage_body = orjson.dumps(
            {**orjson.loads(chat_body(True)), "stream_options": {"include_usage": True}}
        )
        _, _, stream_usage = await capture(app, usage_body)
        return {"json": b"".join(nonstream), "sse": stream, "sse_usage": stream_usage}

    return asyncio.run(go())


#: "one": a stream's events go out in one write (PERFORMANCE.md's pre-built responses; the
#: upstream is never the limit). "each": one write per event with a loop turn between them
#: (closer to a real model server; costs the shared CPU 0 about 20 syscalls per stream).
EVENTS = os.environ.get("BENCH_UPSTREAM_EVENTS", "one")


class _Proto(asyncio.Protocol):
    __slots__ = ("buf", "tr", "busy", "resp")

    def __init__(self, resp: dict[str, Any]) -> None:
        self.buf = b""
        self.tr: asyncio.Transport | None = None
        self.busy = False
        self.resp = resp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        while True:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            low = head.lower()
            clen = 0
            i = low.find(b"content-length:")
            if i >= 0:
                j = low.find(b"\r\n", i)
                clen = int(low[i + 15 : j if j >= 0 else len(low)])
            total = end + 4 + clen
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            if b'"stream":true' in body:
                key = "sse_usage" if b'"include_usage":true' in body else "sse"
                if EVENTS == "one":
                    self.tr.write(self.resp[key + "_http"])  # type: ignore[union-attr]
                    continue
                self.busy = True
                asyncio.ensure_future(self._stream(self.resp[key]))
                return
            self.tr.write(self.resp["json_http"])  # type: ignore[union-attr]

    async def _stream(self, chunks: list[bytes]) -> None:
        tr = self.tr
        assert tr is not None
        tr.write(self.resp["sse_head"])
        for c in chunks:
            await asyncio.sleep(0)
            if tr.is_closing():
                return
            tr.write(b"%x\r\n%s\r\n" % (len(c), c))
        tr.write(b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tr = None


def main() -> None:
    import uvloop

    port = int(sys.argv[1])
    pre = _prebuild()
    js = pre["json"]
    assert isinstance(js, bytes)
    resp = {
        "json_http": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(js), js),
        "sse_head": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n",
        "sse": pre["sse"],
        "sse_usage": pre["sse_usage"],
    }
    for key in ("sse", "sse_usage"):
        resp[key + "_http"] = resp["sse_head"] + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in resp[key]) + b"0\r\n\r\n"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Proto(resp), "127.0.0.1", port, backlog=4096)
        print(f"fake upstream on 127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
