"""Policies resolved from ``[privacy]``: one complete rule per (tenant, field), computed once.

Inheritance, most specific first: tenant field > tenant policy > default field > default policy >
built-in. The built-in policy is safe by default: every entity in prompts, outputs and error
messages becomes its typed tag; ``client_ip``, ``peer_ip`` and ``user_id`` are kept (they answer
"who" and "from where"); ``peer_ip`` follows the ``client_ip`` rule unless a layer names it.
Identifier fields (``classes.py``) are scanned with the policy's entity operators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vllm_audit.errors import ConfigError
from vllm_audit.privacy.config import ENTITY_TYPES, FIELDS, PolicyConfig, PrivacyConfig

BUILTIN_MODES: Mapping[str, str] = {
    "input_prompt": "redact",
    "output_response": "redact",
    "error_message": "redact",
    "client_ip": "keep",
    "peer_ip": "keep",
    "user_id": "keep",
}
DEFAULT_MASK_KEEP = 4
_KEYED_MODES = frozenset({"encrypt", "hash_only", "pseudonym"})


@dataclasses.dataclass(frozen=True, slots=True)
class FieldRule:
    """How one field of one tenant's records is stored."""

    mode: str
    keep_redacted_copy: bool
    #: Operator for every entity type.
    ops: Mapping[str, str]

    @property
    def needs_keys(self) -> bool:
        """Whether this rule needs the tenant's data key."""
        return self.mode in _KEYED_MODES or (self.mode in ("redact", "encrypt") and "pseudonym" in self.ops.values())


_TAG_ALL = FieldRule("redact", True, dict.fromkeys(ENTITY_TYPES, "tag"))


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A tenant's (or the default) resolved policy."""

    name: str
    fields: Mapping[str, FieldRule]
    key_scope: str
    mask_keep: int
    #: The rule for identifier-class fields: scanned with the policy's entity operators.
    identifiers: FieldRule = _TAG_ALL

    @property
    def needs_keys(self) -> bool:
        """Whether any field needs the tenant's data key."""
        return self.identifiers.needs_keys or any(rule.needs_keys for rule in self.fields.values())


def resolve_policy(name: str, default: PolicyConfig, tenant: PolicyConfig | None) -> Policy:
    """One complete policy from the default and (optionally) a tenant's overrides."""
    layers = [default] if tenant is None else [default, tenant]
    base_ops = dict.fromkeys(ENTITY_TYPES, "tag")
    for layer in layers:
        base_ops.update(layer.entities)
    fields: dict[str, FieldRule] = {}
    for field in FIELDS:
        mode, keep_copy = BUILTIN_MODES[field], True
        ops = dict(base_ops)
        for layer in layers:
            fc = layer.fields.get(field)
            if fc is None:
                continue
            mode = fc.mode or mode
            keep_copy = keep_copy if fc.keep_redacted_copy is None else fc.keep_redacted_copy
            ops.update(fc.entities)
        fields[field] = FieldRule(mode, keep_copy, ops)
    if not any("peer_ip" in layer.fields for layer in layers):
        fields["peer_ip"] = fields["client_ip"]  # the client_ip policy covers the TCP peer too
    scope = "tenant"
    mask_keep = DEFAULT_MASK_KEEP
    for layer in layers:
        scope = layer.key_scope or scope
        mask_keep = mask_keep if layer.mask_keep is None else layer.mask_keep
    return Policy(name, fields, scope, mask_keep, FieldRule("redact", True, base_ops))


def resolve_all(cfg: PrivacyConfig) -> tuple[Policy, dict[str, Policy]]:
    """The default policy and one policy per configured tenant; checks that keys are configured."""
    default = resolve_policy("default", cfg.default, None)
    tenants = {org: resolve_policy(org, cfg.default, pc) for org, pc in cfg.tenants.items()}
    if not cfg.key_file:
        for policy in (default, *tenants.values()):
            for field, rule in (*policy.fields.items(), ("identifiers", policy.identifiers)):
                if rule.needs_keys:
                    raise ConfigError(
                        f"[privacy] key_file is required: policy {policy.name!r} field {field!r} uses "
                        f"mode {rule.mode!r}{' with pseudonyms' if rule.mode in ('redact', 'encrypt') else ''}. "
                        "Create one with `vllm-audit privacy-keygen --key-file PATH`."
                    )
    return default, tenants
