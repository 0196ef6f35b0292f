"""Signed checkpoints: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes.

A checkpoint note (every line ends with ``\\n``)::

    vllm-audit/<writer_id>                      origin
    1000                                        tree size (decimal)
    <base64 of the 32-byte RFC 6962 root>       root hash
    timestamp 2026-07-01T12:00:00.123Z          extension line (UTC, ms)
                                                blank line
    — <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>

The signature covers the note text: the body lines including the final newline, not the blank
line. Checkpoints are appended to ``writers/<id>/checkpoints.jsonl`` (and to every anchor
directory as ``<anchor>/<writer_id>.checkpoints.jsonl``), one JSON object ``{"note": "..."}`` per
line, so a torn last line is obvious and the file stays append-only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Sequence

import orjson

from vllm_audit.errors import VerificationError
from vllm_audit.integrity.keys import VerifierKey, _Signer, format_time_ms, parse_time_ms

EM_DASH = "\u2014"
CHECKPOINTS_FILE = "checkpoints.jsonl"
MAX_SIGNATURES = 16


class NoteError(VerificationError):
    """A note is malformed (``kind="malformed"``) or not signed by a trusted key (``"bad_signature"``)."""

    def __init__(self, message: str, kind: str = "bad_signature") -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """The signed statement "log ``origin`` had ``size`` entries with Merkle root ``root`` at ``time``"."""

    origin: str
    size: int
    root: bytes
    timestamp_ms: int | None = None
    extensions: tuple[str, ...] = ()
    #: The full signed note this checkpoint came from (empty for an unsigned body).
    note: str = ""
    #: ``name+keyhash`` of the key whose signature verified.
    key_label: str = ""

    @property
    def writer_id(self) -> str:
        return self.origin.rsplit("/", 1)[-1]

    @property
    def time(self) -> str:
        return format_time_ms(self.timestamp_ms) if self.timestamp_ms is not None else ""

    def body(self) -> str:
        root = base64.b64encode(self.root).decode()
        ext = list(self.extensions)
        if self.timestamp_ms is not None:
            ext.insert(0, f"timestamp {format_time_ms(self.timestamp_ms)}")
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), root, *ext))


def sign_checkpoint(cp: Checkpoint, signer: _Signer, key_name: str) -> str:
    """The signed note for ``cp``."""
    text = cp.body()
    sig = base64.b64encode(signer.key_id + signer.sign(text.encode())).decode()
    return f"{text}\n{EM_DASH} {key_name} {sig}\n"


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # a control character other than the newline


def split_note(note: str) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """``(text, [(key name, key id, signature), ...])`` of a signed note, checking its syntax."""
    if not note.endswith("\n"):
        raise NoteError("note does not end with a newline", "malformed")
    if _CONTROL.search(note):
        raise NoteError("note contains control characters", "malformed")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note has no signature block", "malformed")
    text, block = note[: cut + 1], note[cut + 2 :]
    sigs: list[tuple[str, bytes, bytes]] = []
    for line in block.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH or not parts[1]:
            raise NoteError(f"malformed signature line {line[:80]!r}", "malformed")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise NoteError("signature is not valid base64", "malformed") from None
        if len(raw) < 5:
            raise NoteError("signature is too short", "malformed")
        sigs.append((parts[1], raw[:4], raw[4:]))
    if not sigs:
        raise NoteError("note has no signatures", "malformed")
    if len(sigs) > MAX_SIGNATURES:
        raise NoteError("note has too many signatures", "malformed")
    return text, sigs


def parse_body(text: str) -> Checkpoint:
    """Parse a checkpoint body (no signature check)."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("checkpoint body needs an origin, a size and a root hash", "malformed")
    lines = lines[:-1]
    origin, size_s, root_s, ext = lines[0], lines[1], lines[2], lines[3:]
    if not origin:
        raise NoteError("checkpoint has an empty origin", "malformed")
    if not size_s.isascii() or not size_s.isdigit() or (len(size_s) > 1 and size_s[0] == "0"):
        raise NoteError(f"checkpoint tree size {size_s!r} is not a decimal number", "malformed")
    try:
        root = base64.b64decode(root_s, validate=True)
    except (binascii.Error, ValueError):
        root = b""
    if len(root) != 32:
        raise NoteError("checkpoint root hash is not 32 bytes of base64", "malformed")
    ts: int | None = None
    rest: list[str] = []
    for line in ext:
        if not line:
            raise NoteError("checkpoint has an empty extension line", "malformed")
        if line.startswith("timestamp ") and ts is None:
            try:
                ts = parse_time_ms(line[len("timestamp ") :])
            except ValueError:
                raise NoteError(f"bad checkpoint timestamp {line!r}", "malformed") from None
        else:
            rest.append(line)
    return Checkpoint(origin, int(size_s), root, ts, tuple(rest))


def open_checkpoint(note: str, keys: Sequence[VerifierKey]) -> Checkpoint:
    """Parse and verify a signed checkpoint note; raise ``NoteError`` unless a trusted key signed it.

    As c2sp.org/signed-note requires, signatures from unknown keys are ignored, a failing signature
    from a known key rejects the note, and at least one known key must have signed. A key only
    counts when the checkpoint's timestamp lies in its validity window.
    """
    text, sigs = split_note(note)
    cp = parse_body(text)
    message = text.encode()
    good = ""
    known_outside_window = ""
    for name, key_id, sig in sigs:
        for key in keys:
            if key.name != name or key.key_id != key_id:
                continue
            if not key.verify(message, sig):
                raise NoteError(f"signature by {key.label} does not verify (the checkpoint was altered)")
            if key.valid_at(cp.timestamp_ms):
                good = good or key.label
            else:
                known_outside_window = key.label
    if not good:
        if known_outside_window:
            raise NoteError(
                f"checkpoint signed by {known_outside_window} outside the key's validity window ({cp.time})"
            )
        names = ", ".join(f"{n}+{k.hex()}" for n, k, _ in sigs)
        raise NoteError(f"checkpoint is not signed by a trusted key (signed by {names})")
    return dataclasses.replace(cp, note=note, key_label=good)


def note_line(note: str) -> bytes:
    """One line of a checkpoints file."""
    return orjson.dumps({"note": note}) + b"\n"


def parse_note_line(line: bytes) -> str:
    obj = orjson.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("note"), str):
        raise ValueError("not a checkpoint line")
    note: str = obj["note"]
    return note
