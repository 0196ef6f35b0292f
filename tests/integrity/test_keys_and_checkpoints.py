"""Keys (signed-note encoding, permissions, rotation) and checkpoint notes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_audit.errors import KeyFileError, VerificationError
from vllm_audit.integrity.checkpoint import EM_DASH, Checkpoint, open_checkpoint, sign_checkpoint
from vllm_audit.integrity.keys import (
    SigningKey,
    load_public_keys,
    load_signing_key,
    parse_skey,
    parse_time_ms,
    parse_vkey,
    write_keypair,
)

VEC = Path(__file__).parent / "vectors"


def test_signed_note_known_answer() -> None:
    """Signing the Go sumdb/note example text with its key reproduces the published note byte for byte."""
    v = json.loads((VEC / "signed_note.json").read_text())
    sk = parse_skey(v["signer_key"])
    vk = parse_vkey(v["verifier_key"])
    assert sk.key_id == vk.key_id and sk.public == vk.public
    import base64

    sig = base64.b64encode(sk.key_id + sk.signer().sign(v["text"].encode())).decode()
    assert f"{v['text']}\n{EM_DASH} {sk.name} {sig}\n" == v["note"]


def test_checkpoint_vector_roundtrip() -> None:
    """Our committed checkpoint vector re-signs identically and opens with its public key."""
    v = json.loads((VEC / "vllm_audit_v2.json").read_text())
    key = parse_skey(v["signer_key"])
    cp = Checkpoint(v["origin"], v["tree_size"], bytes.fromhex(v["root"]), parse_time_ms(v["timestamp"]))
    assert sign_checkpoint(cp, key.signer(), key.name) == v["checkpoint"]
    opened = open_checkpoint(v["checkpoint"], [parse_vkey(v["verifier_key"])])
    assert opened.size == v["tree_size"] and opened.root.hex() == v["root"]


def test_keygen_writes_0600_and_loads(tmp_path: Path) -> None:
    """keygen writes a 0600 private key and a public key that verifies its signatures."""
    key = write_keypair(tmp_path / "a", "ops/a")
    assert os.stat(tmp_path / "a.key").st_mode & 0o777 == 0o600
    assert load_signing_key(tmp_path / "a.key").seed == key.seed
    (pub,) = load_public_keys([tmp_path / "a.pub"])
    assert pub.key_id == key.key_id and pub.fingerprint.startswith(key.key_id.hex())
    with pytest.raises(KeyFileError):
        write_keypair(tmp_path / "a", "ops/a")


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A private key file readable by group/others is refused with the chmod fix in the message."""
    write_keypair(tmp_path / "a", "ops/a")
    os.chmod(tmp_path / "a.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(tmp_path / "a.key")


def test_bad_key_files(tmp_path: Path) -> None:
    """Missing, empty and malformed key files raise KeyFileError."""
    with pytest.raises(KeyFileError):
        load_public_keys([tmp_path / "none.pub"])
    (tmp_path / "x.pub").write_text("# nothing\n")
    with pytest.raises(KeyFileError):
        load_public_keys([tmp_path / "x.pub"])
    (tmp_path / "y.pub").write_text("name+00000000+AAAA\n")
    with pytest.raises(KeyFileError):
        load_public_keys([tmp_path / "y.pub"])


def test_rotation_picks_key_valid_at_checkpoint_time() -> None:
    """With a keyring, a checkpoint verifies only under a key whose window contains its timestamp."""
    old, new = SigningKey.generate("ops/k1"), SigningKey.generate("ops/k2")
    t_old = parse_time_ms("2026-01-10T00:00:00Z")
    t_new = parse_time_ms("2026-03-10T00:00:00Z")
    ring = [
        parse_vkey(old.verifier.vkey() + " not-after=2026-02-01T00:00:00Z"),
        parse_vkey(new.verifier.vkey() + " not-before=2026-02-01T00:00:00Z"),
    ]
    cp_old = sign_checkpoint(Checkpoint("vllm-audit/w", 5, b"\x01" * 32, t_old), old.signer(), old.name)
    cp_new = sign_checkpoint(Checkpoint("vllm-audit/w", 9, b"\x02" * 32, t_new), new.signer(), new.name)
    assert open_checkpoint(cp_old, ring).size == 5
    assert open_checkpoint(cp_new, ring).size == 9
    late = sign_checkpoint(Checkpoint("vllm-audit/w", 9, b"\x02" * 32, t_new), old.signer(), old.name)
    with pytest.raises(VerificationError, match="validity window"):
        open_checkpoint(late, ring)


def test_altered_checkpoint_fails() -> None:
    """Changing the size or root of a signed checkpoint breaks its signature."""
    k = SigningKey.generate("ops/k")
    note = sign_checkpoint(Checkpoint("vllm-audit/w", 10, b"\x03" * 32, 1), k.signer(), k.name)
    with pytest.raises(VerificationError):
        open_checkpoint(note.replace("\n10\n", "\n11\n"), [k.verifier])
    with pytest.raises(VerificationError):
        open_checkpoint(note, [SigningKey.generate("ops/k").verifier])


def test_vllm_audit_vector_lines_and_proofs() -> None:
    """The committed stored lines chain, hash to the committed root, and the committed proofs verify.

    The leaf rule is written out here with hashlib, independently of the codec: the header is the
    line up to and including the comma after ``org_tag``; the tlog entry is ``header || SHA-256(body)``;
    the leaf is ``SHA-256(0x00 || entry)``; the tag is ``SHA-256("vllm-audit/org-tag/v1\\0" writer
    "\\0" seq "\\0" org_id)[:16]`` in hex. The codec must give the same for every line.
    """
    import hashlib

    from vllm_audit.integrity import codec, merkle

    v = json.loads((VEC / "vllm_audit_v2.json").read_text())
    prev = "0" * 64
    leaves = []
    wid = v["writer_id"]
    for i, line in enumerate(v["lines"]):
        org = v["org_ids"][i]
        tag = hashlib.sha256(f"vllm-audit/org-tag/v1\0{wid}\0{i}\0{org}".encode()).hexdigest()[:32]
        assert tag == v["org_tags"][i]
        header = f'{{"seq":{i},"prev":"{prev}","writer_id":"{wid}","org_tag":"{tag}",'
        assert line.startswith(header)
        assert json.loads(line).get("org_id", "") == org
        raw = line.encode()
        entry = header.encode() + hashlib.sha256(raw[len(header) :]).digest()
        assert entry.hex() == v["tlog_entries"][i] and codec.tlog_entry(raw) == entry
        leaf = hashlib.sha256(b"\x00" + entry).digest()
        assert codec.leaf_hash(raw) == leaf == merkle.leaf_hash(entry)
        assert codec.org_tag(wid, i, org).decode() == tag
        leaves.append(leaf)
        prev = leaf.hex()
    assert [h.hex() for h in leaves] == v["leaf_hashes"]
    root = bytes.fromhex(v["root"])
    assert merkle.root_of(leaves) == root
    inc = v["inclusion"]
    merkle.verify_inclusion(
        inc["leaf_index"], v["tree_size"], leaves[inc["leaf_index"]], [bytes.fromhex(h) for h in inc["proof"]], root
    )
    c = v["consistency"]
    merkle.verify_consistency(
        c["old_size"],
        c["new_size"],
        merkle.root_of(leaves[: c["old_size"]]),
        root,
        [bytes.fromhex(h) for h in c["proof"]],
    )
