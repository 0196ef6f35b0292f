"""RFC 6962 tree math against the published transparency-dev/merkle vectors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vllm_audit.errors import VerificationError
from vllm_audit.integrity import merkle

V = json.loads((Path(__file__).parent / "vectors" / "rfc6962.json").read_text())
LEAVES = [merkle.leaf_hash(bytes.fromhex(x)) for x in V["leaves"]]


def test_roots_match_published_vectors() -> None:
    """Roots of the first n leaves equal the published roots; the empty tree too."""
    assert merkle.root_of([]).hex() == V["empty_root"]
    for n in range(1, 9):
        assert merkle.root_of(LEAVES[:n]).hex() == V["roots"][n - 1]


@pytest.mark.parametrize("case", V["inclusion"], ids=lambda c: f"{c['leaf_index']}-{c['tree_size']}")
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    """Generated inclusion proofs equal the published ones and verify."""
    i, n = case["leaf_index"], case["tree_size"]
    proof = merkle.inclusion_proof(LEAVES, i, n)
    assert [h.hex() for h in proof] == case["proof"]
    merkle.verify_inclusion(i, n, LEAVES[i], proof, bytes.fromhex(V["roots"][n - 1]))


@pytest.mark.parametrize("case", V["consistency"], ids=lambda c: f"{c['old_size']}-{c['new_size']}")
def test_consistency_vectors(case: dict[str, Any]) -> None:
    """Generated consistency proofs equal the published ones and verify."""
    a, b = case["old_size"], case["new_size"]
    proof = merkle.consistency_proof(LEAVES, a, b)
    assert [h.hex() for h in proof] == case["proof"]
    merkle.verify_consistency(a, b, bytes.fromhex(V["roots"][a - 1]), bytes.fromhex(V["roots"][b - 1]), proof)


def test_random_trees_prove_and_reject_corruption() -> None:
    """For random sizes every proof verifies and a flipped bit or wrong index fails."""
    rnd = random.Random(1)
    leaves = [merkle.leaf_hash(rnd.randbytes(20)) for _ in range(70)]
    cr = merkle.CompactRange()
    for n in range(1, 70):
        cr.append(leaves[n - 1])
        root = merkle.root_of(leaves[:n])
        assert cr.root() == root
        i = rnd.randrange(n)
        proof = merkle.inclusion_proof(leaves, i, n)
        merkle.verify_inclusion(i, n, leaves[i], proof, root)
        if proof:
            bad = list(proof)
            bad[0] = bytes([bad[0][0] ^ 8]) + bad[0][1:]
            with pytest.raises(VerificationError):
                merkle.verify_inclusion(i, n, leaves[i], bad, root)
        if n > 1:
            with pytest.raises(VerificationError):
                merkle.verify_inclusion((i + 1) % n, n, leaves[i], proof, root)
        m = rnd.randrange(1, n + 1)
        cproof = merkle.consistency_proof(leaves, m, n)
        merkle.verify_consistency(m, n, merkle.root_of(leaves[:m]), root, cproof)
        if cproof:
            with pytest.raises(VerificationError):
                merkle.verify_consistency(m, n, merkle.root_of(leaves[:m]), root, cproof[:-1])


def test_compact_range_resumes_from_saved_hashes() -> None:
    """A compact range rebuilt from its saved hashes continues to the same root."""
    cr = merkle.CompactRange()
    cr.extend(LEAVES[:5])
    again = merkle.CompactRange(cr.size, cr.hashes)
    again.extend(LEAVES[5:])
    assert again.root().hex() == V["roots"][7]
