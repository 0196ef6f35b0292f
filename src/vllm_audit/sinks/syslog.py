"""The ``syslog`` sink: RFC 5424 messages over TCP or TLS, RFC 6587 octet-counting framing.

One message per entry::

    <PRI>1 TIMESTAMP HOSTNAME vllm-audit PROCID MSGID [vllm-audit@PEN writer_id=".." seq=".."
    record_hash=".." request_id=".."] BOM{the stored JSON line | its ECS view}

framed as ``MSG-LEN SP SYSLOG-MSG`` (octet counting: any byte may appear in the message). PRI is
``facility * 8 + severity`` (a severity per record type and inference status, configurable);
TIMESTAMP is the record's own ``timestamp``; MSGID its record type; SD-PARAM values are escaped
per RFC 5424 §6.3.3 (``"``, ``\\`` and ``]``).

**What "delivered" means.** Syslog over TCP has no application acknowledgement. The sink writes a
batch to the socket and then waits until the receiver's TCP stack has acknowledged every byte
(the kernel's unacknowledged send queue is empty): that is the strongest receipt the protocol
gives. Bytes the receiving host acknowledged can still be lost if the receiver dies before it
reads them, so the committed cursor *trails* the socket: a batch's position is committed only once
the connection has stayed open for ``replay_window_s`` after the batch was acknowledged (checked
at the next batch), or at a clean close, after the receiver has closed its side (it has read
everything). When the connection breaks, the runner reopens it and replays from the committed
cursor: nothing is lost, and the entries of the last ``replay_window_s`` before the break may
arrive twice (syslog cannot dedupe; the receiver can, by the SD ``record_hash`` / ``seq``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import select
import socket
import ssl
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import orjson

from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor
from vllm_audit.ship.base import Context, Sink
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21, "local6": 22,
    "local7": 23,
}  # fmt: skip
SEVERITIES = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7,
}  # fmt: skip

#: Default severity per ``inference.<status>``, ``event`` and ``alert`` (an alert record's own
#: ``severity`` word — low/medium/high/critical — picks notice/warning/err/crit instead).
DEFAULT_SEVERITY: dict[str, str] = {
    "inference.ok": "info",
    "inference.cancelled": "info",
    "inference.client_error": "notice",
    "inference.rejected": "warning",
    "inference.upstream_error": "err",
    "inference.timeout": "err",
    "inference": "info",
    "event": "notice",
    "alert": "warning",
}
_ALERT_SEVERITY = {"low": "notice", "medium": "warning", "high": "err", "critical": "crit"}

BOM = b"\xef\xbb\xbf"
NIL = b"-"


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "syslog"``: RFC 5424 over TCP or TLS (octet-counting framing, RFC 6587)."""

    #: Receiver host name or address.
    host: str = ""
    #: Receiver port (0: 6514 for TLS, 601 for TCP).
    port: int = 0
    #: "tls" (RFC 5425) or "tcp" (plain: only on a trusted network).
    transport: Literal["tls", "tcp"] = "tls"
    #: CA bundle the receiver's certificate must chain to (empty: the system store).
    ca_file: str = ""
    #: Client certificate (PEM) for receivers that authenticate senders (empty: none).
    cert_file: str = ""
    #: Private key of ``cert_file`` (empty: in ``cert_file``).
    key_file: str = ""
    #: Name the receiver's certificate must carry (empty: ``host``).
    server_name: str = ""
    #: Syslog facility name (``local0`` .. ``local7``, ``audit``, ``auth``, ``daemon``, ...).
    facility: str = "local0"
    #: Severity names by ``inference.<status>``, ``inference``, ``event``, ``alert``; merged over
    #: the defaults (info for ok/cancelled calls, notice for client errors and events, warning for
    #: rejected calls and alerts, err for upstream errors and timeouts).
    severity: dict[str, str] = dataclasses.field(default_factory=dict)
    #: MSG body: "stored" (the stored log line, byte for byte) or "ecs" (its ECS JSON).
    message_format: Literal["stored", "ecs"] = "stored"
    #: HOSTNAME field (empty: this machine's host name).
    hostname: str = ""
    #: APP-NAME field.
    app_name: str = "vllm-audit"
    #: IANA private enterprise number in the SD-ID ``vllm-audit@<number>`` (32473 is the number
    #: RFC 5612 reserves for documentation: use your organisation's).
    enterprise_number: int = 32473
    #: Messages longer than this many bytes are quarantined (receivers cut or drop them; rsyslog's
    #: default ``maxMessageSize`` is 8k: raise it to match).
    max_message_bytes: int = 65536
    #: Seconds a batch must stay acknowledged on a live connection before its cursor is committed
    #: (what a broken connection replays: see the sink's documentation).
    replay_window_s: float = 2.0
    #: Seconds to connect (and finish the TLS handshake).
    connect_timeout_s: float = 10.0
    #: Seconds for the receiver's TCP stack to acknowledge a written batch before it is retried.
    ack_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.host:
            raise ValueError("host is required")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if self.facility not in FACILITIES:
            raise ValueError(f"facility {self.facility!r} is not one of {', '.join(FACILITIES)}")
        for key, sev in self.severity.items():
            if key not in DEFAULT_SEVERITY:
                raise ValueError(f"severity: unknown key {key!r}; use {', '.join(DEFAULT_SEVERITY)}")
            if sev not in SEVERITIES:
                raise ValueError(f"severity.{key}: {sev!r} is not one of {', '.join(SEVERITIES)}")
        if self.transport == "tcp" and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file, cert_file and key_file need transport = 'tls'")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        for name in ("hostname", "app_name"):
            value = getattr(self, name)
            if any(not 33 <= ord(c) <= 126 for c in value):
                raise ValueError(f"{name} must be printable US-ASCII without spaces")
        if len(self.app_name) > 48 or not self.app_name:
            raise ValueError("app_name must be 1..48 characters")
        if self.enterprise_number < 1:
            raise ValueError("enterprise_number must be positive")
        if self.max_message_bytes < 480:  # RFC 5424 §6.1: receivers must take 480 octets
            raise ValueError("max_message_bytes must be at least 480")
        for name in ("replay_window_s", "connect_timeout_s", "ack_timeout_s"):
            if getattr(self, name) < 0 or (name != "replay_window_s" and not getattr(self, name)):
                raise ValueError(f"{name} must be positive")


