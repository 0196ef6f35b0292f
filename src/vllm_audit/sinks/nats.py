"""The ``nats`` sink: every entry as one NATS JetStream message, through nats-py.

* **Message**: subject ``<subject_prefix>.<writer_id>``; payload = the stored line bytes, unchanged
  (a consumer can recompute the leaf hash and re-verify each chain); headers ``Nats-Msg-Id`` =
  the entry key ``<writer_id>:<seq>``, plus ``Vllm-Audit-Writer-Id``, ``Vllm-Audit-Seq``,
  ``Vllm-Audit-Leaf-Hash`` and ``Vllm-Audit-Record-Type``.
* **Stream**: ensured at start when ``create_stream`` is on (subjects ``<subject_prefix>.>``, file
  storage, the configured replicas and duplicate window); otherwise it must exist.
* **Delivery**: ``deliver`` publishes the whole batch without waiting (each message with a reply
  subject on the sink's inbox) and then awaits every JetStream acknowledgement (the message is
  stored, and replicated when replicas > 1). A message larger than the server's
  ``max_payload`` (or the stream's ``max_msg_size``) is quarantined; any other failure — no
  acknowledgement within ``ack_timeout_s``, no stream, a lost connection — fails the batch,
  which the runner retries from the cursor (reconnecting with its backoff).
* **Duplicates**: JetStream drops a message whose ``Nats-Msg-Id`` it has seen within the stream's
  duplicate window (acknowledging it as a duplicate), so a batch replayed after a shipper crash
  or a failed batch is stored once. A replay arriving *after* the window (e.g. a shipper that
  acknowledged, crashed before committing its cursor, and stayed down longer than the window)
  is stored again: consumers that must be exact dedupe by the ``Nats-Msg-Id`` header.

nats-py is asyncio; the sink runs a private event loop in the runner's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson

from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.base import Sink
from vllm_audit.ship.config import Secret
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger("vllm_audit.ship")

#: JetStream's "message size exceeds maximum allowed" (the stream's max_msg_size).
JS_MESSAGE_TOO_LARGE = 10054
_BAD_TOKEN = str.maketrans({c: "_" for c in " \t\r\n.*>"})


def _valid_subject(s: str) -> bool:
    return bool(s) and all(tok and tok.translate(_BAD_TOKEN) == tok for tok in s.split("."))


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "nats"``: NATS JetStream publishes with message-id dedupe (nats-py)."""

    #: Server URLs (``nats://host:4222``, ``tls://host:4222``); the client fails over between them.
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    #: Entries go to subject ``<subject_prefix>.<writer_id>``.
    subject_prefix: str = "vllm-audit"
    #: JetStream stream that stores the subjects.
    stream: str = "VLLM_AUDIT"
    #: Create the stream at start when missing (subjects ``<subject_prefix>.>``); off: it must exist.
    create_stream: bool = True
    #: Storage of a created stream: "file" or "memory".
    storage: Literal["file", "memory"] = "file"
    #: Replicas of a created stream (1 for a single server; 3 or 5 in a cluster).
    replicas: int = 1
    #: Seconds JetStream remembers a ``Nats-Msg-Id`` to drop replays (of a created stream).
    duplicate_window_s: float = 7200.0
    #: Seconds a created stream keeps messages (0: no age limit).
    max_age_s: float = 0.0
    #: User name (with password).
    user: str = ""
    #: Password: ``{ env = "NAME" }`` or ``{ file = "/path" }``.
    password: Secret | None = None
    #: Authentication token (instead of user/password).
    token: Secret | None = None
    #: NATS credentials file (JWT + NKey seed) for decentralised auth.
    creds_file: str = ""
    #: CA bundle (PEM) to verify the server over TLS (empty with ``tls://`` URLs: the system store).
    tls_ca_file: str = ""
    #: Client certificate (PEM) for mutual TLS.
    tls_cert_file: str = ""
    #: Client private key (PEM) for mutual TLS.
    tls_key_file: str = ""
    #: Seconds to wait for a batch's acknowledgements before it fails and is retried.
    ack_timeout_s: float = 10.0
    #: Seconds to wait for a connection.
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.servers:
            raise ValueError("servers must name at least one server")
        if not _valid_subject(self.subject_prefix):
            raise ValueError(f"subject_prefix {self.subject_prefix!r} is not a NATS subject (no spaces, '*' or '>')")
        if not self.stream or not all(c.isalnum() or c in "-_" for c in self.stream):
            raise ValueError(f"stream {self.stream!r}: use letters, digits, '-' and '_' only")
        if self.replicas < 1 or self.replicas > 5:
            raise ValueError("replicas must be between 1 and 5")
        if self.duplicate_window_s <= 0 or self.max_age_s < 0:
            raise ValueError("duplicate_window_s must be positive and max_age_s not negative")
        if self.max_age_s and self.duplicate_window_s > self.max_age_s:
            raise ValueError("duplicate_window_s cannot be longer than max_age_s")
        if self.ack_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("ack_timeout_s and connect_timeout_s must be positive")
        if self.token is not None and (self.user or self.password is not None):
            raise ValueError("use either token or user/password, not both")
        if bool(self.user) != (self.password is not None):
            raise ValueError("user and password go together")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")


