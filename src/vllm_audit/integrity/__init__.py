"""Tamper evidence: per-writer hash chains, segments, signed Merkle checkpoints, proofs, verifier."""
