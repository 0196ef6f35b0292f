"""A minimal, blocking NATS client for the collector's JetStream pull consumer.

nats-py's pull subscription costs more CPU per message than the collector's verification and
store together (a task, a future and a ``wait_for`` per message, headers parsed character by
character): end to end the collector reached 17,000 records per CPU-second through it. The
collector is single-threaded and synchronous, so this client speaks the NATS protocol over one
blocking socket and does only what a pull consumer needs:

* ``CONNECT`` (headers on, no echo) to the first server of the list that answers, ``PING``/``PONG``;
  ``nats://`` and ``tls://`` URLs (TLS also when the server requires it), ``user:password@`` in the
  URL;
* one wildcard inbox subscription ``_INBOX.<id>.*``: JetStream API replies and pull-request status
  messages come back on ``<inbox>.<token>``, pulled messages on their stream subject with an
  ``$JS.ACK.…`` reply subject;
* ``request`` (JetStream API calls), ``pull`` (``$JS.API.CONSUMER.MSG.NEXT``) and ``publish_many``
  (acknowledgements: one socket write for a whole batch).

Failures raise :class:`NatsError`; the collector's loop closes the source and opens it again
(with backoff), and JetStream redelivers whatever was delivered and not acknowledged.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlsplit

import orjson

#: Bytes read from the socket at a time.
_READ = 1 << 20


class NatsError(Exception):
    """The connection failed, or the server refused something (the message says what)."""


@dataclasses.dataclass(slots=True)
class Delivery:
    """One message delivered by a pull request: subject, raw header block, payload, ack subject."""

    subject: bytes
    headers: bytes
    data: bytes
    reply: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int
    tls: bool
    user: str
    password: str


def parse_server(url: str) -> Server:
    """``nats://[user:pass@]host[:port]``, ``tls://…`` or ``host[:port]``."""
    u = urlsplit(url if "://" in url else f"nats://{url}")
    if u.scheme not in ("nats", "tls") or not u.hostname:
        raise ValueError(f"NATS server {url!r} is not a nats://host:port or tls://host:port URL")
    try:
        port = u.port or 4222
    except ValueError as exc:
        raise ValueError(f"NATS server {url!r}: {exc}") from None
    return Server(u.hostname, port, u.scheme == "tls", unquote(u.username or ""), unquote(u.password or ""))


