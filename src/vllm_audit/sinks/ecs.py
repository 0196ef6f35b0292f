"""Elastic Common Schema (ECS 8.x) view of a log entry: :func:`to_ecs`.

The file sink writes it one object per line, the Elasticsearch sink indexes it, the syslog sink
can carry it as its MSG. ``docs/field-map.md`` lists every record field with its ECS name (and its
OpenTelemetry GenAI name).

The shape, for every record type:

- ``@timestamp`` (the record's own ``timestamp``), ``ecs.version``, ``message`` (a short summary);
- ``event``: ``kind`` (``event``; ``alert`` for alerts), ``category``, ``type``, ``outcome``,
  ``action``, ``dataset`` (``vllm_audit.<record type>``), ``module``, ``sequence`` (the seq), and
  ``id`` = the entry's leaf hash (the record hash: the idempotency key downstream);
- the mapped ECS fields (``client.ip``, ``source.ip``, ``user.*``, ``organization.id``,
  ``http.*``, ``url.path``, ``gen_ai.*``, ``error.*``, ``rule.*`` ...), ``labels``;
- ``vllm_audit``: ``writer_id``, ``seq``, ``prev``, ``leaf_hash``, ``record_type`` and every
  original field that was not mapped (``input_prompt``, ``output_response``, ``redaction``,
  ``*_enc`` envelopes, ``notes``, event ``detail`` ...), under its own name. Nothing of the record
  is dropped.

ECS types are respected: ``client.ip`` / ``source.ip`` are ``ip`` fields, so a value that is not an
IP address (a pseudonym written by the privacy policy) stays in ``vllm_audit.client_ip`` /
``vllm_audit.peer_ip`` instead. Records are already redacted (invariant 3): this is a view of the
stored bytes, it adds nothing the log does not hold.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

from vllm_audit.integrity.codec import Entry

ECS_VERSION = "8.11.0"

#: Inference ``status`` → ECS ``event.outcome``.
OUTCOME = {
    "ok": "success",
    "client_error": "failure",
    "upstream_error": "failure",
    "timeout": "failure",
    "rejected": "failure",
    "cancelled": "unknown",
}

#: Inference ``status`` → the second ECS ``event.type`` value (after ``access``).
_STATUS_TYPE = {
    "ok": "allowed",
    "rejected": "denied",
    "client_error": "error",
    "upstream_error": "error",
    "timeout": "error",
    "cancelled": "end",
}

#: Event name → (ECS ``event.category``, ``event.type``).
EVENT_KINDS: dict[str, tuple[list[str], list[str]]] = {
    "writer_started": (["process"], ["start"]),
    "writer_resumed": (["process"], ["start"]),
    "writer_stopped": (["process"], ["end"]),
    "recovery": (["process"], ["error"]),
    "audit_read": (["web"], ["access"]),
    "key_added": (["iam"], ["creation"]),
    "key_revoked": (["iam"], ["deletion"]),
    "key_list": (["iam"], ["access"]),
    "key_admin_denied": (["iam"], ["denied"]),
    "privacy.erase": (["configuration"], ["deletion"]),
    "privacy.decrypt": (["configuration"], ["access"]),
}

#: Alert severity words → ECS ``event.severity`` (the numbers Elastic detection rules use).
SEVERITY = {"low": 21, "medium": 47, "high": 73, "critical": 99}

#: Route suffix → OpenTelemetry ``gen_ai.operation.name``.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
)

_HEADER = ("seq", "prev", "writer_id", "record_type")


@functools.lru_cache(maxsize=4096)
def _ip_of(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _ip(value: Any) -> str | None:
    """``value`` as a normalised IP address, or None when it is not one (e.g. a pseudonym)."""
    return _ip_of(value) if isinstance(value, str) and value else None


def operation_name(route: Any) -> str | None:
    """The GenAI operation (``chat``, ``text_completion``, ``embeddings``) a route serves, or None."""
    if not isinstance(route, str):
        return None
    for suffix, op in _OPERATIONS:
        if route.endswith(suffix):
            return op
    return None


def _nn(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """A dict of the pairs whose value is not None."""
    return {k: v for k, v in pairs if v is not None}


#: Inference fields always consumed by the mapping (the conditional ones are added per record).
_INFERENCE_USED = frozenset(
    (
        "status", "user_id", "roles", "org_id", "method", "request_id", "request_bytes",
        "response_bytes", "model_name", "served_model", "response_id", "finish_reason", "prompt_tokens",
        "completion_tokens", "error_type", "error_message", "auth_status", "auth_method", "request_id_source",
    )
)  # fmt: skip
_LABELS = ("status", "auth_status", "auth_method", "request_id_source")


def _inference(rec: dict[str, Any], out: dict[str, Any], used: set[str]) -> None:
    get = rec.get
    status = get("status")
    event = out["event"]
    event["kind"] = "event"
    event["category"] = ["web"]
    if isinstance(status, str):
        event["type"] = ["access", _STATUS_TYPE.get(status, "info")]
        event["outcome"] = OUTCOME.get(status, "unknown")
    else:
        event["type"] = ["access", "info"]
        event["outcome"] = "unknown"
    event["action"] = "inference"
    latency = get("latency_ms")
    if latency.__class__ is float or latency.__class__ is int:
        event["duration"] = int(latency * 1_000_000)  # ECS: nanoseconds
    used.update(_INFERENCE_USED)

    client = _ip(get("client_ip"))
    if client is not None:
        out["client"] = {"ip": client}
        used.add("client_ip")
    peer = _ip(get("peer_ip"))
    if peer is not None:
        out["source"] = {"ip": peer}
        used.add("peer_ip")

    roles = get("roles")
    user = _nn((("id", get("user_id")), ("roles", roles if isinstance(roles, list) else None)))
    if user:
        out["user"] = user
    org = get("org_id")
    if org is not None:
        out["organization"] = {"id": org}

    http: dict[str, Any] = {}
    request = _nn((("method", get("method")), ("id", get("request_id")), ("bytes", get("request_bytes"))))
    if request:
        http["request"] = request
    code = get("http_status")
    response = _nn((("bytes", get("response_bytes")),))
    if code.__class__ is int and code > 0:  # 0: the client left before any response
        response["status_code"] = code
        used.add("http_status")
    if response:
        http["response"] = response
    if http:
        out["http"] = http
    route = get("route")
    if isinstance(route, str):
        out["url"] = {"path": route}
        used.add("route")

    gen_ai: dict[str, Any] = {}
    op = operation_name(route)
    if op is not None:
        gen_ai["operation"] = {"name": op}
    model = get("model_name")
    if model is not None:
        gen_ai["request"] = {"model": model}
    finish = get("finish_reason")
    resp = _nn(
        (
            ("model", get("served_model")),
            ("id", get("response_id")),
            ("finish_reasons", [finish] if isinstance(finish, str) else finish if isinstance(finish, list) else None),
        )
    )
    if resp:
        gen_ai["response"] = resp
    usage = _nn((("input_tokens", get("prompt_tokens")), ("output_tokens", get("completion_tokens"))))
    if usage:
        gen_ai["usage"] = usage
    if gen_ai:
        out["gen_ai"] = gen_ai

    error = _nn((("type", get("error_type")), ("message", get("error_message"))))
    if error:
        out["error"] = error

    labels = out["labels"]
    for key in _LABELS:
        value = get(key)
        if isinstance(value, str):
            labels[key] = value
    out["message"] = f"{get('method', '')} {route or ''} {code if code is not None else ''} {status}" + (
        f" model={model}" if isinstance(model, str) else ""
    )


def _actor(rec: dict[str, Any], out: dict[str, Any]) -> None:
    actor = rec.get("actor")
    if not isinstance(actor, Mapping):
        return
    user: dict[str, Any] = {}
    uid = actor.get("user_id")
    if isinstance(uid, str):
        user["id"] = uid
    elif isinstance(actor.get("os_user"), str):
        user["name"] = actor["os_user"]
    if isinstance(actor.get("roles"), list):
        user["roles"] = actor["roles"]
    if user:
        out["user"] = user
    if isinstance(actor.get("org_id"), str):
        out["organization"] = {"id": actor["org_id"]}


def _event(rec: dict[str, Any], out: dict[str, Any], used: set[str]) -> None:
    name = rec.get("event")
    event = out["event"]
    event["kind"] = "event"
    category, types = EVENT_KINDS.get(name, ([], ["info"])) if isinstance(name, str) else ([], ["info"])
    if category:
        event["category"] = list(category)
    event["type"] = list(types)
    if isinstance(name, str):
        event["action"] = name
        used.add("event")
    outcome = rec.get("outcome")
    if name == "key_admin_denied" or outcome == "denied":
        event["outcome"] = "failure"
    elif isinstance(outcome, str):
        event["outcome"] = "success" if outcome in ("ok", "success", "allowed") else "unknown"
    _actor(rec, out)  # the actor stays whole in vllm_audit.actor too
    if isinstance(rec.get("org_id"), str) and "organization" not in out:
        out["organization"] = {"id": rec["org_id"]}
        used.add("org_id")
    code = rec.get("http_status")
    if isinstance(code, int) and code > 0:
        out["http"] = {"response": {"status_code": code}}
        used.add("http_status")
    if isinstance(rec.get("endpoint"), str):
        out["url"] = {"path": rec["endpoint"]}
        used.add("endpoint")
    out["message"] = f"event {name}"


def _alert(rec: dict[str, Any], out: dict[str, Any], used: set[str]) -> None:
    event = out["event"]
    event["kind"] = "alert"
    event["category"] = ["intrusion_detection"]
    event["type"] = ["indicator"]
    rule: dict[str, Any] = {}
    raw_rule = rec.get("rule")
    if isinstance(raw_rule, str):
        rule["name"] = raw_rule
        used.add("rule")
    elif isinstance(raw_rule, Mapping):
        for key in ("id", "name", "description"):
            if isinstance(raw_rule.get(key), str):
                rule[key] = raw_rule[key]
    if rule:
        out["rule"] = rule
        event["action"] = rule.get("name") or rule.get("id")
    else:
        event["action"] = "alert"
    severity = rec.get("severity")
    if isinstance(severity, int) and not isinstance(severity, bool):
        event["severity"] = severity
    elif isinstance(severity, str) and severity.lower() in SEVERITY:
        event["severity"] = SEVERITY[severity.lower()]
        out["labels"]["severity"] = severity.lower()
    reason = rec.get("reason", rec.get("message"))
    if isinstance(reason, str):
        event["reason"] = reason
    for key in ("user_id", "org_id"):
        value = rec.get(key)
        if isinstance(value, str):
            if key == "user_id":
                out["user"] = {"id": value}
            else:
                out["organization"] = {"id": value}
            used.add(key)
    out["message"] = f"alert {event['action']}" + (f": {reason}" if isinstance(reason, str) else "")


def record_to_ecs(rec: dict[str, Any], leaf_hex: str) -> dict[str, Any]:
    """The ECS document of a parsed record (with its header fields) whose leaf hash is ``leaf_hex``."""
    rtype = rec.get("record_type")
    rtype = rtype if isinstance(rtype, str) and rtype else "unknown"
    out: dict[str, Any] = {}
    ts = rec.get("timestamp")
    if isinstance(ts, str):
        out["@timestamp"] = ts
    out["ecs"] = {"version": ECS_VERSION}
    event: dict[str, Any] = {
        "id": leaf_hex,
        "dataset": f"vllm_audit.{rtype}",
        "module": "vllm_audit",
    }
    if isinstance(rec.get("seq"), int):
        event["sequence"] = rec["seq"]
    out["event"] = event
    out["labels"] = {"record_type": rtype}
    used: set[str] = {"timestamp"} if isinstance(ts, str) else set()
    if rtype == "inference":
        _inference(rec, out, used)
    elif rtype == "alert":
        _alert(rec, out, used)
    else:
        _event(rec, out, used)
    meta: dict[str, Any] = {key: rec[key] for key in _HEADER if key in rec}
    meta["leaf_hash"] = leaf_hex
    for key, value in rec.items():
        if key not in used and key not in meta:
            meta[key] = value
    out["vllm_audit"] = meta
    return out


def to_ecs(entry: Entry) -> dict[str, Any]:
    """The ECS document of one log entry (``event.id`` = its record hash, see the module docstring)."""
    return record_to_ecs(entry.record(), entry.leaf_hex)
