"""Alerts leave the detector three ways: appended to the log, counted, and (optionally) POSTed.

An alert is an entry of the tamper-evident log with ``record_type: "alert"`` (fields:
docs/detection.md); ``verify`` covers it and the sinks ship it like any record. The webhook gets
the same JSON with ``X-Vllm-Audit-Signature: sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>``,
``X-Vllm-Audit-Timestamp`` and ``Idempotency-Key: <alert_id>`` (a receiver dedupes retries by it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import orjson

log = logging.getLogger("vllm_audit.detect")

Emit = Callable[[list[dict[str, Any]]], None]
"""Append alert entries to the log durably (raise when they could not be written)."""


def finalize(value: float, template: bytes) -> dict[str, Any]:
    """The alert entry from a queued template and the value the shared state decided on."""
    entry: dict[str, Any] = orjson.loads(template)
    entry["value"] = round(value, 4)
    reason = entry.get("reason")
    if isinstance(reason, str) and "{value}" in reason:
        entry["reason"] = reason.replace("{value}", f"{value:.0f}")
    return entry


def log_emitter(config: Any) -> Emit:
    """Append through :func:`vllm_audit.writer.append_events`: a writer slot of this process's own."""
    from vllm_audit.writer import append_events

    def emit(entries: list[dict[str, Any]]) -> None:
        if entries:
            append_events(config, entries)

    return emit


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The webhook signature header value for ``body`` sent at ``timestamp``."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class Webhook:
    """POSTs each alert, HMAC-signed, retrying 3 times with backoff; failures are counted, never raised."""

    def __init__(self, url: str, key: bytes, *, timeout_s: float = 5.0, attempts: int = 4) -> None:
        self.url = url
        self.key = key
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.sent = 0
        self.failed = 0

    def post(self, alerts: Sequence[dict[str, Any]]) -> None:
        for alert in alerts:
            if self._post_one(alert):
                self.sent += 1
            else:
                self.failed += 1

    def _post_one(self, alert: dict[str, Any]) -> bool:
        body = orjson.dumps(alert)
        delay = 0.2
        for attempt in range(self.attempts):
            ts = str(int(time.time()))
            req = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "X-Vllm-Audit-Timestamp": ts,
                    "X-Vllm-Audit-Signature": sign(self.key, ts, body),
                    "Idempotency-Key": str(alert.get("alert_id", "")),
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        return True
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    log.warning("alert webhook refused alert %s: HTTP %d", alert.get("alert_id"), exc.code)
                    return False
            except (OSError, ValueError) as exc:
                log.debug("alert webhook attempt %d failed: %s", attempt + 1, exc)
            if attempt + 1 < self.attempts:
                time.sleep(delay)  # backoff between retries (this is the detector's own thread)
                delay *= 2
        log.warning("alert webhook gave up on alert %s after %d attempts", alert.get("alert_id"), self.attempts)
        return False
