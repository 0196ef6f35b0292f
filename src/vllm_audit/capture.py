"""What the request path hands to the writer.

The request path only fills an :class:`Exchange` (references to the raw bytes it saw, a few
timestamps and flags). :func:`vllm_audit.finalize.finalize` turns it into a schema-v1 record dict
on the writer thread. Here are also the small helpers the edge shares with the record so both
read a request the same way the upstream does: :func:`parse_json` (vLLM's parser,
``json.loads``: UTF-8/16/32 with BOM detection, ``NaN``, lone surrogates), :func:`lax_bool`
and :func:`lax_int` (pydantic's lax coercion) and :func:`normalize_path`.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson

from vllm_audit.ids import uuid7

# Outcomes (the "status" field).
OK = "ok"
CLIENT_ERROR = "client_error"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
REJECTED = "rejected"

# prompt_status values
CAPTURED = "captured"
ABSENT = "absent"
TRUNCATED = "truncated"
UNPARSED = "unparsed"
LOSSY = "lossy"

_TRUE_STR = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE_STR = frozenset({"0", "f", "false", "n", "no", "off"})


def parse_json(body: bytes) -> tuple[Any, str | None]:
    """Parse a request body as the upstream does: ``(value, None)`` or ``(None, reason)``.

    vLLM (FastAPI/starlette) calls ``json.loads`` on the raw bytes: the encoding is detected
    (UTF-8, -16, -32, with or without BOM), ``NaN``/``Infinity`` and lone surrogate escapes are
    accepted, duplicate keys keep the last value. orjson gives the same result for every body
    it accepts (strict UTF-8 JSON) and is tried first; anything else goes to ``json.loads``.
    (One difference remains: orjson reads integers beyond 64 bits as floats; vLLM rejects such
    numbers in every field it acts on.)
    """
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body), None
    except RecursionError:
        return None, "the request body is nested too deeply to parse"
    except UnicodeDecodeError:
        return None, "the request body is not UTF-8, UTF-16 or UTF-32 text"
    except ValueError as exc:
        return None, f"the request body is not valid JSON ({str(exc).split(':')[0]})"


def lax_bool(value: Any) -> bool:
    """True where pydantic's lax ``bool`` gives True (``True``, 1, 1.0, "true", "1", "yes", "on", ...)."""
    if value is True:
        return True
    if value is False or value is None:
        return False
    if type(value) is int or type(value) is float:
        return bool(value == 1)
    if isinstance(value, str):
        return value.lower() in _TRUE_STR
    return False


