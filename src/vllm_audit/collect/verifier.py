"""Incremental verification of one writer's chain as its entries arrive (pure: no I/O).

The collector keeps, per writer, a :class:`ChainState`: the next expected ``seq``, the leaf hash
of the entry before it and the RFC 6962 compact range over every leaf so far (O(log n) hashes).
:func:`advance` feeds it consecutive entries and checks, for each:

1. the stored line decodes through the entry codec as an entry of this writer, with the expected
   ``seq`` and, as ``prev``, the leaf hash of the entry before (else a ``fork``: the chain goes on
   differently from what was received before, or an entry was altered);
2. a ``checkpoint`` event (``[integrity] embed_checkpoints``) carries a note signed by a trusted
   key, for this writer's origin, of tree size equal to the event's seq, whose root equals the
   root of the compact range at that size (else ``bad_signature`` / ``modified``);
3. a ``segment_sealed`` event right after its segment records the Merkle root of the range.

The first problem stops the batch: the entries before it are good, the one at it and everything
after are not taken (the writer is marked broken and an alert names it). A checkpoint whose
signature does not verify is reported but does not stop the chain (its entries still link).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import orjson

from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import NoteError, open_checkpoint
from vllm_audit.integrity.keys import VerifierKey
from vllm_audit.integrity.merkle import CompactRange


@dataclasses.dataclass(slots=True)
class ChainState:
    """What the collector knows of one writer's chain (persisted with the rows)."""

    writer_id: str
    next_seq: int = 0
    last_leaf: str = codec.ZERO_HASH
    #: The compact range over leaves ``0..next_seq-1``; None after a gap (roots cannot be checked).
    tree: CompactRange | None = dataclasses.field(default_factory=CompactRange)
    #: Tree size and time of the last signed checkpoint verified against the tree.
    signed_size: int = 0
    signed_at: str = ""
    #: Timestamp of the last entry received.
    last_time: str = ""
    #: The last entry was a ``writer_stopped`` event (the writer shut down cleanly).
    stopped: bool = False
    #: Why the chain is not taken any further ("" while it verifies).
    broken: str = ""
    #: Entries received and verified.
    received: int = 0
    #: Leaf hash of entry 0 (hex): a chain restarted under this writer id shows as a different one.
    first_leaf: str = ""

    def copy(self) -> ChainState:
        tree = self.tree.copy() if self.tree is not None else None
        return dataclasses.replace(self, tree=tree)

    # -- persistence ----------------------------------------------------------------------------

    def tree_bytes(self) -> bytes | None:
        return None if self.tree is None else b"".join(self.tree.hashes)

    @staticmethod
    def tree_from(size: int, data: bytes | None) -> CompactRange | None:
        if data is None:
            return None
        hashes = [data[i : i + 32] for i in range(0, len(data), 32)]
        return CompactRange(size, hashes)


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """A verification failure at ``seq`` (``kind``: fork, bad_signature, modified, malformed)."""

    kind: str
    seq: int
    message: str


@dataclasses.dataclass(slots=True)
class Outcome:
    """What :func:`advance` took: ``entries[:taken]`` verified; ``problem`` stopped it (or None)."""

    taken: int = 0
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    #: Problems that do not stop the chain (a checkpoint whose signature does not verify: the
    #: entries still link, the signed statement about them is what failed).
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    #: seq of each ``segment_sealed`` event that came right after its segment → the compact range
    #: at the segment's end (the archive writes the segment's manifest from it).
    sealed: dict[int, CompactRange] = dataclasses.field(default_factory=dict)
    problem: Problem | None = None


def advance(state: ChainState, lines: Sequence[tuple[int, bytes]], keys: Sequence[VerifierKey]) -> Outcome:
    """Verify ``lines`` (``(seq, stored line)``, consecutive from ``state.next_seq``) and move ``state``.

    ``state`` is updated in place up to the last good entry.
    """
    out = Outcome()
    wid = state.writer_id
    tail = codec.writer_tail(wid)
    leaf_hash = codec.leaf_hash
    for seq, line in lines:
        if seq != state.next_seq:  # pragma: no cover - the caller hands consecutive runs
            raise ValueError(f"entry {seq} handed to a chain expecting {state.next_seq}")
        header = codec.parse_header(line, tail)
        if header is None:
            out.problem = Problem("malformed", seq, f"entry {seq} is not a well-formed entry of writer {wid}")
            return out
        hseq, prev, body = header
        if hseq != seq:
            out.problem = Problem("malformed", seq, f"message for seq {seq} holds the entry of seq {hseq}")
            return out
        if state.last_leaf and prev.decode() != state.last_leaf:
            out.problem = Problem(
                "fork",
                seq,
                f"entry {seq}'s prev does not match the leaf hash of entry {seq - 1} received before "
                "(a fork: the chain continues differently, or an entry was altered)",
            )
            return out
        leaf = leaf_hash(line)
        rtype = codec.record_type_at(line, body)
        if rtype == b"event":
            problem = _check_event(state, seq, line, keys, out)
            if problem is not None:
                out.problem = problem
                return out
        else:
            state.stopped = False
        if state.tree is not None:
            state.tree.append(leaf)
        state.next_seq = seq + 1
        state.last_leaf = leaf.hex()
        state.received += 1
        if seq == 0:
            state.first_leaf = state.last_leaf
        out.taken += 1
    return out


def _check_event(state: ChainState, seq: int, line: bytes, keys: Sequence[VerifierKey], out: Outcome) -> Problem | None:
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError:
        return Problem("malformed", seq, f"entry {seq} is not valid JSON")
    if not isinstance(ev, dict):  # pragma: no cover - parse_header saw an object start
        return Problem("malformed", seq, f"entry {seq} is not a JSON object")
    name = ev.get("event")
    ts = ev.get("timestamp")
    if isinstance(ts, str):
        state.last_time = ts
    if name != "checkpoint":  # the final checkpoint is embedded after writer_stopped
        state.stopped = name == "writer_stopped"
    detail = ev.get("detail")
    detail = detail if isinstance(detail, dict) else {}
    if name == "checkpoint":
        note = detail.get("note")
        if not isinstance(note, str):
            return Problem("malformed", seq, f"checkpoint event {seq} has no note")
        try:
            cp = open_checkpoint(note, keys)
        except NoteError as exc:
            out.warnings.append(Problem("bad_signature", seq, f"checkpoint event {seq}: {exc}"))
            return None
        if cp.writer_id != state.writer_id or cp.size != seq:
            return Problem(
                "modified", seq, f"checkpoint event {seq} signs {cp.origin!r} at tree size {cp.size}, not this position"
            )
        if state.tree is not None:
            if cp.root != state.tree.root():
                return Problem(
                    "modified",
                    seq,
                    f"the Merkle root of entries 0..{seq - 1} received does not match the checkpoint signed {cp.time}",
                )
            state.signed_size = cp.size
            state.signed_at = cp.time
        out.checkpoints.append(note)
    elif name == "segment_sealed":
        last = detail.get("last_seq")
        if isinstance(last, int) and last == seq - 1 and state.tree is not None:
            if detail.get("merkle_root") != state.tree.root().hex():
                return Problem(
                    "modified", seq, f"segment_sealed event {seq}: Merkle root differs from the entries received"
                )
            out.sealed[seq] = state.tree.copy()
    return None
