"""A privacy class for every stored field of an inference record; the default policy covers them all.

=============  ==========================================================================
class          what the redactor does (built-in policy)
=============  ==========================================================================
content        prompts, outputs, error text: the field's policy mode (``redact``: every
               entity replaced by its operator's output, values split across message parts
               or messages included)
network        ``client_ip`` and ``peer_ip``: the ``client_ip`` policy (``peer_ip`` follows it
               unless configured on its own); built-in: kept
subject        ``user_id``: its policy mode; built-in: kept (who made the request)
tenant         ``org_id``: kept (it selects the tenant's policy and scopes every read)
identifier     strings a client or an upstream chose (request id, model name, route, roles,
               finish reason ...): scanned, every entity replaced by the policy's operator
operational    values the server computes (sequence numbers, hashes, counters, enums,
               timestamps, envelopes): stored as they are
=============  ==========================================================================

A field the table does not name (a field added to the schema later, or an unexpected key) is
scanned as an ``identifier``: the strictest class that keeps the record usable.
``tests/privacy/test_classes.py`` walks the published JSON Schema and fails on a property
without a class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

PrivacyClass = Literal["content", "network", "subject", "tenant", "identifier", "operational"]

#: Class of a field the table does not name.
DEFAULT_CLASS: PrivacyClass = "identifier"

_OPERATIONAL = (
    "seq", "prev", "writer_id", "org_tag", "record_type", "schema_version", "timestamp", "record_id",
    "request_id_source", "forwarded_ignored", "auth_status", "stream", "http_status", "status",
    "prompt_tokens", "completion_tokens", "total_tokens", "usage_source", "latency_ms", "ttft_ms",
    "prompt_sha256", "prompt_status", "request_body_sha256", "request_bytes", "response_bytes", "request_truncated",
    "response_truncated", "redaction", "input_prompt_enc", "output_response_enc", "error_message_enc",
    "client_ip_enc", "peer_ip_enc", "user_id_enc",
    "upstream",  # the configured upstream URL: server configuration, not request data
    "quota_subject",  # one-way hashes computed by the server (they link one caller's records, like key_id)
)  # fmt: skip
_IDENTIFIER = (
    "request_id", "response_id", "key_id", "roles", "auth_method", "method", "route", "model_name",
    "served_model", "model_revision", "finish_reason", "error_type", "notes", "capture_error",
    "prompt_error",
)  # fmt: skip

FIELD_CLASSES: Mapping[str, PrivacyClass] = {
    "input_prompt": "content",
    "output_response": "content",
    "error_message": "content",
    "client_ip": "network",
    "peer_ip": "network",
    "user_id": "subject",
    "org_id": "tenant",
    **dict.fromkeys(_IDENTIFIER, "identifier"),
    **dict.fromkeys(_OPERATIONAL, "operational"),
}


def field_class(name: str) -> PrivacyClass:
    """The privacy class of a record field (``identifier`` for a field the table does not name)."""
    return FIELD_CLASSES.get(name, DEFAULT_CLASS)
