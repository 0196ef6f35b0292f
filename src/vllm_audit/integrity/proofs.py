"""Self-contained proofs: one record is in the signed log (inclusion), a log extends an earlier one (consistency).

Inclusion proof (JSON, ``format = "vllm-audit-inclusion-proof/v2"``)::

    {"format": ..., "writer_id": "...", "leaf_index": 41, "tree_size": 1000,
     "record": "<the stored line, as a JSON string; UTF-8 encode it to get the hashed bytes>",
     "leaf_hash": "<hex SHA-256(0x00 || header || SHA-256(body)) of record>",
     "inclusion_proof": ["<hex>", ...],          # RFC 6962 PATH(leaf_index, D[tree_size])
     "checkpoint": "<signed checkpoint note>",    # the first checkpoint with tree_size > leaf_index
     "key_id": "<key name>+<8 hex key hash>", "key_fingerprint": "<64 hex>"}

Consistency proof (``format = "vllm-audit-consistency-proof/v1"``)::

    {"format": ..., "writer_id": "...", "old_size": N, "new_size": M,
     "old_checkpoint": "<note>", "new_checkpoint": "<note>",
     "consistency_proof": ["<hex>", ...]}        # RFC 6962 PROOF(N, D[M])
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.errors import VerificationError
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, Checkpoint, open_checkpoint, parse_body, split_note
from vllm_audit.integrity.checkpoint import parse_note_line as _parse_note_line
from vllm_audit.integrity.codec import leaf_hash, parse_header, split_lines, split_torn, writer_tail
from vllm_audit.integrity.keys import VerifierKey
from vllm_audit.integrity.merkle import (
    CompactRange,
    consistency_proof,
    decompose_starts,
    inclusion_proof,
    node_hash,
    root_from_inclusion_proof,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from vllm_audit.integrity.reader import list_segments
from vllm_audit.integrity.reader import read_manifest as _read_manifest

INCLUSION_FORMAT = "vllm-audit-inclusion-proof/v2"
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
        for line in split_lines(good):
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


def _locate(d: Path, request_id: str, seq: int | None = None) -> tuple[int, bytes, int] | None:
    """``(leaf index, stored line, segment number)`` of the record with ``request_id``.

    With ``seq`` (the audit store knows it) only the segment holding it is read; otherwise the
    writer's segments are searched with ``bytes.find`` and the hit is confirmed by parsing it.
    """
    needle = b'"request_id":' + orjson.dumps(request_id)
    segs = list_segments(d)
    if seq is not None:
        cands = [i for i, (first, _) in enumerate(segs) if first <= seq]
        order = cands[-1:] if cands else []
    else:
        order = list(range(len(segs)))
    for i in order:
        first, path = segs[i]
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
            if isinstance(rec, dict) and rec.get("request_id") == request_id and (seq is None or rec.get("seq") == seq):
                index = first + good.count(b"\n", 0, start)
                if rec.get("seq") != index:
                    raise VerificationError(
                        f"writer {d.name} {path.name}: entry {index} says seq {rec.get('seq')} (run vllm-audit verify)"
                    )
                return index, line, i
            pos = good.find(needle, end)
    return None


def _fast_path(d: Path, segs: list[tuple[int, Path]], seg_no: int, index: int, size: int) -> list[bytes] | None:
    """Inclusion path from one segment onwards, using the previous manifest's compact range.

    The left siblings of a leaf's path are whole subtrees of ``[0, index)``: any of them left of
    the segment is a node of the compact range saved at the segment start (or is split into such
    nodes and leaves of the segment), so only the leaves from the segment start to ``size`` are
    hashed. Returns None when the manifest is missing or does not fit (the caller then hashes all).
    """
    first = segs[seg_no][0]
    if first == 0:
        prefix = CompactRange()
    else:
        m = _read_manifest(segs[seg_no - 1][1])
        if m is None or m["tree_size"] != first:
            return None
        prefix = CompactRange(first, [bytes.fromhex(h) for h in m["compact_range"]])
    known = {(b, b + (1 << lv)): h for (b, lv), h in zip(decompose_starts(0, first), prefix.hashes, strict=True)}
    leaves: list[bytes] = []
    want = size - first
    for _, seg in segs[seg_no:]:
        good, _torn = split_torn(seg.read_bytes())
        leaves += [leaf_hash(line) for line in split_lines(good)]
        if len(leaves) >= want:
            break
    if len(leaves) < want:
        return None
    leaves = leaves[:want]

    def sub(lo: int, hi: int) -> bytes:
        if lo >= first:
            return root_of(leaves[lo - first : hi - first])
        if (lo, hi) in known:
            return known[(lo, hi)]
        if hi - lo == 1:
            raise KeyError(lo)
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        return node_hash(sub(lo, lo + k), sub(lo + k, hi))

    def walk(m: int, lo: int, hi: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        if m < lo + k:
            return [*walk(m, lo, lo + k), sub(lo + k, hi)]
        return [*walk(m, lo + k, hi), sub(lo, lo + k)]

    try:
        return walk(index, 0, size)
    except KeyError:
        return None


def build_inclusion_proof(
    log_dir: str | os.PathLike[str],
    request_id: str,
    *,
    writer_id: str | None = None,
    seq: int | None = None,
) -> dict[str, Any] | None:
    """The inclusion proof of the record with ``request_id``; None if no record has it.

    ``writer_id`` / ``seq`` (known to the audit store) skip the search. The cost is hashing the
    entries from the record's segment up to the first checkpoint covering it (the compact range in
    the previous segment's manifest stands in for everything before). Raises ``VerificationError``
    when the record exists but no checkpoint covers it yet, or the log no longer matches it.
    """
    dirs = _writer_dirs(log_dir)
    if writer_id is not None:
        dirs = [d for d in dirs if d.name == writer_id]
    for d in dirs:
        found = _locate(d, request_id, seq)
        if found is None:
            continue
        index, line, seg_no = found
        cp_note = next(((n, cp) for n, cp in _notes(d) if cp.size > index), None)
        if cp_note is None:
            raise VerificationError(
                f"record {request_id!r} (writer {d.name}, entry {index}) is not covered by a signed checkpoint yet; "
                "retry after the next checkpoint"
            )
        note, cp = cp_note
        segs = list_segments(d)
        leaf = leaf_hash(line)
        path = _fast_path(d, segs, seg_no, index, cp.size)
        if path is None or root_from_inclusion_proof(index, cp.size, leaf, path) != cp.root:
            leaves = _leaves(d, cp.size)
            if root_of(leaves) != cp.root:
                raise VerificationError(f"writer {d.name}: the log no longer matches its checkpoint of size {cp.size}")
            path = inclusion_proof(leaves, index, cp.size)
        _, sigs = split_note(note)
        name, key_id, _ = sigs[0]
        return {
            "format": INCLUSION_FORMAT,
            "writer_id": d.name,
            "leaf_index": index,
            "tree_size": cp.size,
            "record": line.decode("utf-8"),
            "leaf_hash": leaf.hex(),
            "inclusion_proof": [h.hex() for h in path],
            "checkpoint": note,
            "key_id": f"{name}+{key_id.hex()}",
        }
    return None


@functools.lru_cache(maxsize=1024)
def _opened(note: str, keys: tuple[VerifierKey, ...]) -> Checkpoint:
    return open_checkpoint(note, keys)


def _open(note: str, keys: Sequence[VerifierKey]) -> Checkpoint:
    """:func:`open_checkpoint`, remembered per (note, trusted keys): proofs verified in bulk mostly
    share a few checkpoints, and the Ed25519 check is most of a proof's cost. The result depends
    on nothing else (keys are frozen values, compared by value), and a note that does not verify is
    not remembered: it is checked again each time."""
    return _opened(note, tuple(keys))


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
    cp = _open(_field(proof, "checkpoint", str), public_keys)
    if cp.writer_id != wid:
        raise VerificationError(f"checkpoint is for log {cp.origin!r}, not writer {wid!r}")
    if cp.size != size:
        raise VerificationError(f"proof says tree size {size} but the checkpoint says {cp.size}")
    line = record.encode("utf-8")
    leaf = leaf_hash(line)
    if "leaf_hash" in proof and proof["leaf_hash"] != leaf.hex():
        raise VerificationError("the record does not hash to the proof's leaf hash (the record was altered)")
    header = parse_header(line, writer_tail(wid))
    if header is None or header[0] != index:
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
    a = _open(_field(proof, "old_checkpoint", str), public_keys)
    b = _open(_field(proof, "new_checkpoint", str), public_keys)
    for cp in (a, b):
        if cp.writer_id != wid:
            raise VerificationError(f"checkpoint is for log {cp.origin!r}, not writer {wid!r}")
    if a.origin != b.origin:
        raise VerificationError("the two checkpoints are for different logs")
    if (a.size, b.size) != (_field(proof, "old_size", int), _field(proof, "new_size", int)):
        raise VerificationError("proof sizes do not match the checkpoints")
    verify_consistency(a.size, b.size, a.root, b.root, _hashes(proof.get("consistency_proof"), "consistency_proof"))
    return a, b