def subject_for(prefix: str, writer_id: str) -> str:
    """``<prefix>.<writer_id>``, with characters a subject token cannot hold replaced by ``_``."""
    return f"{prefix}.{writer_id.translate(_BAD_TOKEN) or '_'}"


def _header_bytes(headers: dict[str, str]) -> int:
    """Size of the ``NATS/1.0`` header block the client sends for ``headers``."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


class NatsSink(Sink):
    """Publishes each entry's stored bytes to JetStream; see the module docstring."""

    kind = "nats"

    def __init__(self, name: str, options: Options, env: SinkEnv) -> None:
        super().__init__(name, env.state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        where = f"[sinks.{name}]"
        self._password = options.password.resolve(f"{where} password") if options.password else None
        self._token = options.token.resolve(f"{where} token") if options.token else None
        self._creds = str(env.path(options.creds_file)) if options.creds_file else None
        self._tls_files = tuple(
            str(env.path(p)) if p else "" for p in (options.tls_ca_file, options.tls_cert_file, options.tls_key_file)
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        # JetStream publishes are core publishes with a reply subject on this inbox; the server
        # answers each with a PubAck (or an error) there. Done here rather than with nats-py's
        # publish_async, whose futures never resolve when JetStream answers with an error.
        self._inbox = ""
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_token = 0
        #: Acknowledgements JetStream marked as duplicates (replays it dropped), since start.
        self.duplicates = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def open(self) -> None:
        if self._nc is None:
            self._run(self._connect())

    async def _connect(self) -> None:
        import nats

        o = self.options
        tls: ssl.SSLContext | None = None
        ca, cert, key = self._tls_files
        if ca or cert or any(s.startswith("tls://") for s in o.servers):
            tls = ssl.create_default_context(cafile=ca or None)
            if cert:
                tls.load_cert_chain(cert, key)

        async def quiet(exc: Exception) -> None:
            log.debug("nats sink %s: %s", self.name, exc)

        nc = await nats.connect(
            servers=list(o.servers),
            name=f"vllm-audit-{self.name}",
            user=o.user or None,
            password=self._password,
            token=self._token,
            user_credentials=self._creds,
            tls=tls,
            connect_timeout=o.connect_timeout_s,
            allow_reconnect=True,
            # a short reconnect for blips; a longer outage closes the client and the runner's
            # backoff reconnects (unlimited attempts would also make the first connect hang)
            max_reconnect_attempts=2,
            reconnect_time_wait=0.5,
            error_cb=quiet,
        )
        try:
            js = nc.jetstream(timeout=o.ack_timeout_s)
            if o.create_stream:
                await self._ensure_stream(js)
            else:
                await js.stream_info(o.stream)
        except BaseException:
            await nc.close()
            raise
        self._inbox = nc.new_inbox()
        self._acks.clear()
        await nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._nc, self._js = nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        o = self.options
        try:
            info = await js.stream_info(o.stream)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=o.stream,
                    subjects=[f"{o.subject_prefix}.>"],
                    storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
                    num_replicas=o.replicas,
                    duplicate_window=o.duplicate_window_s,
                    max_age=o.max_age_s,
                )
            )
            return
        window = info.config.duplicate_window or 0
        if window + 1e-3 < o.duplicate_window_s:
            log.warning(
                "nats sink %s: stream %s dedupes over %.0f s only (configured %.0f s): older replays duplicate",
                self.name,
                o.stream,
                window,
                o.duplicate_window_s,
            )

    def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if nc is not None:
                try:
                    loop.run_until_complete(asyncio.wait_for(nc.close(), 5.0))
                except Exception as exc:
                    log.debug("nats sink %s: close: %s", self.name, exc)
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()

    # -- delivery -----------------------------------------------------------------------------

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        if self._nc is None:
            raise RuntimeError("nats sink is not open")
        result: list[tuple[Entry, str]] = self._run(self._publish(writer_id, entries))
        return result

    async def _on_ack(self, msg: Msg) -> None:
        """A JetStream reply on the sink's ack inbox: resolve the publish waiting for it."""
        fut = self._acks.pop(msg.subject[len(self._inbox) + 1 :], None)
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(RuntimeError("no JetStream stream takes this subject (no responders)"))
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            fut.set_exception(RuntimeError(f"malformed JetStream acknowledgement {msg.data[:200]!r}"))
            return
        if not isinstance(reply, dict):
            fut.set_exception(RuntimeError(f"malformed JetStream acknowledgement {msg.data[:200]!r}"))
            return
        fut.set_result(reply)

    async def _publish(self, writer_id: str, entries: Sequence[Entry]) -> list[tuple[Entry, str]]:
        nc = self._nc
        assert nc is not None
        loop = asyncio.get_running_loop()
        subject = subject_for(self.options.subject_prefix, writer_id)
        max_payload = nc.max_payload
        timeout = self.options.ack_timeout_s
        inbox = self._inbox
        # the header block's size, less the parts that vary per entry (seq twice, record type)
        fixed = _header_bytes(
            {
                "Nats-Msg-Id": f"{writer_id}:",
                "Vllm-Audit-Writer-Id": writer_id,
                "Vllm-Audit-Seq": "",
                "Vllm-Audit-Leaf-Hash": "0" * 64,
                "Vllm-Audit-Record-Type": "",
            }
        )
        rejected: list[tuple[Entry, str]] = []
        sent: list[tuple[Entry, asyncio.Future[dict[str, Any]]]] = []
        try:
            for e in entries:
                seq = str(e.seq)
                key = f"{writer_id}:{seq}"
                headers = {
                    "Nats-Msg-Id": key,
                    "Vllm-Audit-Writer-Id": writer_id,
                    "Vllm-Audit-Seq": seq,
                    "Vllm-Audit-Leaf-Hash": e.leaf_hex,
                    "Vllm-Audit-Record-Type": e.record_type,
                }
                size = fixed + len(e.line) + 2 * len(seq) + len(e.record_type)
                if size > max_payload:
                    rejected.append((e, f"message of {size} bytes exceeds the server's max_payload {max_payload}"))
                    continue
                self._next_token += 1
                token = str(self._next_token)
                fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                self._acks[token] = fut
                sent.append((e, fut))
                await nc.publish(subject, e.line, reply=f"{inbox}.{token}", headers=headers)
            if sent:
                await nc.flush(max(1, round(timeout)))
                _, pending = await asyncio.wait([f for _, f in sent], timeout=timeout)
                if pending:
                    missing = f"{len(pending)} of {len(sent)} JetStream acknowledgements"
                    raise TimeoutError(f"{missing} missing after {timeout}s")
        except BaseException:
            for _, f in sent:
                f.cancel()
            self._acks.clear()
            raise
        for e, f in sent:
            reply = f.result()  # raises the failure set by _on_ack (no stream, malformed reply)
            error = reply.get("error")
            if error is None:
                if reply.get("duplicate"):
                    self.duplicates += 1
                continue
            code = error.get("err_code") if isinstance(error, dict) else None
            text = error.get("description", error) if isinstance(error, dict) else error
            if code == JS_MESSAGE_TOO_LARGE:
                rejected.append((e, f"JetStream rejected the message ({len(e.line)} bytes): {text}"))
                continue
            raise RuntimeError(f"JetStream refused entry {e.key}: {text} (err_code {code})")
        return rejected


def build(name: str, options: Options, env: SinkEnv) -> NatsSink:
    return NatsSink(name, options, env)
