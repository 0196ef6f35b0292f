from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_audit.errors import KeyFileError
from vllm_audit.privacy import operators as op
from vllm_audit.privacy.keystore import FileKeyStore, KeyErasedError, generate_master_key


def test_master_key_file_is_0600_and_group_readable_is_refused(tmp_path: Path) -> None:
    """privacy-keygen writes mode 0600; a key file readable by group or others is refused."""
    path = tmp_path / "master.json"
    generate_master_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="accessible by group or others"):
        FileKeyStore(path)


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing key file is never overwritten by accident."""
    generate_master_key(tmp_path / "m.json")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_master_key(tmp_path / "m.json")


def test_data_keys_persist_and_differ_per_tenant(tmp_path: Path) -> None:
    """A tenant's key is created once and found again by another store instance."""
    generate_master_key(tmp_path / "m.json")
    a = FileKeyStore(tmp_path / "m.json").data_key("acme")
    b = FileKeyStore(tmp_path / "m.json").data_key("acme")
    assert a.kid == b.kid and a.dek == b.dek
    assert FileKeyStore(tmp_path / "m.json").data_key("globex").kid != a.kid
    assert "dek" not in repr(a) and a.dek.hex() not in repr(a)


def test_erase_makes_decrypt_fail_and_leaves_tombstone(tmp_path: Path) -> None:
    """After erasure the envelope no longer decrypts, a tombstone remains and new data gets a new key."""
    generate_master_key(tmp_path / "m.json")
    store = FileKeyStore(tmp_path / "m.json", recheck_s=0)
    key = store.data_key("acme")
    env = op.encrypt_value("secret prompt", key, "r1", "input_prompt")
    other = op.encrypt_value("other tenant", store.data_key("globex"), "r2", "input_prompt")
    tombs = FileKeyStore(tmp_path / "m.json").erase("acme")  # another process
    assert [t.kid for t in tombs] == [key.kid]
    assert not (store.key_dir / "keys" / f"{key.kid}.json").exists()
    assert (store.key_dir / "tombstones" / f"{key.kid}.json").exists()
    with pytest.raises(KeyErasedError, match="was erased"):
        op.decrypt_envelope(env, store, "r1", "input_prompt")
    assert op.decrypt_envelope(other, store, "r2", "input_prompt") == "other tenant"
    assert store.data_key("acme").kid != key.kid


def test_erase_one_user_keeps_the_others(tmp_path: Path) -> None:
    """With per-user keys, erasing one user leaves the tenant's other users readable."""
    generate_master_key(tmp_path / "m.json")
    store = FileKeyStore(tmp_path / "m.json", recheck_s=0)
    alice, bob = store.data_key("acme", "alice"), store.data_key("acme", "bob")
    assert [t.kid for t in store.erase("acme", "alice")] == [alice.kid]
    with pytest.raises(KeyErasedError):
        store.key_by_id(alice.kid)
    assert store.key_by_id(bob.kid).dek == bob.dek
    assert {t.kid for t in store.erase("acme")} == {bob.kid}