def lax_int(value: Any) -> int | None:
    """pydantic's lax ``int``: ints, integral floats, and strings of digits; else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def normalize_path(path: str) -> str:
    """The route a server acts on: repeated slashes collapsed, ``.`` and ``..`` segments resolved.

    ``path`` is the ASGI ``scope["path"]`` (already percent-decoded once by the server; it is
    not decoded again). Only the cheap check runs for paths already in normal form.
    """
    if "//" not in path and "/." not in path:
        return path
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    norm = "/" + "/".join(out)
    if path.endswith("/") and norm != "/":
        norm += "/"
    return norm


def encode_path(path: str) -> bytes:
    """The percent-encoded ``raw_path`` for a normalised ``path``."""
    return quote(path, safe="/:@!$&'()*+,;=~").encode("ascii")


class Exchange:
    """One request/response as the edge saw it (raw bytes, no parsing)."""

    __slots__ = (
        "record_id",
        "request_id",
        "request_id_source",
        "request_id_note",
        "started_at",
        "t0",
        "t_first",
        "t_end",
        "method",
        "route",
        "client_ip",
        "peer_ip",
        "forwarded_ignored",
        "identity",
        "request_body",
        "request_bytes",
        "request_truncated",
        "request_json",
        "request_parse_error",
        "capture_limit",
        "stream",
        "usage_injected",
        "http_status",
        "content_type",
        "chunks",
        "response_bytes",
        "response_truncated",
        "usage_chunk",
        "outcome",
        "error_type",
        "error_message",
        "upstream",
        "disconnected",
        "completed",
    )

    def __init__(self, request_id: str, method: str, route: str) -> None:
        self.record_id = uuid7()
        self.request_id = request_id
        self.request_id_source = "generated"
        self.request_id_note: str | None = None
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.method = method
        self.route = route
        self.client_ip = "unknown"
        self.peer_ip = "unknown"
        self.forwarded_ignored = False
        self.identity: Any = None
        self.request_body = b""  # the whole raw body (hashed for the record; parsed on the writer thread)
        self.request_bytes = 0
        self.request_truncated = False
        self.request_json: Any = None  # parsed on the path only when needed (stream flags)
        self.request_parse_error: str | None = None  # set with request_json when the path parsed
        self.capture_limit = 8 * 1024 * 1024  # [log] max_capture_bytes
        self.stream = False
        self.usage_injected = False
        self.http_status = 0
        self.content_type = b""
        self.chunks: list[bytes] = []
        self.response_bytes = 0
        self.response_truncated = False
        self.usage_chunk: bytes | None = None
        self.outcome: str | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.upstream: str | None = None
        self.disconnected = False
        self.completed = False

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as one tuple of its slots (batches of exchanges go to the prepare processes):
        about five times cheaper each way than the default, a state dict set slot by slot.

        Two slots travel in the form finalize reads them, which pickles for less: the response
        chunks as one bytes object (finalize joins them first), and the request body without the
        path's parse of it (``request_json``, ``request_parse_error``: finalize parses the body
        with :func:`parse_json` when they are unset, which gives what the path's parse gave;
        pickling the parsed prompt cost more than parsing it again, ~5 vs ~1 µs for 1 KB).
        """
        state = _exchange_state(self)
        if self.request_json is not None or self.request_parse_error is not None or len(self.chunks) > 1:
            slots = list(state)
            slots[_REQUEST_JSON] = slots[_REQUEST_PARSE_ERROR] = None
            if len(self.chunks) > 1:
                slots[_CHUNKS] = [b"".join(self.chunks)]
            state = tuple(slots)
        return _exchange_from_state, (state,)


_exchange_state = operator.attrgetter(*Exchange.__slots__)
_REQUEST_JSON = Exchange.__slots__.index("request_json")
_REQUEST_PARSE_ERROR = Exchange.__slots__.index("request_parse_error")
_CHUNKS = Exchange.__slots__.index("chunks")


def _slot_setter(names: tuple[str, ...]) -> Callable[[Exchange, tuple[Any, ...]], None]:
    """``set(ex, values)``: one unpacking assignment to every slot (generated from the names)."""
    for name in names:
        if not name.isidentifier():  # pragma: no cover - slot names are identifiers
            raise ValueError(name)
    src = "def set_slots(ex, values):\n    (" + ", ".join(f"ex.{n}" for n in names) + ",) = values\n"
    scope: dict[str, Any] = {}
    exec(src, scope)  # the code is built from the class's own slot names
    setter: Callable[[Exchange, tuple[Any, ...]], None] = scope["set_slots"]
    return setter


_set_exchange_state = _slot_setter(Exchange.__slots__)


def _exchange_from_state(state: tuple[Any, ...]) -> Exchange:
    ex: Exchange = object.__new__(Exchange)
    _set_exchange_state(ex, state)
    return ex


def outcome(ex: Exchange) -> str:
    """The record's ``status`` (also the edge's metrics label)."""
    if ex.outcome is not None:
        return ex.outcome
    if ex.disconnected and not ex.completed:
        return CANCELLED
    s = ex.http_status
    if 200 <= s < 400:
        return OK if ex.completed else UPSTREAM_ERROR
    if 400 <= s < 500:
        return CLIENT_ERROR
    return UPSTREAM_ERROR
