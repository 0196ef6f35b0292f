"""The ``elasticsearch`` sink: ECS documents through the ``_bulk`` API (Elasticsearch or OpenSearch).

Each entry becomes one ECS document (:func:`vllm_audit.sinks.ecs.to_ecs`) with ``_id`` = its
record hash (the leaf hash, hex), so a replay after a crash or an outage never duplicates: with
``op_type = "create"`` (the default, and the only choice for a data stream) a replayed document
answers 409 ``version_conflict_engine_exception`` and is counted as already there; with
``"index"`` it overwrites itself with the same bytes.

The index is a date pattern applied to the record's own timestamp (UTC), ``vllm-audit-%Y.%m.%d``
by default, or a data stream name (``data_stream = true``: the name is used as it is, documents
need ``@timestamp``, which ECS gives them).

Per-item results of a bulk answer: 2xx = stored; 409 on ``create`` = already stored; 400 (mapping
or parsing refused: ``mapper_parsing_exception``, ``document_parsing_exception`` ...) and 413 =
quarantined with the error type and reason; 429 and 5xx (and anything else) = the batch is retried
later from the cursor (the documents already stored answer 409 then). A request the cluster
refuses whole with 413 is bisected until the offending documents are alone; any other refusal of
the whole request (400 "no handler found" for a wrong URL, 401, 403 ...) blames the setup, not
the data, and is retried, never quarantined. A document larger than ``max_request_bytes`` is
quarantined without being sent.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import orjson

from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.base import Sink
from vllm_audit.ship.config import Secret
from vllm_audit.sinks._http import HttpClient, Response, TransientError, parse_retry_after
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

log = logging.getLogger("vllm_audit.sinks.elastic")

#: Item statuses that blame the document: quarantine it.
BAD_DOCUMENT = frozenset({400, 413})


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "elasticsearch"``: ECS documents into Elasticsearch or OpenSearch with ``_bulk``."""

    #: Base URL of the cluster (a path prefix is kept, e.g. behind a proxy).
    url: str = "http://127.0.0.1:9200"
    #: Target index: a ``strftime`` pattern applied to the record's timestamp (UTC), or the data
    #: stream's name when ``data_stream`` is true.
    index: str = "vllm-audit-%Y.%m.%d"
    #: Write into the data stream named by ``index`` (``create`` actions, no date pattern).
    data_stream: bool = False
    #: Bulk action: ``create`` (a replayed document answers 409 and is skipped) or ``index``
    #: (a replay overwrites the document with the same content).
    op_type: Literal["create", "index"] = "create"
    #: Ingest pipeline to run on each document (empty: none).
    pipeline: str = ""
    #: Basic authentication user (with ``password``).
    username: str = ""
    #: Basic authentication password.
    password: Secret | None = None
    #: API key (the base64 ``encoded`` form Elasticsearch returns), sent as ``Authorization: ApiKey``.
    api_key: Secret | None = None
    #: CA bundle (PEM) to verify an https cluster (empty: the system store).
    ca_file: str = ""
    #: Seconds to wait for a bulk answer.
    timeout_s: float = 30.0
    #: Largest bulk request body; bigger batches are split, a bigger single document is quarantined.
    max_request_bytes: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.data_stream and self.op_type != "create":
            raise ValueError('a data stream takes only op_type = "create"')
        sample = datetime(2026, 1, 2, tzinfo=UTC).strftime(self.index) if not self.data_stream else self.index
        if not sample or sample != sample.lower() or sample.startswith(("_", "-", "+")) or "/" in sample:
            raise ValueError(f"index {self.index!r}: names are lower case, without '/', not starting with _, - or +")
        if (self.username == "") != (self.password is None):
            raise ValueError("username and password go together")
        if self.api_key is not None and self.password is not None:
            raise ValueError("choose one of api_key or username/password")


