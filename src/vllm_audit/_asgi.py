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


async def until_disconnect(work: Awaitable[None], receive: Receive, watch_after: float = 0.0) -> bool:
    """Run ``work`` in the current task; cancel it if the client disconnects meanwhile.

    Returns True when the client went away (``work`` was stopped), False when ``work`` finished.
    One watcher task per call reads ``receive`` (as starlette's StreamingResponse does); the
    work itself is not wrapped in a task of its own. With ``watch_after`` > 0 the watcher is
    started only once the work has run that long: a request that is over sooner costs no task
    (most of a fast proxied request's scheduling), and a client that left meanwhile is still
    seen then, since ``receive`` reports a disconnect that has already happened.
    """
    task = asyncio.current_task()
    assert task is not None
    watch = _Watcher(task, receive)
    timer = asyncio.get_running_loop().call_later(watch_after, watch.start) if watch_after > 0 else None
    if timer is None:
        watch.start()
    try:
        await work
    except asyncio.CancelledError:
        if watch.gone:
            task.uncancel()
            return True
        raise
    finally:
        watch.active = False
        if timer is not None:
            timer.cancel()
        if watch.task is not None:
            watch.task.cancel()
    return False


class _Watcher:
    """Reads ``receive`` for :func:`until_disconnect`; cancels the work's task on a disconnect."""

    __slots__ = ("active", "gone", "receive", "target", "task")

    def __init__(self, target: asyncio.Task[object], receive: Receive) -> None:
        self.target = target
        self.receive = receive
        self.active = True
        self.gone = False
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        if self.active and self.task is None:
            self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        msg = await self.receive()
        if msg["type"] == "http.disconnect" and self.active:
            self.gone = True
            self.target.cancel()


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
