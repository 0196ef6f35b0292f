"""Privacy: PII recognizers, redaction operators, per-tenant keys, erasure (M8, M9).

Public entry points: ``build_redactor`` (the writer calls it on every record before sealing),
``redact_text`` (scrub a string with the safe default), ``decrypt_field`` (auditor access to an
encrypted field), ``build_keystore`` and ``FileKeyStore`` / ``KeyProvider`` (envelope keys).
"""

from __future__ import annotations

from vllm_audit.privacy.keystore import DataKey, FileKeyStore, KeyErasedError, KeyNotFoundError, KeyProvider
from vllm_audit.privacy.redactor import Redactor, build_keystore, build_redactor, decrypt_field, redact_text

__all__ = [
    "DataKey",
    "FileKeyStore",
    "KeyErasedError",
    "KeyNotFoundError",
    "KeyProvider",
    "Redactor",
    "build_keystore",
    "build_redactor",
    "decrypt_field",
    "redact_text",
]
