"""Tamper evidence: per-writer hash chains, segments, signed Merkle checkpoints, proofs, verifier.

Public entry points (imported lazily, so ``import vllm_audit.integrity.chain`` stays light):

- :func:`build_inclusion_proof` / :func:`verify_inclusion_proof` (``proofs``)
- :func:`verify_log` (``verify``), :func:`load_public_keys` (``keys``)

Formats and threat model: ``docs/integrity.md``.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from vllm_audit.integrity.keys import load_public_keys
    from vllm_audit.integrity.proofs import build_inclusion_proof, verify_inclusion_proof
    from vllm_audit.integrity.verify import verify_log

__all__ = ["build_inclusion_proof", "load_public_keys", "verify_inclusion_proof", "verify_log"]

_WHERE = {
    "build_inclusion_proof": "vllm_audit.integrity.proofs",
    "verify_inclusion_proof": "vllm_audit.integrity.proofs",
    "verify_log": "vllm_audit.integrity.verify",
    "load_public_keys": "vllm_audit.integrity.keys",
}


def __getattr__(name: str) -> typing.Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vllm_audit.integrity' has no attribute {name!r}")
