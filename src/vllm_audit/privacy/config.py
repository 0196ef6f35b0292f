"""The ``[privacy]`` section: redaction policies per tenant and per field, and the key files.

Shape (see docs/privacy.md for a full example)::

    [privacy]
    enabled = true
    key_file = "keys/privacy-master.json"    # master key-encryption key (mode 0600)
    [privacy.default.entities]               # operator per entity type
    EMAIL = "pseudonym"
    [privacy.default.fields.input_prompt]    # mode per record field
    mode = "encrypt"
    [privacy.tenants.acme.fields.client_ip]  # a tenant overrides the default, key by key
    mode = "pseudonym"

Unset keys inherit: tenant field > tenant policy > default field > default policy > built-in
(every entity is replaced by its typed tag; prompts, outputs and errors are redacted;
``client_ip``, ``peer_ip`` and ``user_id`` are kept; identifiers such as the request id, model
name and route are scanned; see ``classes.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

#: What happens to one recognised entity inside a text.
Operator = Literal["tag", "mask", "pseudonym", "drop", "keep"]

#: What happens to one record field as a whole.
FieldMode = Literal["redact", "encrypt", "hash_only", "pseudonym", "mask", "keep", "drop"]

#: Key granularity for encryption (erasure granularity follows it).
KeyScope = Literal["tenant", "user"]

#: The record fields a policy can name (``peer_ip`` follows ``client_ip`` unless named itself);
#: every other field has a fixed privacy class (``vllm_audit.privacy.classes``).
FIELDS: tuple[str, ...] = ("input_prompt", "output_response", "error_message", "client_ip", "peer_ip", "user_id")

#: The entity types the recognizers report (and a policy can name).
ENTITY_TYPES: tuple[str, ...] = (
    "CN_ID",
    "CN_PHONE",
    "CN_LANDLINE",
    "BANK_CARD",
    "CREDIT_CARD",
    "CN_USCC",
    "CN_PASSPORT",
    "CN_HKMO_PERMIT",
    "EMAIL",
    "PHONE",
    "IP_ADDRESS",
    "US_SSN",
    "IBAN",
    "API_KEY",
    "JWT",
    "PRIVATE_KEY",
    "URL_CREDENTIALS",
)


def _check_entities(entities: Mapping[str, str]) -> None:
    for name in entities:
        if name not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {name!r}. Known: {', '.join(ENTITY_TYPES)}.")


@dataclasses.dataclass(frozen=True, slots=True)
class FieldPolicyConfig:
    """How one field is stored (``[privacy.<policy>.fields.<field>]``); unset keys inherit."""

    mode: FieldMode | None = None
    #: With ``mode = "encrypt"``: also keep a redacted copy in the field (else the field is null).
    keep_redacted_copy: bool | None = None
    #: Operator overrides for this field only.
    entities: dict[str, Operator] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_entities(self.entities)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyConfig:
    """One policy: the default one (``[privacy.default]``) or a tenant's (``[privacy.tenants.<org>]``)."""

    entities: dict[str, Operator] = dataclasses.field(default_factory=dict)
    fields: dict[str, FieldPolicyConfig] = dataclasses.field(default_factory=dict)
    #: ``"user"`` encrypts with one key per (tenant, user), so one user can be erased alone.
    key_scope: KeyScope | None = None
    #: How many trailing characters the ``mask`` operator keeps.
    mask_keep: int | None = None

    def __post_init__(self) -> None:
        _check_entities(self.entities)
        for name in self.fields:
            if name not in FIELDS:
                raise ValueError(f"unknown field {name!r}. Known: {', '.join(FIELDS)}.")
        if self.mask_keep is not None and not 0 <= self.mask_keep <= 16:
            raise ValueError(f"mask_keep must be between 0 and 16, got {self.mask_keep}.")


@dataclasses.dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """Redaction policy (``[privacy]``)."""

    enabled: bool = True
    #: Master key-encryption key (JSON, mode 0600), made by ``vllm-audit privacy-keygen``.
    #: Required when a policy pseudonymises, hashes or encrypts. Relative to the config file.
    key_file: str = ""
    #: Directory of wrapped per-tenant data keys and tombstones (default: ``<key_file>.d``).
    key_dir: str = ""
    #: How often a cached data key is checked against the key directory (erasure by another process).
    key_recheck_seconds: float = 1.0
    #: Strings longer than this are not scanned; they are stored as ``<UNREDACTABLE>`` (at least 64:
    #: the redactor keeps short strings it has seen to be clean, keys and roles, without a length check).
    max_text_chars: int = 64 * 1024 * 1024
    default: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    tenants: dict[str, PolicyConfig] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.key_recheck_seconds < 0:
            raise ValueError("key_recheck_seconds must not be negative.")
        if self.max_text_chars < 64:
            raise ValueError(f"max_text_chars must be at least 64 (got {self.max_text_chars}).")
