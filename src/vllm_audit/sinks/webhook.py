"""The ``webhook`` sink: each batch as one HTTPS POST, HMAC-signed, with an idempotency key.

The body is a JSON array of the batch's records (``body_format = "json"``) or one record per line
(``"ndjson"``); records are the stored lines as they are (``record_format = "stored"``: each
carries ``writer_id``, ``seq`` and ``prev``) or their ECS view (``"ecs"``: ``vllm_audit.*`` carries
them, ``event.id`` is the record hash). Headers:

- ``X-Vllm-Audit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`` keyed by the
  configured secret — the receiver recomputes it, compares in constant time and refuses old ``t``
  (replays);
- ``Idempotency-Key: <writer_id>:<first seq>..<writer_id>:<last seq>`` — a retried batch carries
  the same key (the receiver answers 2xx without storing it again);
- ``X-Vllm-Audit-Count``: the number of records.

Answers: 2xx = delivered (the cursor moves). 5xx, 408, 429, a redirect and connection errors are
transient: the runner retries the same batch (honouring ``Retry-After``); so are 401, 403, 404,
405 and 407, which refuse every batch alike (a wrong secret or URL: fix the config, nothing is
dropped meanwhile). Any other 4xx (400, 413, 422 ...) refuses the batch for good: the sink splits
it in halves and sends each again until the refused entries are alone; a refused single entry is
quarantined with the status and the start of the answer, and the entries around it are delivered.

What dedupes: a retried batch (same key). What may duplicate: after a crash between the
receiver's 2xx and the cursor commit, the batch is sent again from the cursor — with the same key
when the log held the same entries then, otherwise with different bounds; receivers that need
exactly once dedupe per record by ``writer_id`` + ``seq`` (or the record hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import orjson

from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.base import Sink
from vllm_audit.ship.config import Secret
from vllm_audit.sinks._http import HttpClient, TransientError, parse_retry_after
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

SIGNATURE_HEADER = "X-Vllm-Audit-Signature"
#: 4xx answers that say nothing about the entries: a timeout, too many requests, or a receiver that
#: refuses every batch (wrong secret, wrong URL, a proxy wanting credentials). Retried (and shown
#: in the sink's status), never quarantined: quarantining would drop the whole log on a typo.
_TRANSIENT_4XX = (401, 403, 404, 405, 407, 408, 421, 425, 429)


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "webhook"``: HTTPS POST of each batch, HMAC-SHA256 signed."""

    #: Where batches are POSTed (``https://...``; ``http://`` only on a trusted network).
    url: str = ""
    #: HMAC-SHA256 key of the signature header: ``{ env = "NAME" }`` or ``{ file = "/path" }``.
    secret: Secret | None = None
    #: "json": a JSON array of records; "ndjson": one record per line.
    body_format: Literal["json", "ndjson"] = "json"
    #: "stored": each record as stored in the log; "ecs": its Elastic Common Schema view.
    record_format: Literal["stored", "ecs"] = "stored"
    #: CA bundle the server's certificate must chain to (empty: the system store).
    ca_file: str = ""
    #: Extra request headers (not secrets: the config file is not a secret store).
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Seconds for one request (connect, send, answer).
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.url.startswith(("https://", "http://")):
            raise ValueError("url must be an https:// (or http://) URL")
        if self.secret is None:
            raise ValueError('secret is required (the HMAC key: { env = "NAME" } or { file = "/path" })')
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        reserved = {"content-type", "idempotency-key", SIGNATURE_HEADER.lower(), "x-vllm-audit-count", "host"}
        for name in self.headers:
            if name.lower() in reserved:
                raise ValueError(f"headers: {name!r} is set by the sink")


def signature(key: bytes, body: bytes, t: int) -> str:
    """The ``X-Vllm-Audit-Signature`` value of ``body`` sent at unix time ``t``."""
    mac = hmac.new(key, b"%d." % t + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def idempotency_key(entries: Sequence[Entry]) -> str:
    return f"{entries[0].key}..{entries[-1].key}"


class WebhookSink(Sink):
    """POSTs batches; bisects a refused batch down to the refused entries (module docstring)."""

    kind = "webhook"

    def __init__(self, name: str, options: Options, state_dir: Path, key: bytes, ca_file: str) -> None:
        super().__init__(name, state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        self._key = key
        self._client = HttpClient(options.url, timeout_s=options.timeout_s, ca_file=ca_file, where=f"sinks.{name} url")
        self._ctype = "application/json" if options.body_format == "json" else "application/x-ndjson"
        #: Requests sent (retries and bisection included).
        self.requests = 0

    def close(self) -> None:
        self._client.close()

    def body(self, entries: Sequence[Entry]) -> bytes:
        if self.options.record_format == "stored":
            lines = [e.line for e in entries]
        else:
            lines = [orjson.dumps(to_ecs(e)) for e in entries]
        if self.options.body_format == "ndjson":
            return b"\n".join(lines) + b"\n"
        return b"[" + b",".join(lines) + b"]"

    def _post(self, entries: Sequence[Entry]) -> tuple[int, str]:
        """POST one batch: ``(0, "")`` when accepted, ``(status, answer)`` when refused for good."""
        body = self.body(entries)
        headers = {
            **self.options.headers,
            "Content-Type": self._ctype,
            "User-Agent": "vllm-audit",
            "Idempotency-Key": idempotency_key(entries),
            "X-Vllm-Audit-Count": str(len(entries)),
            SIGNATURE_HEADER: signature(self._key, body, int(time.time())),
        }
        self.requests += 1
        resp = self._client.request("POST", "", body, headers)
        status = resp.status
        if 200 <= status < 300:
            return 0, ""
        if status >= 500 or status in _TRANSIENT_4XX or 300 <= status < 400 or status < 200:
            raise TransientError(
                f"{self.options.url}: HTTP {status}: {resp.text(200)}",
                parse_retry_after(resp.headers.get("retry-after")),
            )
        return status, resp.text(300)

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        rejected: list[tuple[Entry, str]] = []
        todo = [list(entries)]
        while todo:
            part = todo.pop()
            status, answer = self._post(part)
            if not status:
                continue
            if len(part) == 1:
                rejected.append((part[0], f"HTTP {status}: {answer}"))
                continue
            mid = len(part) // 2
            todo += [part[mid:], part[:mid]]  # the first half is sent first: order holds
        return rejected


def build(name: str, options: Options, env: SinkEnv) -> WebhookSink:
    assert options.secret is not None
    key = options.secret.resolve(f"sinks.{name} secret").encode()
    if not key:
        raise ConfigError(f"sinks.{name} secret: the key is empty.")
    ca = str(env.path(options.ca_file)) if options.ca_file else ""
    return WebhookSink(name, options, env.state_dir, key, ca)
