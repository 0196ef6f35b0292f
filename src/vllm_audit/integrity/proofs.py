"""Self-contained proofs: one record is in the signed log (inclusion), a log extends an earlier one (consistency).

Inclusion proof (JSON, ``format = "vllm-audit-inclusion-proof/v1"``)::

    {"format": ..., "writer_id": "...", "leaf_index": 41, "tree_size": 1000,
     "record": "<the stored line, as a JSON string; UTF-8 encode it to get the hashed bytes>",
     "leaf_hash": "<hex SHA-256(0x00 || record)>",
     "inclusion_proof": ["<hex>", ...],          # RFC 6962 PATH(leaf_index, D[tree_size])
     "checkpoint": "<signed checkpoint note>",    # the first checkpoint with tree_size > leaf_index
     "key_id": "<key name>+<8 hex key hash>", "key_fingerprint": "<64 hex>"}

Consistency proof (``format = "vllm-audit-consistency-proof/v1"``)::

    {"format": ..., "writer_id": "...", "old_size": N, "new_size": M,
     "old_checkpoint": "<note>", "new_checkpoint": "<note>",
     "consistency_proof": ["<hex>", ...]}        # RFC 6962 PROOF(N, D[M])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.errors import VerificationError
from vllm_audit.integrity.chain import leaf_hash, list_segments, split_torn
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, Checkpoint, open_checkpoint, parse_body, split_note
from vllm_audit.integrity.checkpoint import parse_note_line as _parse_note_line
from vllm_audit.integrity.keys import VerifierKey
from vllm_audit.integrity.merkle import (
    consistency_proof,
    inclusion_proof,
    root_of,
    verify_consistency,
    verify_inclusion,
)

INCLUSION_FORMAT = "vllm-audit-inclusion-proof/v1"
CONSISTENCY_FORMAT = "vllm-audit-consistency-proof/v1"


def _writer_dirs(log_dir: str | os.PathLike[str]) -> list[Path]:
    root = Path(log_dir) / "writers"
    if not root.is_dir():
        raise VerificationError(f"{str(log_dir)!r} is not a vllm-audit log directory (no writers/).")
    return sorted(d for d in root.iterdir() if d.is_dir())


def _leaves(d: Path, size: int) -> list[bytes]:
    """Leaf hashes of the first ``size`` stored entries of a writer (in stored order)."""
    out: list[bytes] = []
    for _, path in list_segments(d):
        good, _torn = split_torn(path.read_bytes())
        for line in good.split(b"\n")[:-1]:
            out.append(leaf_hash(line))
            if len(out) == size:
                return out
    if len(out) < size:
        raise VerificationError(f"writer {d.name} has only {len(out)} entries, fewer than {size}")
    return out


def _notes(d: Path) -> list[tuple[str, Checkpoint]]:
    """The checkpoint notes of a writer, parsed but not verified (the verifier of the proof does that)."""
    out: list[tuple[str, Checkpoint]] = []
    try:
        data = (d / CHECKPOINTS_FILE).read_bytes()
    except FileNotFoundError:
        return out
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            note = _parse_note_line(raw)
            text, _ = split_note(note)
            out.append((note, parse_body(text)))
        except (ValueError, orjson.JSONDecodeError):
            continue
    return out


def _find_record(d: Path, request_id: str) -> tuple[int, bytes] | None:
    needle = b'"request_id":' + orjson.dumps(request_id)
    index = 0
    for _, path in list_segments(d):
        good, _torn = split_torn(path.read_bytes())
        pos = good.find(needle)
        while pos >= 0:
            start = good.rfind(b"\n", 0, pos) + 1
            end = good.find(b"\n", pos)
            line = good[start:end]
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and rec.get("request_id") == request_id:
                return index + good.count(b"\n", 0, start), line
            pos = good.find(needle, end)
        index += good.count(b"\n")
    return None


def build_inclusion_proof(log_dir: str | os.PathLike[str], request_id: str) -> dict[str, Any] | None:
    """The inclusion proof of the record with ``request_id``; None if no record has it.

    Raises ``VerificationError`` when the record exists but no checkpoint covers it yet.
    """
    for d in _writer_dirs(log_dir):
        found = _find_record(d, request_id)
        if found is None:
            continue
        index, line = found
        cp_note = next(((n, cp) for n, cp in _notes(d) if cp.size > index), None)
        if cp_note is None:
            raise VerificationError(
                f"record {request_id!r} (writer {d.name}, entry {index}) is not covered by a signed checkpoint yet; "
                "retry after the next checkpoint"
            )
        note, cp = cp_note
        leaves = _leaves(d, cp.size)
        path = inclusion_proof(leaves, index, cp.size)
        if root_of(leaves) != cp.root:
            raise VerificationError(f"writer {d.name}: the log no longer matches its checkpoint of size {cp.size}")
        _, sigs = split_note(note)
        name, key_id, _ = sigs[0]
        return {
            "format": INCLUSION_FORMAT,
            "writer_id": d.name,
            "leaf_index": index,
            "tree_size": cp.size,
            "record": line.decode("utf-8"),
            "leaf_hash": leaf_hash(line).hex(),
            "inclusion_proof": [h.hex() for h in path],
            "checkpoint": note,
            "key_id": f"{name}+{key_id.hex()}",
        }
    return None


def _hashes(obj: Any, what: str) -> list[bytes]:
    if not isinstance(obj, list) or not all(isinstance(h, str) for h in obj):
        raise VerificationError(f"{what} must be a list of hex strings")
    try:
        out = [bytes.fromhex(h) for h in obj]
    except ValueError:
        raise VerificationError(f"{what} holds a value that is not hex") from None
    if any(len(h) != 32 for h in out):
        raise VerificationError(f"{what} holds a value that is not 32 bytes")
    return out


def _field(proof: dict[str, Any], name: str, tp: type) -> Any:
    v = proof.get(name)
    if not isinstance(v, tp) or isinstance(v, bool):
        raise VerificationError(f"proof field {name!r} is missing or not a {tp.__name__}")
    return v


def verify_inclusion_proof(proof: dict[str, Any], public_keys: Sequence[VerifierKey]) -> Checkpoint:
    """Check an inclusion proof alone; raise ``VerificationError`` unless it holds. Returns the checkpoint."""
    if not isinstance(proof, dict) or proof.get("format") != INCLUSION_FORMAT:
        raise VerificationError(f"not a {INCLUSION_FORMAT} document")
    wid = _field(proof, "writer_id", str)
    index = _field(proof, "leaf_index", int)
    size = _field(proof, "tree_size", int)
    record = _field(proof, "record", str)
    cp = open_checkpoint(_field(proof, "checkpoint", str), public_keys)
    if cp.writer_id != wid:
        raise VerificationError(f"checkpoint is for log {cp.origin!r}, not writer {wid!r}")
    if cp.size != size:
        raise VerificationError(f"proof says tree size {size} but the checkpoint says {cp.size}")
    line = record.encode("utf-8")
    leaf = leaf_hash(line)
    if "leaf_hash" in proof and proof["leaf_hash"] != leaf.hex():
        raise VerificationError("the record does not hash to the proof's leaf hash (the record was altered)")
    head = b'{"seq":%d,"prev":"' % index
    if not line.startswith(head) or b'"writer_id":' + orjson.dumps(wid) + b"," not in line[len(head) : len(head) + 96]:
        raise VerificationError(f"the record's header does not say seq {index} of writer {wid}")
    try:
        verify_inclusion(index, size, leaf, _hashes(proof.get("inclusion_proof"), "inclusion_proof"), cp.root)
    except VerificationError as exc:
        raise VerificationError(f"{exc} (the record or the proof was altered)") from None
    return cp


def build_consistency_proof(log_dir: str | os.PathLike[str], writer_id: str, old: int, new: int) -> dict[str, Any]:
    """Consistency proof between the writer's checkpoints of tree sizes ``old`` and ``new``."""
    dirs = {d.name: d for d in _writer_dirs(log_dir)}
    if writer_id not in dirs:
        raise VerificationError(f"no writer {writer_id!r} in {str(log_dir)!r} (have: {', '.join(sorted(dirs))})")
    d = dirs[writer_id]
    notes = _notes(d)
    by_size = {cp.size: (n, cp) for n, cp in notes}
    for s in (old, new):
        if s not in by_size:
            sizes = sorted(by_size)
            raise VerificationError(
                f"writer {writer_id} has no checkpoint of tree size {s} "
                f"(sizes: {', '.join(map(str, sizes[:5]))}{' ... ' if len(sizes) > 10 else ', '}"
                f"{', '.join(map(str, sizes[-5:])) if len(sizes) > 10 else ''})".replace(", )", ")")
            )
    if old > new:
        raise VerificationError(f"old size {old} is larger than new size {new}")
    leaves = _leaves(d, new)
    return {
        "format": CONSISTENCY_FORMAT,
        "writer_id": writer_id,
        "old_size": old,
        "new_size": new,
        "old_checkpoint": by_size[old][0],
        "new_checkpoint": by_size[new][0],
        "consistency_proof": [h.hex() for h in consistency_proof(leaves, old, new)],
    }


def verify_consistency_proof(
    proof: dict[str, Any], public_keys: Sequence[VerifierKey]
) -> tuple[Checkpoint, Checkpoint]:
    """Check a consistency proof alone; raise ``VerificationError`` unless it holds."""
    if not isinstance(proof, dict) or proof.get("format") != CONSISTENCY_FORMAT:
        raise VerificationError(f"not a {CONSISTENCY_FORMAT} document")
    wid = _field(proof, "writer_id", str)
    a = open_checkpoint(_field(proof, "old_checkpoint", str), public_keys)
    b = open_checkpoint(_field(proof, "new_checkpoint", str), public_keys)
    for cp in (a, b):
        if cp.writer_id != wid:
            raise VerificationError(f"checkpoint is for log {cp.origin!r}, not writer {wid!r}")
    if a.origin != b.origin:
        raise VerificationError("the two checkpoints are for different logs")
    if (a.size, b.size) != (_field(proof, "old_size", int), _field(proof, "new_size", int)):
        raise VerificationError("proof sizes do not match the checkpoints")
    verify_consistency(a.size, b.size, a.root, b.root, _hashes(proof.get("consistency_proof"), "consistency_proof"))
    return a, b