class ElasticSink(Sink):
    kind = "elasticsearch"

    def __init__(self, name: str, options: Options, env: SinkEnv) -> None:
        super().__init__(name, env.state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        where = f"sinks.{name}"
        self._ca = str(env.path(options.ca_file)) if options.ca_file else ""
        HttpClient(options.url, timeout_s=options.timeout_s, ca_file=self._ca, where=f"{where} url")  # check it
        headers = {"Content-Type": "application/x-ndjson", "Accept": "application/json"}
        if options.password is not None:
            secret = options.password.resolve(f"{where} password")
            token = base64.b64encode(f"{options.username}:{secret}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        elif options.api_key is not None:
            headers["Authorization"] = f"ApiKey {options.api_key.resolve(f'{where} api_key')}"
        self.headers = headers
        self.path = "/_bulk" + (f"?pipeline={quote(options.pipeline, safe='')}" if options.pipeline else "")
        self._client: HttpClient | None = None
        self._indices: dict[str, str] = {}
        #: Replayed documents the cluster already had (409 on ``create``): the dedupe at work.
        self.already_there = 0
        #: Bulk requests sent (splits and bisection included).
        self.requests = 0

    def open(self) -> None:
        if self._client is None:
            self._client = HttpClient(
                self.options.url, timeout_s=self.options.timeout_s, ca_file=self._ca, where=f"sinks.{self.name} url"
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- encoding -------------------------------------------------------------------------------

    def index_for(self, timestamp: object) -> str:
        """The index of a document whose ``@timestamp`` is ``timestamp`` (cached per day string)."""
        if self.options.data_stream or "%" not in self.options.index:
            return self.options.index
        utc = isinstance(timestamp, str) and timestamp.endswith("Z")
        day = timestamp[:10] if utc and isinstance(timestamp, str) else ""
        idx = self._indices.get(day) if utc else None
        if idx is None:
            try:
                dt = datetime.fromisoformat(timestamp).astimezone(UTC) if isinstance(timestamp, str) else None
            except ValueError:
                dt = None
            idx = (dt or datetime.now(UTC)).strftime(self.options.index)
            if dt is not None and utc and len(self._indices) < 1000:
                self._indices[day] = idx
        return idx

    def encode(self, entry: Entry) -> bytes:
        """The two NDJSON lines (action, document) of one entry."""
        from vllm_audit.sinks.ecs import to_ecs

        doc = to_ecs(entry)
        action = {self.options.op_type: {"_index": self.index_for(doc.get("@timestamp")), "_id": entry.leaf_hex}}
        return orjson.dumps(action) + b"\n" + orjson.dumps(doc) + b"\n"

    # -- delivery -------------------------------------------------------------------------------

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        rejected: list[tuple[Entry, str]] = []
        limit = self.options.max_request_bytes
        chunk: list[Entry] = []
        lines: list[bytes] = []
        size = 0
        for entry in entries:
            data = self.encode(entry)
            if len(data) > limit:
                rejected.append((entry, f"document of {len(data)} bytes exceeds max_request_bytes ({limit})"))
                continue
            if size + len(data) > limit and chunk:
                rejected += self._bulk(chunk, lines)
                chunk, lines, size = [], [], 0
            chunk.append(entry)
            lines.append(data)
            size += len(data)
        if chunk:
            rejected += self._bulk(chunk, lines)
        rejected.sort(key=lambda r: r[0].seq)
        return rejected

    def _bulk(self, entries: list[Entry], lines: list[bytes]) -> list[tuple[Entry, str]]:
        if self._client is None:
            self.open()
        assert self._client is not None
        self.requests += 1
        resp = self._client.request("POST", self.path, b"".join(lines), self.headers)
        if resp.status == 413:
            if len(entries) == 1:
                return [(entries[0], f"bulk request refused ({resp.status}): {_error_text(resp)}")]
            mid = len(entries) // 2
            return self._bulk(entries[:mid], lines[:mid]) + self._bulk(entries[mid:], lines[mid:])
        if resp.status == 429 or resp.status >= 500:
            raise TransientError(
                f"bulk request answered {resp.status}: {_error_text(resp)}",
                parse_retry_after(resp.headers.get("retry-after")),
            )
        if resp.status != 200:
            raise TransientError(f"bulk request answered {resp.status}: {_error_text(resp)}")
        try:
            answer = orjson.loads(resp.body)
            items = answer["items"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise TransientError(f"bulk answer is not a bulk response: {resp.text(200)!r}") from None
        if not isinstance(items, list) or len(items) != len(entries):
            got = len(items) if isinstance(items, list) else "no"
            raise TransientError(f"bulk answer has {got} items for {len(entries)} documents")
        if not answer.get("errors"):
            return []
        return self._items(entries, items)

    def _items(self, entries: list[Entry], items: list[Any]) -> list[tuple[Entry, str]]:
        rejected: list[tuple[Entry, str]] = []
        retry: list[str] = []
        for entry, item in zip(entries, items, strict=True):
            result: Any = next(iter(item.values()), {}) if isinstance(item, dict) and item else {}
            status = result.get("status", 0) if isinstance(result, dict) else 0
            if 200 <= status < 300:
                continue
            error = result.get("error") if isinstance(result, dict) else None
            if status == 409 and self.options.op_type == "create":
                self.already_there += 1
                continue
            reason = _item_error(error)
            if status in BAD_DOCUMENT:
                rejected.append((entry, f"{status} {reason}"[:2000]))
            else:
                retry.append(f"{entry.key}: {status} {reason}")
        if retry:
            raise TransientError(f"{len(retry)} document(s) to retry, first: {retry[0][:300]}")
        return rejected


def _item_error(error: Any) -> str:
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict):
            text += f" (caused by {cause.get('type', '')}: {cause.get('reason', '')})"
        return text
    return str(error)


def _error_text(resp: Response) -> str:
    try:
        body = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return resp.text(300)
    if isinstance(body, dict) and isinstance(body.get("error"), dict | str):
        return _item_error(body["error"])[:500]
    return resp.text(300)


def build(name: str, options: Options, env: SinkEnv) -> ElasticSink:
    return ElasticSink(name, options, env)
