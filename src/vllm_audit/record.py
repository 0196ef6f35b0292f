"""Audit record schema v1: version, published JSON Schema, and the prompt hash.

The JSON Schema ships in the package (``vllm_audit/schema/audit-record-v1.json``); every record
written validates against it. ``docs/data-model.md`` explains each field.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from typing import Any

import orjson

SCHEMA_VERSION = 1
SCHEMA_FILE = "audit-record-v1.json"


@cache
def json_schema() -> dict[str, Any]:
    """The published JSON Schema of an inference record (schema v1)."""
    text = resources.files("vllm_audit.schema").joinpath(SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def prompt_sha256(input_prompt: Any) -> str | None:
    """SHA-256 over the stored (already redacted) prompt, as compact sorted-key JSON.

    It is computed after redaction, so it commits to what is stored, never to raw PII; the
    same prompt template sent by many users still hashes the same.
    """
    if input_prompt is None:
        return None
    if isinstance(input_prompt, str):
        data = input_prompt.encode("utf-8", "surrogatepass")
    else:
        data = orjson.dumps(input_prompt, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()