def header_value(headers: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in a ``NATS/1.0`` header block (None when absent)."""
    key = b"\r\n" + name + b":"
    i = headers.find(key)
    if i < 0:
        return None
    j = headers.find(b"\r\n", i + len(key))
    return headers[i + len(key) : j if j >= 0 else len(headers)].strip()


def status_of(headers: bytes) -> bytes:
    """The status code of an inline status message (``NATS/1.0 408 …``), b"" for a plain header block."""
    line = headers[: headers.find(b"\r\n")] if b"\r\n" in headers else headers
    parts = line.split(None, 2)
    return parts[1] if len(parts) > 1 else b""


class Connection:
    """One connection to one server of ``servers`` (see the module docstring)."""

    def __init__(self, servers: Sequence[str], *, name: str, connect_timeout: float) -> None:
        self.servers = [parse_server(s) for s in servers]
        if not self.servers:
            raise ValueError("no NATS servers configured")
        self.name = name
        self.connect_timeout = connect_timeout
        self.inbox = b"_INBOX." + secrets.token_hex(11).encode()
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._buf = bytearray()
        self._pos = 0
        self._token = 0
        self._next_server = 0
        #: Messages received for pull requests and not yet handed out.
        self.delivered: list[Delivery] = []
        #: Replies on ``<inbox>.<token>``: token → (header block, payload).
        self.replies: dict[bytes, tuple[bytes, bytes]] = {}
        self._pongs = 0
        self.server = ""

    # -- connecting ----------------------------------------------------------------------------

    def connect(self) -> None:
        errors = []
        n = len(self.servers)
        for k in range(n):
            srv = self.servers[(self._next_server + k) % n]
            try:
                self._connect(srv)
            except (OSError, NatsError, ssl.SSLError) as exc:
                self.close()
                errors.append(f"{srv.host}:{srv.port}: {exc}")
                continue
            self._next_server = (self._next_server + k + 1) % n
            self.server = f"{srv.host}:{srv.port}"
            return
        self._next_server = (self._next_server + 1) % n
        raise NatsError("no NATS server reachable (" + "; ".join(errors) + ")")

    def _connect(self, srv: Server) -> None:
        sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (srv.host, srv.port), timeout=self.connect_timeout
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf, self._pos = sock, bytearray(), 0
        deadline = time.monotonic() + self.connect_timeout
        line = self._control_line(deadline)
        if not line.startswith(b"INFO "):
            raise NatsError(f"server did not greet with INFO: {line[:80]!r}")
        info = orjson.loads(line[5:])
        if not info.get("headers", False):
            raise NatsError("the server does not support message headers (NATS ≥ 2.2 needed)")
        if srv.tls or info.get("tls_required"):
            if self._pos != len(self._buf):
                raise NatsError("unexpected bytes before the TLS handshake")
            ctx = ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=srv.host)
            self._sock = sock
        opts: dict[str, object] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "echo": False,
            "protocol": 1,
            "lang": "python/vllm-audit",
            "version": "1",
            "name": self.name,
            "tls_required": srv.tls or bool(info.get("tls_required")),
        }
        if srv.user:
            opts["user"], opts["pass"] = srv.user, srv.password
        self._send(b"CONNECT " + orjson.dumps(opts) + b"\r\nPING\r\nSUB " + self.inbox + b".* 1\r\n")
        self._pongs = 0
        while self._pongs == 0:
            self._pump(deadline, raise_on_timeout=True)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self._buf, self._pos = bytearray(), 0
        self.delivered.clear()
        self.replies.clear()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- sending -------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise NatsError("not connected")
        try:
            sock.settimeout(self.connect_timeout)
            sock.sendall(data)
        except OSError as exc:
            raise NatsError(f"send to {self.server or 'server'} failed: {exc}") from None

    def new_token(self) -> bytes:
        self._token += 1
        return b"%d" % self._token

    def publish(self, subject: bytes, payload: bytes, reply: bytes = b"") -> None:
        self._send(b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload))

    def publish_many(self, subjects: Iterable[bytes], payload: bytes) -> None:
        """The same payload to each subject, in one write (acknowledgements)."""
        head = b" %d\r\n%s\r\nPUB " % (len(payload), payload)
        parts = head.join(subjects)
        if parts:
            self._send(b"PUB " + parts + head[:-4])

    def flush(self, timeout: float) -> None:
        """Wait until the server has processed everything sent so far (PING → PONG)."""
        before = self._pongs
        self._send(b"PING\r\n")
        deadline = time.monotonic() + timeout
        while self._pongs == before:
            self._pump(deadline, raise_on_timeout=True)

    def request(self, subject: str, payload: bytes, timeout: float) -> tuple[bytes, bytes]:
        """Publish with a reply subject on the inbox and wait for the reply (header block, payload)."""
        token = self.new_token()
        self.publish(subject.encode(), payload, self.inbox + b"." + token)
        deadline = time.monotonic() + timeout
        while token not in self.replies:
            self._pump(deadline, raise_on_timeout=True)
        hdr, data = self.replies.pop(token)
        if status_of(hdr) == b"503":
            raise NatsError(f"no responders for {subject} (JetStream not available, or no such stream)")
        return hdr, data

    # -- receiving -----------------------------------------------------------------------------

    def wait(self, deadline: float, token: bytes, want: int) -> bool:
        """Read until a reply on ``token`` arrived or ``want`` messages are delivered, or the deadline.

        True when the reply arrived (it stays in ``replies``)."""
        while token not in self.replies and len(self.delivered) < want:
            if not self._pump(deadline, raise_on_timeout=False):
                break
        return token in self.replies

    def drain_ready(self) -> None:
        """Take in whatever the socket holds now, without waiting."""
        self._pump(0.0, raise_on_timeout=False)

    def _control_line(self, deadline: float) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._pos)
            if i >= 0:
                line = bytes(self._buf[self._pos : i])
                self._pos = i + 2
                return line
            if not self._read(deadline):
                raise NatsError(f"no answer from {self.server or 'server'} in time")

    def _read(self, deadline: float) -> bool:
        """Append what the socket has to the buffer; False when nothing came before ``deadline``."""
        sock = self._sock
        if sock is None:
            raise NatsError("not connected")
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                sock.setblocking(False)
            else:
                sock.settimeout(remaining)
            data = sock.recv(_READ)
        except (BlockingIOError, TimeoutError, ssl.SSLWantReadError):
            return False
        except OSError as exc:
            raise NatsError(f"connection to {self.server or 'server'} failed: {exc}") from None
        if not data:
            raise NatsError(f"connection to {self.server or 'server'} closed")
        self._buf += data
        return True

    def _pump(self, deadline: float, *, raise_on_timeout: bool) -> bool:
        """Read once (until ``deadline``) and parse every complete frame; False when nothing came."""
        if not self._read(deadline):
            if raise_on_timeout:
                raise NatsError(f"no answer from {self.server or 'server'} in time")
            return False
        buf = self._buf
        pos = self._pos
        end = len(buf)
        prefix = self.inbox + b"."
        out = self.delivered
        while pos < end:
            i = buf.find(b"\r\n", pos)
            if i < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"HMSG" or op[:3] == b"MSG":
                args = bytes(buf[pos:i]).split()
                has_hdr = args[0] == b"HMSG"
                total = int(args[-1])
                hlen = int(args[-2]) if has_hdr else 0
                if i + 2 + total + 2 > end:
                    break  # the payload is not complete yet
                body = i + 2
                hdr = bytes(buf[body : body + hlen])
                data = bytes(buf[body + hlen : body + total])
                pos = body + total + 2
                subject = args[1]
                reply = args[3] if len(args) == (6 if has_hdr else 5) else b""
                if subject.startswith(prefix):
                    self.replies[subject[len(prefix) :]] = (hdr, data)
                else:
                    out.append(Delivery(subject, hdr, data, reply))
                continue
            line = bytes(buf[pos:i])
            pos = i + 2
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line == b"PONG":
                self._pongs += 1
            elif line.startswith(b"-ERR"):
                self._pos = pos
                raise NatsError(f"server error: {line[5:].decode(errors='replace').strip()}")
            # +OK and INFO (cluster updates) need nothing
        self._pos = pos
        return True
