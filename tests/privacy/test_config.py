from __future__ import annotations

from typing import Any

import pytest

from vllm_audit.config import config_from_mapping
from vllm_audit.errors import ConfigError
from vllm_audit.privacy import build_redactor
from vllm_audit.privacy.policy import resolve_all


def parse(privacy: dict[str, Any]) -> Any:
    return config_from_mapping({"privacy": privacy}, source="audit.toml")


def test_policy_inherits_tenant_over_default() -> None:
    """Tenant keys override the default one by one; unset keys inherit."""
    cfg = parse(
        {
            "key_file": "k.json",
            "default": {"entities": {"EMAIL": "pseudonym"}, "fields": {"input_prompt": {"mode": "encrypt"}}},
            "tenants": {"acme": {"entities": {"CN_ID": "mask"}, "fields": {"client_ip": {"mode": "pseudonym"}}}},
        }
    )
    default, tenants = resolve_all(cfg.privacy)
    acme = tenants["acme"]
    assert default.fields["client_ip"].mode == "keep"
    assert acme.fields["client_ip"].mode == "pseudonym"
    assert acme.fields["input_prompt"].mode == "encrypt"
    assert acme.fields["input_prompt"].ops["EMAIL"] == "pseudonym"
    assert acme.fields["input_prompt"].ops["CN_ID"] == "mask"
    assert default.fields["output_response"].ops["CN_ID"] == "tag"


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"default": {"entities": {"CN_IDX": "tag"}}}, "unknown entity type 'CN_IDX'"),
        ({"default": {"entities": {"CN_ID": "hide"}}}, "'hide' is not one of"),
        ({"default": {"fields": {"prompt": {"mode": "redact"}}}}, "unknown field 'prompt'"),
        ({"default": {"fields": {"input_prompt": {"mode": "shred"}}}}, "'shred' is not one of"),
        ({"tenants": {"acme": {"mask_keep": 99}}}, "mask_keep must be between"),
        ({"default": {"colour": "red"}}, "unknown key 'colour'"),
        ({"tenants": {"acme": "encrypt"}}, "expected a table"),
    ],
)
def test_bad_policy_values_are_config_errors(privacy: dict[str, Any], message: str) -> None:
    """Bad policy values raise a ConfigError that names the file and the problem."""
    with pytest.raises(ConfigError, match="audit.toml") as info:
        parse(privacy)
    assert message in str(info.value)


def test_keyed_modes_need_a_key_file() -> None:
    """Pseudonyms, hashes and encryption without a key file are rejected when the redactor is built."""
    cfg = parse({"tenants": {"acme": {"fields": {"client_ip": {"mode": "pseudonym"}}}}})
    with pytest.raises(ConfigError, match="key_file is required: policy 'acme' field 'client_ip'"):
        build_redactor(cfg)
