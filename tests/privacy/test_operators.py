from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from vllm_audit.privacy import operators as op
from vllm_audit.privacy.keystore import FileKeyStore, generate_master_key


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    generate_master_key(tmp_path / "master.json")
    return FileKeyStore(tmp_path / "master.json")


def test_tag_and_mask() -> None:
    """Tags name the type; masks keep the last characters and the separators."""
    assert op.tag("CN_ID") == "<CN_ID>"
    assert op.mask("138-1234-5678", "CN_PHONE", 4) == "***-****-5678"
    assert op.mask("zhang@example.com", "EMAIL", 4) == "z****@example.com"
    assert op.mask("sk-abcdef", "API_KEY", 4) == "<API_KEY>"


def test_pseudonym_stable_per_tenant_and_different_across_tenants(store: FileKeyStore) -> None:
    """The same value gives the same token within a tenant and a different one in another tenant."""
    a1 = op.pseudonym("EMAIL", "bob@example.com", store.data_key("acme").psk)
    a2 = op.pseudonym("EMAIL", "bob@example.com", store.data_key("acme").psk)
    b = op.pseudonym("EMAIL", "bob@example.com", store.data_key("globex").psk)
    assert a1 == a2 and a1 != b
    assert a1.startswith("<EMAIL:ps_") and len(a1) == len("<EMAIL:ps_>") + op.PSEUDONYM_HEX


def test_encrypt_round_trip(store: FileKeyStore) -> None:
    """An encrypted value decrypts to the same JSON value with the same request id and field."""
    value = [{"role": "user", "content": "身份证 11010519491231002X"}]
    env = op.encrypt_value(value, store.data_key("acme"), "req-1", "input_prompt")
    assert env["alg"] == "AES-256-GCM" and set(env) == {"alg", "kid", "nonce", "ct"}
    assert op.decrypt_envelope(env, store, "req-1", "input_prompt") == value


def test_encrypt_aad_binds_request_and_field(store: FileKeyStore) -> None:
    """A ciphertext moved to another record or field does not decrypt."""
    env = op.encrypt_value("secret", store.data_key("acme"), "req-1", "input_prompt")
    with pytest.raises(InvalidTag):
        op.decrypt_envelope(env, store, "req-2", "input_prompt")
    with pytest.raises(InvalidTag):
        op.decrypt_envelope(env, store, "req-1", "output_response")


def test_keyed_hash_and_mask_ip(store: FileKeyStore) -> None:
    """Keyed hashes are stable and tenant specific; IPs are truncated to their network."""
    psk = store.data_key("acme").psk
    assert op.keyed_hash("p", psk) == op.keyed_hash("p", psk) != op.keyed_hash("p", store.data_key("x").psk)
    assert op.mask_ip("203.0.113.77") == "203.0.113.0"
    assert op.mask_ip("2001:db8:1:2::5") == "2001:db8:1::"
    assert op.mask_ip("nonsense") == "<IP_ADDRESS>"
