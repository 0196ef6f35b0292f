"""RFC 6962 Merkle tree hashing, compact ranges, inclusion and consistency proofs.

Leaves are ``SHA-256(0x00 || data)``, interior nodes ``SHA-256(0x01 || left || right)`` and the
empty tree hashes to ``SHA-256("")`` (RFC 6962 section 2.1). Proof generation follows the
``PATH`` and ``SUBPROOF`` definitions of RFC 6962 section 2.1.1 and 2.1.2; verification follows
the algorithms of RFC 9162 section 2.1.3.2 and 2.1.4.2 (the same ones transparency-dev/merkle
implements). Known-answer tests: ``tests/integrity/vectors/rfc6962.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from vllm_audit.errors import VerificationError

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


class CompactRange:
    """The roots of the perfect subtrees covering leaves ``[0, size)``: O(log n) memory.

    Appending a leaf merges equal-sized subtrees (one hash per trailing one bit of ``size``,
    one on average). ``root()`` folds the subtree roots right to left.
    """

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a compact range of size {size} has {bin(size).count('1')} hashes, got {len(hashes)}")
        self.size = size
        self.hashes: list[bytes] = list(hashes)

    def append(self, leaf: bytes) -> None:
        hashes = self.hashes
        n = self.size
        h = leaf
        while n & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            n >>= 1
        hashes.append(h)
        self.size += 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        hashes = self.hashes
        if not hashes:
            return EMPTY_ROOT
        h = hashes[-1]
        for left in reversed(hashes[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.hashes)


def decompose(begin: int, end: int) -> list[int]:
    """Levels of the perfect subtrees covering leaves ``[begin, end)``, left to right."""
    out = []
    while begin < end:
        level = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << level) > end:
            level -= 1
        out.append(level)
        begin += 1 << level
    return out


def decompose_starts(begin: int, end: int) -> list[tuple[int, int]]:
    """``(start, level)`` of the perfect subtrees covering leaves ``[begin, end)``, left to right."""
    out = []
    for level in decompose(begin, end):
        out.append((begin, level))
        begin += 1 << level
    return out


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of a list of leaf hashes."""
    r = CompactRange()
    r.extend(leaves)
    return r.root()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """RFC 6962 ``PATH(index, D[size])`` over leaf hashes."""
    n = len(leaves) if size is None else size
    if not 0 <= index < n <= len(leaves):
        raise ValueError(f"leaf index {index} is not in a tree of size {n}")
    return _path(index, leaves, 0, n)


def _path(m: int, leaves: Sequence[bytes], lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, leaves, lo, lo + k), root_of(leaves[lo + k : hi])]
    return [*_path(m - k, leaves, lo + k, hi), root_of(leaves[lo : lo + k])]


def consistency_proof(leaves: Sequence[bytes], old_size: int, new_size: int | None = None) -> list[bytes]:
    """RFC 6962 ``PROOF(old_size, D[new_size])`` over leaf hashes."""
    n = len(leaves) if new_size is None else new_size
    if not 0 <= old_size <= n <= len(leaves):
        raise ValueError(f"cannot prove size {old_size} against size {n}")
    if old_size == 0 or old_size == n:
        return []
    return _subproof(old_size, leaves, 0, n, True)


def _subproof(m: int, leaves: Sequence[bytes], lo: int, hi: int, whole: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if whole else [root_of(leaves[lo:hi])]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves, lo, lo + k, whole), root_of(leaves[lo + k : hi])]
    return [*_subproof(m - k, leaves, lo + k, hi, False), root_of(leaves[lo : lo + k])]


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 section 2.1.3.2)."""
    if not 0 <= index < size:
        raise VerificationError(f"leaf index {index} is not in a tree of size {size}")
    if len(leaf) != 32 or any(len(p) != 32 for p in proof):
        raise VerificationError("inclusion proof hashes must be 32 bytes")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ``VerificationError`` unless ``proof`` shows ``leaf`` at ``index`` under ``root``."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise VerificationError(f"inclusion proof for leaf {index} does not lead to the root of tree size {size}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Raise ``VerificationError`` unless ``proof`` shows tree ``new`` extends tree ``old`` (RFC 9162 2.1.4.2)."""
    if old_size < 0 or new_size < old_size:
        raise VerificationError(f"tree size {new_size} cannot extend tree size {old_size}")
    if any(len(p) != 32 for p in proof):
        raise VerificationError("consistency proof hashes must be 32 bytes")
    if old_size == new_size:
        if proof:
            raise VerificationError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise VerificationError(f"two different roots for the same tree size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise VerificationError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    items = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        items.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = items[0]
    for c in items[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is too short")
    if fr != old_root:
        raise VerificationError(f"consistency proof does not lead to the root of tree size {old_size}")
    if sr != new_root:
        raise VerificationError(f"consistency proof does not lead to the root of tree size {new_size}")
