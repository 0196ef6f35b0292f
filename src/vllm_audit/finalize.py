"""How an exchange becomes a record: the schema-v1 record dict, built on the writer thread.

:func:`finalize` reads what the request path captured in an :class:`~vllm_audit.capture.Exchange`
(references to the raw bytes, timestamps, flags): JSON parsing of the request (the prompt the
route acts on, with how completely it was kept), SSE or JSON parsing of the response (text,
finish reason, usage, model, response id). Nothing here runs on the event loop. A regular wheel
runs this module compiled (``vllm_audit.native``); it never raises: a record is never lost
because parsing failed.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Final

import orjson

from vllm_audit.access.identity import Identity
from vllm_audit.capture import ABSENT, CAPTURED, LOSSY, TRUNCATED, UNPARSED, Exchange, outcome, parse_json
from vllm_audit.record import SCHEMA_VERSION

#: The request body fields each route acts on (what the model receives); the record stores these.
PROMPT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("messages",),
    "/v1/completions": ("prompt",),
    "/v1/embeddings": ("input", "messages"),
    "/v1/responses": ("instructions", "input"),
    "/v1/messages": ("system", "messages"),
    "/v1/messages/count_tokens": ("system", "messages"),
    "/invocations": ("messages", "prompt", "input"),
    "/tokenize": ("prompt", "messages"),
    "/detokenize": ("tokens",),
    "/pooling": ("input", "messages"),
    "/classify": ("input", "messages"),
    "/score": ("text_1", "text_2", "queries", "documents"),
    "/v1/score": ("text_1", "text_2", "queries", "documents"),
    "/rerank": ("query", "documents"),
    "/v1/rerank": ("query", "documents"),
    "/v2/rerank": ("query", "documents"),
}
_DEFAULT_PROMPT_FIELDS: Final = ("messages", "prompt", "input")

_SURROGATE: Final = re.compile("[" + chr(0xD800) + "-" + chr(0xDFFF) + "]")  # lone surrogates (no literal: mypyc)

def finalize(ex: Exchange) -> dict[str, Any]:
    """Build the schema-v1 record for one exchange (writer thread)."""
    try:
        return _finalize(ex)
    except Exception as exc:  # never lose a record because parsing failed
        rec = _base(ex)
        rec["capture_error"] = f"{type(exc).__name__} while parsing the exchange"
        return rec


_iso_cache: tuple[int, str] = (-1, "")


def _iso(ts: float) -> str:
    """``2026-11-25T01:02:03.456Z`` (UTC, ms); the per-second prefix is cached (hot path)."""
    global _iso_cache
    sec = int(ts)
    ms = int((ts - sec) * 1000)
    cached_sec, prefix = _iso_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_cache = (sec, prefix)
    return f"{prefix}.{ms:03d}Z"


#: The identity fields of a record, per caller: ``(user_id, org_id, auth_status, auth_method,
#: key_id, quota_subject, roles, failure_reason)``. ``quota_subject`` hashes three strings and an
#: identity is frozen, so the fields are computed once per distinct identity (bounded: cleared
#: when full). Callers that pass something other than an ``Identity`` take the getattr path.
_IDENT_CACHE: Final[dict[Any, tuple[Any, ...]]] = {}
_IDENT_CACHE_MAX: Final = 4096


def _identity_fields(ident: Any) -> tuple[Any, ...]:
    cacheable = type(ident) is Identity
    if cacheable:
        try:
            got = _IDENT_CACHE.get(ident)
        except TypeError:  # a field that is not hashable (roles given as a list): not cached
            cacheable = False
        else:
            if got is not None:
                return got
    fields = (
        getattr(ident, "user_id", "anonymous"),
        getattr(ident, "org_id", "unknown"),
        getattr(ident, "auth_status", "anonymous"),
        getattr(ident, "auth_method", "none"),
        getattr(ident, "key_id", None),
        # One-way hashes naming the caller's quota counters (from the raw identity, so charging
        # from the redacted record charges the caller the check counted).
        getattr(ident, "quota_subject", None),
        tuple(getattr(ident, "roles", ())),
        getattr(ident, "failure_reason", None),
    )
    if cacheable:
        if len(_IDENT_CACHE) >= _IDENT_CACHE_MAX:
            _IDENT_CACHE.clear()
        _IDENT_CACHE[ident] = fields
    return fields


def _base(ex: Exchange) -> dict[str, Any]:
    user_id, org_id, auth_status, auth_method, key_id, quota, roles, failure = _identity_fields(ex.identity)
    t_end = ex.t_end if ex.t_end is not None else time.perf_counter()
    rec: dict[str, Any] = {
        "record_type": "inference",
        "schema_version": SCHEMA_VERSION,
        "timestamp": _iso(ex.started_at),
        "record_id": ex.record_id,
        "request_id": ex.request_id,
        "request_id_source": ex.request_id_source,
        "client_ip": ex.client_ip,
        "peer_ip": ex.peer_ip,
        "forwarded_ignored": ex.forwarded_ignored,
        "user_id": user_id,
        "org_id": org_id,
        "auth_status": auth_status,
        "auth_method": auth_method,
        "key_id": key_id,
        "quota_subject": dict(quota) if type(quota) is dict else quota,  # each record owns its dict
        "roles": list(roles),
        "method": ex.method,
        "route": ex.route,
        "model_name": None,
        "model_revision": None,
        "response_id": None,
        "stream": ex.stream,
        "http_status": ex.http_status,
        "status": outcome(ex),
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "usage_source": None,
        "latency_ms": round((t_end - ex.t0) * 1000.0, 3),
        "ttft_ms": round((ex.t_first - ex.t0) * 1000.0, 3) if ex.t_first is not None and ex.stream else None,
        "input_prompt": None,
        "output_response": None,
        "prompt_sha256": None,
        "prompt_status": ABSENT,
        "prompt_error": None,
        "request_body_sha256": hashlib.sha256(ex.request_body).hexdigest(),
        "request_bytes": ex.request_bytes,
        "response_bytes": ex.response_bytes,
        "request_truncated": ex.request_truncated,
        "response_truncated": ex.response_truncated,
        "upstream": ex.upstream,
        "error_type": ex.error_type,
        "error_message": ex.error_message,
    }
    if failure:
        rec["error_message"] = rec["error_message"] or failure
        rec["error_type"] = rec["error_type"] or "authentication_error"
    if ex.request_id_note:
        rec["notes"] = [ex.request_id_note]
    return rec


def _finalize(ex: Exchange) -> dict[str, Any]:
    rec = _base(ex)
    _apply_request(ex, rec)

    if ex.chunks:
        body = ex.chunks[0] if len(ex.chunks) == 1 else b"".join(ex.chunks)
        if ex.content_type.find(b"text/event-stream") >= 0:  # not `in`: see _single_string
            _parse_sse(body, ex.usage_chunk, rec)
        elif ex.content_type.find(b"json") >= 0 and not ex.response_truncated:
            _parse_json_response(body, rec)
    elif ex.usage_chunk:
        _parse_sse(b"", ex.usage_chunk, rec)
    return rec


def _apply_request(ex: Exchange, rec: dict[str, Any]) -> None:
    """The prompt the route acts on, with ``prompt_status`` saying how completely it was kept."""
    if not ex.request_body:
        return
    req, error = ex.request_json, ex.request_parse_error
    if req is None and error is None:
        req, error = parse_json(ex.request_body)
    if error is not None or not isinstance(req, dict):
        rec["prompt_status"] = UNPARSED
        rec["prompt_error"] = error or "the request body is not a JSON object"
        return
    lossy = False
    model = req.get("model")
    if isinstance(model, str):
        rec["model_name"], lossy = _clean_str(model)
    fields = PROMPT_FIELDS.get(rec["route"], _DEFAULT_PROMPT_FIELDS)
    present = [f for f in fields if f in req]
    if not present:
        return
    prompt: Any = req[present[0]] if len(present) == 1 else {f: req[f] for f in present}
    try:
        prompt, changed = _clean(prompt)
    except RecursionError:
        rec["prompt_status"] = UNPARSED
        rec["prompt_error"] = "the prompt is nested too deeply to store"
        return
    lossy = lossy or changed
    status = CAPTURED
    limit = ex.capture_limit
    if len(ex.request_body) > limit:
        # A big body may be padding around a small prompt: measure the prompt itself.
        size = len(prompt.encode("utf-8")) if isinstance(prompt, str) else len(orjson.dumps(prompt))
        if size > limit:
            text = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode("utf-8")
            prompt = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
            status = TRUNCATED
            rec["request_truncated"] = True
            rec["prompt_error"] = f"the prompt ({size} bytes) was cut to [log] max_capture_bytes ({limit})"
    if lossy and status == CAPTURED:
        status = LOSSY
        rec["prompt_error"] = "lone surrogate escapes in the request were stored as U+FFFD"
    rec["input_prompt"] = prompt
    rec["prompt_status"] = status


def _clean_str(value: str) -> tuple[str, bool]:
    if value.isascii():
        return value, False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value), True
    return value, False


def _clean(value: Any) -> tuple[Any, bool]:
    """Replace lone surrogates (valid in ``json.loads`` output, not storable as UTF-8) with U+FFFD."""
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, list):
        changed = False
        out = []
        for item in value:
            item, c = _clean(item)
            changed = changed or c
            out.append(item)
        return (out, True) if changed else (value, False)
    if isinstance(value, dict):
        changed = False
        d: dict[str, Any] = {}
        for k, v in value.items():
            k2, ck = _clean_str(k) if isinstance(k, str) else (k, False)
            v2, cv = _clean(v)
            changed = changed or ck or cv
            d[k2] = v2
        return (d, True) if changed else (value, False)
    if isinstance(value, float) and (value != value or value in (_INF, -_INF)):
        return None, True  # NaN / Infinity (json.loads accepts them): JSON has no value for them
    return value, False


_INF: Final = float("inf")


def _apply_usage(usage: Any, rec: dict[str, Any], source: str) -> None:
    if not isinstance(usage, dict):
        return
    pt = usage.get("prompt_tokens", usage.get("input_tokens"))
    ct = usage.get("completion_tokens", usage.get("output_tokens"))
    tt = usage.get("total_tokens")
    if isinstance(pt, int):
        rec["prompt_tokens"] = pt
    if isinstance(ct, int):
        rec["completion_tokens"] = ct
    if isinstance(tt, int):
        rec["total_tokens"] = tt
    elif isinstance(pt, int) and isinstance(ct, int):
        rec["total_tokens"] = pt + ct
    rec["usage_source"] = source


def _apply_meta(obj: dict[str, Any], rec: dict[str, Any]) -> None:
    rid = obj.get("id")
    if isinstance(rid, str) and rec["response_id"] is None:
        rec["response_id"] = rid
    model = obj.get("model")
    if isinstance(model, str):
        rec["model_name"] = rec["model_name"] or model
        rec.setdefault("served_model", model)
    fp = obj.get("system_fingerprint")
    if isinstance(fp, str):
        rec["model_revision"] = fp


def _parse_json_response(body: bytes, rec: dict[str, Any]) -> None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(obj, dict):
        return
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        rec["error_type"] = rec["error_type"] or (str(err.get("type")) if err.get("type") else "error")
        rec["error_message"] = rec["error_message"] or (str(msg)[:2000] if msg is not None else None)
        return
    if isinstance(obj.get("detail"), str | list) and rec["http_status"] >= 400:
        rec["error_type"] = rec["error_type"] or "error"
        rec["error_message"] = rec["error_message"] or str(obj["detail"])[:2000]
    _apply_meta(obj, rec)
    _apply_usage(obj.get("usage"), rec, "response")
    choices = obj.get("choices")
    if isinstance(choices, list) and choices:
        texts: list[Any] = []
        reasons: list[str] = []
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            msg = ch.get("message")
            if isinstance(msg, dict):
                text: Any = msg.get("content")
                if msg.get("tool_calls"):
                    text = {"content": text, "tool_calls": msg["tool_calls"]}
                texts.append(text)
            else:
                texts.append(ch.get("text"))
            fr = ch.get("finish_reason")
            if isinstance(fr, str):
                reasons.append(fr)
        rec["output_response"] = texts[0] if len(texts) == 1 else texts
        rec["finish_reason"] = reasons[0] if len(reasons) == 1 else (reasons or None)
        return
    if obj.get("object") == "list" and isinstance(obj.get("data"), list):
        data = obj["data"]
        if data and isinstance(data[0], dict) and "embedding" in data[0]:
            emb = data[0]["embedding"]
            dims = len(emb) if isinstance(emb, list) else None
            rec["output_response"] = {"embeddings": len(data), "dimensions": dims}
        return
    if obj.get("object") == "response":  # /v1/responses
        _apply_responses_output(obj, rec)


def _apply_responses_output(obj: dict[str, Any], rec: dict[str, Any]) -> None:
    texts: list[str] = []
    for item in obj.get("output") or []:
        if isinstance(item, dict):
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    rec["output_response"] = "".join(texts)
    status = obj.get("status")
    if isinstance(status, str):
        rec["finish_reason"] = status
    _apply_usage(obj.get("usage"), rec, "response")


def _sse_payloads(body: bytes) -> list[bytes]:
    """The non-empty ``data:`` values of an event stream, ``[DONE]`` left out (whitespace stripped).

    The lines are those a ``^data:([^\n]*)`` multi-line regex finds; splitting at newlines in C
    costs a fifth of that regex, which tried its anchor at every byte of the stream.
    """
    out: list[bytes] = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:].strip()
            if value and value != b"[DONE]":
                out.append(value)
    return out


def _load_events(payloads: list[bytes]) -> list[Any]:
    """Parse every event with one orjson call (one JSON array); fall back event by event."""
    if not payloads:
        return []
    try:
        events: list[Any] = orjson.loads(b"[" + b",".join(payloads) + b"]")
        return events
    except orjson.JSONDecodeError:
        out = []
        for p in payloads:
            try:
                out.append(orjson.loads(p))
            except orjson.JSONDecodeError:
                continue
        return out


#: How many events in a row may be parsed whole (no template yet, or none that they match) before
#: the rest of the stream is parsed as ``_load_events`` does (one orjson call for all of it).
_TEMPLATE_SEARCH: Final = 4
#: Put in a template's place of content to find where the content literal stands (a string no
#: chunk holds: it is written ``"\u0000..."``, and a template holding it anyway is no template).
_SENTINEL: Final = "\x00vllm-audit template content\x00"
_SENTINEL_JSON: Final = b'"\\u0000vllm-audit template content\\u0000"'


def _template_split(obj: Any, drop_role: bool = False) -> tuple[bytes, bytes, dict[str, Any]] | None:
    """``(head, tail, template)`` when a chunk parsed to ``obj`` can be a template: ``head + <a
    JSON string> + tail`` is then the compact JSON (what orjson writes) of ``obj`` with one
    choice, its first, whose delta holds that string as its content (``/v1/completions`` chunks,
    which have no delta: as its ``text``); ``template`` is ``obj``.

    ``drop_role``: a delta's ``role`` is left out of the template (``template`` is then ``obj``
    without it). A stream's first chunk carries the role (``{"role":"assistant","content":""}``)
    and the chunks after it do not: the first chunk's template without its role is theirs, so
    the first content chunk need not be parsed whole to become one.

    JSON is context-free: such bytes parse to that object, which does to a record only what
    appending the string to choice 0 does, and what ``obj`` does otherwise (its meta, already
    applied) — when ``obj`` has no usage, and its first choice is of index 0 and without a finish
    reason (both would be applied again by each such chunk).
    """
    if type(obj) is not dict or obj.get("usage"):
        return None
    choices = obj.get("choices")
    if type(choices) is not list or not choices:
        return None
    ch = choices[0]
    if type(ch) is not dict or ch.get("finish_reason") is not None:
        return None
    if type(ch.get("index")) is not int or ch["index"] != 0:
        return None
    # The chunk with the sentinel for its text (a chat delta's content, or a completion's text:
    # what the record reads when there is no delta object): what stands before and after the
    # sentinel stands before and after the text of every chunk that differs from it in its text only.
    delta = ch.get("delta")
    template: dict[str, Any] = obj
    if type(delta) is dict:
        if drop_role and "role" in delta:
            delta = {k: v for k, v in delta.items() if k != "role"}
            template = {**obj, "choices": [{**ch, "delta": delta}]}
        marked_choice = {**ch, "delta": {**delta, "content": _SENTINEL}}
    else:
        marked_choice = {**ch, "text": _SENTINEL}
    marked = orjson.dumps({**obj, "choices": [marked_choice]})
    parts = marked.split(_SENTINEL_JSON)
    if len(parts) != 2:
        return None  # another field holds the sentinel
    head, tail = parts
    return head, tail, template


#: Where a stream is cut: before each event that follows a blank line (how vLLM frames them).
_EVENT_SEP: Final = b"\n\ndata: "


def _load_stream(body: bytes) -> list[Any]:
    """The events of a stream; runs of chunks that match a template chunk as ``(texts, template)``.

    Most of a chat stream is chunks that differ from each other in their text only. Parsing each
    into its four dicts was most of a stream's finalize; here each chunk parsed whole that is a
    template (:func:`_template_split`) becomes the one later chunks are matched against. The body
    is cut before each ``data: `` that follows a blank line: a piece that is exactly
    ``<head><one JSON string><tail>`` (what vLLM writes for each content chunk) is kept as that
    string's literal, and a run of them is decoded by one orjson call (:meth:`_Stream.texts`);
    any other piece is read line by line as :func:`_sse_payloads` reads it (:meth:`_Stream.line`),
    where a payload with the template's bytes around one JSON string is still taken as that
    string. Cutting there only drops empty lines, which carry no payload. After
    ``_TEMPLATE_SEARCH`` events in a row parsed whole (tool calls, ``/v1/responses`` events, a
    server whose chunks differ in more than their text) the rest is parsed as
    :func:`_load_events` does.
    """
    s = _Stream()
    parts = body.split(_EVENT_SEP)
    pending: list[bytes] = []  # the literals of the current run of template lines
    parts[-1] = parts[-1].rstrip(b"\n")  # the last event's blank line (only empty lines go)
    for k, part in enumerate(parts):
        if k and s.template is not None and part.startswith(s.head) and part.endswith(s.tail):
            piece = part[len(s.head) : len(part) - len(s.tail)]
            if _single_string(piece):  # so the part is one line (and head and tail do not overlap)
                pending.append(piece)
                continue
        if pending:
            s.texts(pending)
            pending = []
        lines = (_EVENT_SEP[2:] + part if k else part).split(b"\n")
        for j, line in enumerate(lines):
            if not s.line(line, True):
                rest = b"\n".join(lines[j:]) + _EVENT_SEP + _EVENT_SEP.join(parts[k + 1 :])
                return s.out + _load_events(_sse_payloads(rest))
    if pending:
        s.texts(pending)
    return s.out


def _single_string(piece: bytes) -> bool:
    """Whether ``piece`` is one JSON string token without raw control characters: ``"``, then
    characters and escape pairs, then ``"`` (so also no line break: the piece is on one line).

    Escapes are not checked further (``\\x``, a lone surrogate), nor UTF-8: a token orjson does
    not read makes the one orjson call over its run fail, and the run is then read line by line.
    A loop over the bytes: short literals, and ``in`` on bytes first tries its operand as an int
    (a TypeError raised and cleared, ~2,000 instructions).
    """
    last = len(piece) - 1
    if last < 1 or piece[0] != 34 or piece[last] != 34:  # 34: '"'
        return False
    i = 1
    while i < last:
        c = piece[i]
        if c == 92:  # a backslash escapes the next byte (a run of them pairs up from its left end)
            i += 2
        elif c == 34 or c < 32:  # a quote would end the string early; control characters are no JSON
            return False
        else:
            i += 1
    return i == last  # i == last + 1: the closing quote is escaped


class _Stream:
    """What :func:`_load_stream` has read so far: the events, and the template chunks match."""

    def __init__(self) -> None:
        self.out: list[Any] = []
        self.template: dict[str, Any] | None = None
        self.head = b""
        self.tail = b""
        self.whole = 0  # events parsed whole since the last one taken as a template's text

    def line(self, line: bytes, limit: bool) -> bool:
        """Take one line as :func:`_sse_payloads` and :func:`_load_events` would; ``False`` (only
        with ``limit``) when ``_TEMPLATE_SEARCH`` events in a row were parsed whole: the line is
        left for the caller to parse with the rest."""
        if not line.startswith(b"data:"):
            return True
        p = line[5:].strip()
        if not p or p == b"[DONE]":
            return True
        template = self.template
        if template is not None and p.startswith(self.head) and p.endswith(self.tail):
            try:
                piece = orjson.loads(p[len(self.head) : len(p) - len(self.tail)])
            except orjson.JSONDecodeError:
                piece = None
            if type(piece) is str:
                self.out.append(([piece], template))
                self.whole = 0
                return True
        if limit and self.whole >= _TEMPLATE_SEARCH:
            return False
        self.whole += 1
        try:
            obj = orjson.loads(p)
        except orjson.JSONDecodeError:
            return True
        self.out.append(obj)
        # The stream's first template leaves a role out (the chunks after the role chunk have
        # none); a later one keeps it (a server that repeats the role in every chunk).
        split = _template_split(obj, self.template is None)
        if split is not None:
            self.head, self.tail, self.template = split
        return True

    def texts(self, pieces: list[bytes]) -> None:
        """Take a run of template lines, given as their string literals (one token each)."""
        template = self.template
        try:
            texts = orjson.loads(b"[" + b",".join(pieces) + b"]")
        except orjson.JSONDecodeError:  # one string orjson refuses: each line read as any other
            for piece in pieces:
                self.line(_EVENT_SEP[2:] + self.head + piece + self.tail, False)
            return
        self.out.append((texts, template))
        self.whole = 0


def _parse_sse(body: bytes, usage_chunk: bytes | None, rec: dict[str, Any], fast: bool = True) -> None:
    """Fill ``rec`` from an event stream (and the usage chunk the edge took out of it).

    ``fast=False`` parses every event whole (no template chunks): the reference the fast path
    is tested against.
    """
    texts: dict[int, list[str]] = {}  # pieces per choice index other than 0
    first: list[str] = []  # pieces of choice 0 (most streams have no other)
    add_first = first.append
    reasons: dict[int, str] = {}
    events = _load_stream(body) if fast else _load_events(_sse_payloads(body))
    injected = _load_events(_sse_payloads(usage_chunk)) if usage_chunk else []
    meta_done = False
    last_obj: dict[str, Any] | None = None
    for obj in events:
        if type(obj) is tuple:  # chunks like a template: their texts, the rest as in the template
            pieces, last_obj = obj
            first.extend(pieces)
            continue
        if type(obj) is not dict:
            continue
        choices = obj.get("choices")
        if choices:
            last_obj = obj
            if not meta_done:
                _apply_meta(obj, rec)
                meta_done = True
            for ch in choices:
                if type(ch) is not dict:
                    continue
                idx = ch.get("index", 0)
                if type(idx) is not int:
                    idx = 0
                delta = ch.get("delta")
                piece = delta.get("content") if type(delta) is dict else ch.get("text")
                if type(piece) is str and piece:
                    if idx == 0:
                        add_first(piece)
                    else:
                        bucket = texts.get(idx)
                        if bucket is None:
                            texts[idx] = [piece]
                        else:
                            bucket.append(piece)
                fr = ch.get("finish_reason")
                if fr is not None and type(fr) is str:
                    reasons[idx] = fr
            usage = obj.get("usage")
            if usage:
                _apply_usage(usage, rec, "stream")
            continue
        fp = obj.get("system_fingerprint")
        if isinstance(fp, str):  # vLLM's usage-only chunk (choices: []) carries it when usage is on
            rec["model_revision"] = fp
        if "error" in obj and isinstance(obj["error"], dict):
            err = obj["error"]
            rec["error_type"] = rec["error_type"] or str(err.get("type") or "error")
            rec["error_message"] = rec["error_message"] or str(err.get("message"))[:2000]
            continue
        etype = obj.get("type")
        if isinstance(etype, str) and etype.startswith("response."):  # /v1/responses events
            if etype == "response.output_text.delta" and isinstance(obj.get("delta"), str):
                add_first(obj["delta"])
            elif etype in ("response.completed", "response.incomplete", "response.failed"):
                resp = obj.get("response")
                if isinstance(resp, dict):
                    _apply_meta(resp, rec)
                    _apply_usage(resp.get("usage"), rec, "stream")
                    if isinstance(resp.get("status"), str):
                        rec["finish_reason"] = resp["status"]
            continue
        if not meta_done:
            _apply_meta(obj, rec)
            meta_done = True
        usage = obj.get("usage")
        if usage:
            _apply_usage(usage, rec, "stream")
    if last_obj is not None and rec["model_revision"] is None:
        fp = last_obj.get("system_fingerprint")
        if isinstance(fp, str):
            rec["model_revision"] = fp
    for obj in injected:
        if type(obj) is dict:
            if not meta_done:
                _apply_meta(obj, rec)
                meta_done = True
            fp = obj.get("system_fingerprint")
            if isinstance(fp, str):
                rec["model_revision"] = fp
            if obj.get("usage"):
                _apply_usage(obj["usage"], rec, "injected")
    if first:
        text = "".join(first)  # empty pieces add nothing: choice 0 has a text when one is not empty
        if text:
            texts[0] = [text]
    if texts:
        joined = ["".join(texts[i]) for i in sorted(texts)]
        rec["output_response"] = joined[0] if len(joined) == 1 else joined
    if reasons:
        rs = [reasons[i] for i in sorted(reasons)]
        rec["finish_reason"] = rs[0] if len(rs) == 1 else rs
