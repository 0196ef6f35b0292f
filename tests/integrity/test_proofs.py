"""Inclusion proofs from a multi-segment log: fast construction from manifests, hints, verification."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest

from vllm_audit.errors import VerificationError
from vllm_audit.integrity import proofs
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.merkle import inclusion_proof
from vllm_audit.integrity.reader import list_segments

from ._logtools import write_log, writer_dir


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("proofs")
    write_keypair(base / "k", "test/operator")
    write_log(base / "log", str(base / "k.key"), 1500, segment_max_bytes=40_000, checkpoint_every_records=97)
    return base / "log"


def test_proofs_across_segments_verify_and_match_full_computation(log: Path) -> None:
    """Proofs built from one segment plus the previous manifest equal the proofs over all leaves."""
    keys = load_public_keys([log.parent / "k.pub"])
    d = writer_dir(log)
    segs = list_segments(d)
    assert len(segs) > 10
    for i in (0, 1, 333, 777, 1200, 1499):
        rid = f"req-{i:06d}"
        p = proofs.build_inclusion_proof(log, rid)
        assert p is not None
        proofs.verify_inclusion_proof(p, keys)
        full = inclusion_proof(proofs._leaves(d, p["tree_size"]), p["leaf_index"], p["tree_size"])
        assert p["inclusion_proof"] == [h.hex() for h in full]
        found = proofs._locate(d, rid)
        assert found is not None
        index, _line, seg_no = found
        assert proofs._fast_path(d, segs, seg_no, index, p["tree_size"]) is not None


def test_hints_skip_the_search(log: Path) -> None:
    """With writer_id and seq the proof is the same; a wrong seq finds nothing."""
    p = proofs.build_inclusion_proof(log, "req-000900")
    assert p is not None
    hinted = proofs.build_inclusion_proof(log, "req-000900", writer_id=p["writer_id"], seq=p["leaf_index"])
    assert hinted == p
    assert proofs.build_inclusion_proof(log, "req-000900", writer_id=p["writer_id"], seq=3) is None
    assert proofs.build_inclusion_proof(log, "no-such-request") is None


def test_proof_rejects_a_record_from_another_position(log: Path) -> None:
    """A proof whose record is swapped for its neighbour's (same checkpoint) fails."""
    keys = load_public_keys([log.parent / "k.pub"])
    a = proofs.build_inclusion_proof(log, "req-000500")
    b = proofs.build_inclusion_proof(log, "req-000501")
    assert a is not None and b is not None
    forged = dict(a, record=b["record"], leaf_hash=b["leaf_hash"])
    with pytest.raises(VerificationError):
        proofs.verify_inclusion_proof(forged, keys)
    assert orjson.loads(a["record"])["request_id"] == "req-000500"


def test_a_remembered_checkpoint_counts_only_under_the_same_trusted_keys(log: Path, tmp_path: Path) -> None:
    """Checkpoint checks are remembered per note and key set: another key set, the signer's key
    with a validity window that excludes the checkpoint, or an edited note are each checked anew."""
    keys = load_public_keys([log.parent / "k.pub"])
    p = proofs.build_inclusion_proof(log, "req-000700")
    assert p is not None
    proofs.verify_inclusion_proof(p, keys)
    proofs.verify_inclusion_proof(p, load_public_keys([log.parent / "k.pub"]))  # equal keys: same answer
    write_keypair(tmp_path / "other", "test/operator")
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        proofs.verify_inclusion_proof(p, load_public_keys([tmp_path / "other.pub"]))
    with pytest.raises(VerificationError, match="validity window"):
        proofs.verify_inclusion_proof(p, [dataclasses.replace(k, not_after_ms=0) for k in keys])
    note = p["checkpoint"]
    size_line = f"\n{p['tree_size']}\n"
    edited = dict(p, checkpoint=note.replace(size_line, f"\n{p['tree_size'] + 1}\n", 1))
    with pytest.raises(VerificationError, match="does not verify"):
        proofs.verify_inclusion_proof(edited, keys)
    proofs.verify_inclusion_proof(p, keys)
