"""Small ASGI helpers shared by the apps in this package (demo engine, proxy, audit API, edge)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from vllm_audit.types import Receive, Send

JSON_HEADER = (b"content-type", b"application/json")


async def lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Answer the ASGI lifespan protocol; run ``on_shutdown`` before acknowledging shutdown."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = (JSON_HEADER,)
) -> None:
    """One complete response with a content-length."""
    hdrs = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})
