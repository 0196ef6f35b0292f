"""Small ASGI helpers shared by the apps in this package (demo engine, proxy, audit API, edge)."""

from __future__ import annotations

import asyncio
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


async def until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work`` in the current task; cancel it if the client disconnects meanwhile.

    Returns True when the client went away (``work`` was stopped), False when ``work`` finished.
    One watcher task per call reads ``receive`` (as starlette's StreamingResponse does); the
    work itself is not wrapped in a task of its own.
    """
    task = asyncio.current_task()
    assert task is not None
    state = {"active": True, "gone": False}

    async def watch() -> None:
        msg = await receive()
        if msg["type"] == "http.disconnect" and state["active"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if state["gone"]:
            task.uncancel()
            return True
        raise
    finally:
        state["active"] = False
        watcher.cancel()
    return False


class BodyError(Exception):
    """A request body that could not be read: the client left, or it is over the limit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.too_large = reason == "too_large"


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (``BodyError`` otherwise)."""
    chunks = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BodyError("disconnected")
        chunks += msg.get("body", b"")
        if len(chunks) > limit:
            raise BodyError("too_large")
        if not msg.get("more_body"):
            return bytes(chunks)