def sd_escape(value: str) -> bytes:
    """An SD-PARAM value with ``"``, ``\\`` and ``]`` escaped (RFC 5424 §6.3.3), UTF-8."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]").encode("utf-8", "surrogatepass")


def _field(value: str, limit: int) -> bytes:
    """A header field: printable US-ASCII, at most ``limit`` characters, or NILVALUE."""
    out = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return out.encode("ascii") if out else NIL


class SyslogSink(Sink):
    """RFC 5424 over TCP/TLS with octet counting (see the module docstring for what it promises)."""

    kind = "syslog"

    def __init__(self, name: str, options: Options, state_dir: Path, base: Path) -> None:
        super().__init__(name, state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        self.port = options.port or (6514 if options.transport == "tls" else 601)
        self._facility = FACILITIES[options.facility]
        sev = {**DEFAULT_SEVERITY, **options.severity}
        self._severity = {k: SEVERITIES[v] for k, v in sev.items()}
        host = options.hostname or socket.gethostname()
        self._head = b" ".join((_field(host, 255), _field(options.app_name, 48), _field(str(os.getpid()), 128)))
        self._sd_id = f"vllm-audit@{options.enterprise_number}".encode()
        self._ctx: ssl.SSLContext | None = None
        if options.transport == "tls":
            self._ctx = _tls_context(options, base)
        self._sock: socket.socket | None = None
        #: Positions written and acknowledged by TCP but not yet committed, oldest first:
        #: ``(monotonic time acknowledged, cursor, messages sent)``.
        self._pending: list[tuple[float, Cursor, int]] = []
        #: Messages written to a connection that was then closed before their cursor was
        #: committed: the most a reconnect (or a restart) can send twice.
        self.unconfirmed_on_break = 0
        #: Messages of the batch being written (not yet in ``_pending``).
        self._inflight = 0

    # -- connection ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._sock is not None:
            return
        o = self.options
        raw = socket.create_connection((o.host, self.port), timeout=o.connect_timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock: socket.socket = raw
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(raw, server_hostname=o.server_name or o.host)
            sock.settimeout(o.ack_timeout_s)
        except BaseException:
            raw.close()
            raise
        self._sock = sock
        self._pending = []

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if self._pending and self._peer_read_everything(sock):
                self._commit(self._pending)
                self._pending = []
        except OSError:
            pass
        finally:
            self.unconfirmed_on_break += sum(n for _, _, n in self._pending) + self._inflight
            self._pending = []
            self._inflight = 0
            sock.close()

    def _peer_read_everything(self, sock: socket.socket) -> bool:
        """Half-close and wait for the receiver to close its side: proof it read every byte."""
        sock.settimeout(min(5.0, self.options.ack_timeout_s))
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock = sock.unwrap()  # close_notify both ways
            except (ssl.SSLError, OSError):
                pass
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + min(5.0, self.options.ack_timeout_s)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except (ssl.SSLError, OSError):
                return False
            if not data:
                return True
        return False

    def _peer_closed(self, sock: socket.socket) -> bool:
        """The receiver closed or reset the connection (a syslog receiver never sends data)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return sock.recv(1) == b""
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False  # TLS records that carry no data (session tickets)
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)

    def _wait_acknowledged(self, sock: socket.socket) -> None:
        """Until the receiver's TCP stack acknowledged every byte written (SIOCOUTQ is 0)."""
        buf = bytearray(4)
        deadline = time.monotonic() + self.options.ack_timeout_s
        delay = 0.0001
        while True:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0:
                return
            if self._peer_closed(sock):
                raise ConnectionError("the syslog receiver closed the connection")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the syslog receiver did not acknowledge within {self.options.ack_timeout_s}s")
            time.sleep(delay)  # the kernel has no wake-up for "acknowledged": poll, backing off
            delay = min(delay * 2, 0.01)

    # -- messages -----------------------------------------------------------------------------

    def severity(self, entry: Entry, rec: Mapping[str, object]) -> int:
        if entry.record_type == "alert":
            word = rec.get("severity")
            if isinstance(word, str) and word.lower() in _ALERT_SEVERITY and "alert" not in self.options.severity:
                return SEVERITIES[_ALERT_SEVERITY[word.lower()]]
            return self._severity["alert"]
        if entry.record_type == "inference":
            status = rec.get("status")
            return self._severity.get(f"inference.{status}", self._severity["inference"])
        return self._severity["event"]

    def message(self, entry: Entry) -> bytes:
        """The RFC 5424 message of one entry (without the octet-count frame)."""
        rec = entry.record()
        pri = self._facility * 8 + self.severity(entry, rec)
        ts = rec.get("timestamp")
        stamp = _field(ts, 64) if isinstance(ts, str) else NIL
        msgid = _field(entry.record_type or "unknown", 32)
        rid = rec.get("request_id")
        sd = b'[%b writer_id="%b" seq="%d" record_hash="%b"%b]' % (
            self._sd_id,
            sd_escape(entry.writer_id),
            entry.seq,
            entry.leaf_hex.encode(),
            b' request_id="%b"' % sd_escape(rid) if isinstance(rid, str) else b"",
        )
        body = entry.line if self.options.message_format == "stored" else orjson.dumps(to_ecs(entry))
        return b"<%d>1 %b %b %b %b %b%b" % (pri, stamp, self._head, msgid, sd, BOM, body)

    # -- delivery -----------------------------------------------------------------------------

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        if self._peer_closed(sock):
            raise ConnectionError("the syslog receiver closed the connection")
        rejected: list[tuple[Entry, str]] = []
        frames: list[bytes] = []
        limit = self.options.max_message_bytes
        for entry in entries:
            try:
                msg = self.message(entry)
            except ValueError as exc:
                rejected.append((entry, f"not a JSON record: {exc}"))
                continue
            if len(msg) > limit:
                rejected.append((entry, f"message of {len(msg)} bytes is over max_message_bytes ({limit})"))
                continue
            frames.append(b"%d %b" % (len(msg), msg))
        if frames:
            self._inflight = len(frames)
            sock.sendall(b"".join(frames))
            self._wait_acknowledged(sock)
        return rejected

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        """Deliver, then commit the newest position that has been acknowledged long enough."""
        wanted = [e for e in entries if e.record_type in self.record_types]
        sent = 0
        if wanted:
            rejected = self.deliver(writer_id, wanted)
            for entry, reason in rejected:
                ctx.quarantine(entry, reason)
            sent = len(wanted) - len(rejected)
        last = entries[-1]
        now = time.monotonic()
        self._pending.append((now, Cursor(writer_id, last.seq + 1, last.leaf_hex), sent))
        self._inflight = 0
        window = self.options.replay_window_s
        due = [p for p in self._pending if now - p[0] >= window]
        if due:
            self._commit(due)
            self._pending = self._pending[len(due) :]

    def _commit(self, done: Sequence[tuple[float, Cursor, int]]) -> None:
        latest: dict[str, Cursor] = {}
        for _, cursor, _ in done:
            latest[cursor.writer_id] = cursor
        for cursor in latest.values():
            self.cursor_file.commit(cursor)


def _tls_context(options: Options, base: Path) -> ssl.SSLContext:
    def path(p: str) -> str:
        q = Path(p)
        return str(q if q.is_absolute() else base / q)

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if options.ca_file:
            ctx.load_verify_locations(cafile=path(options.ca_file))
        if options.cert_file:
            ctx.load_cert_chain(path(options.cert_file), path(options.key_file) if options.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"syslog sink TLS files: {exc}") from None
    return ctx


def build(name: str, options: Options, env: SinkEnv) -> SyslogSink:
    return SyslogSink(name, options, env.state_dir, env.base_dir)
