"""The entry codec: the only code that knows how one log entry is laid out in a segment file.

A segment is a file of lines, one entry each::

    {"seq":N,"prev":"<64 hex: leaf hash of entry N-1>","writer_id":"<id>",<the entry's fields>}\\n

The header (``seq``, ``prev``, ``writer_id``) comes first, in this order and this spelling, so
that readers slice it instead of parsing JSON. The leaf hash of an entry is RFC 6962's
``SHA-256(0x00 || line)`` over the stored bytes (without the newline); hashes commit to what is
stored. Pure functions, no I/O: the :mod:`vllm_audit.integrity.reader` reads files, the
:class:`~vllm_audit.integrity.chain.Chain` writes them; the verifier, proofs and every projection
use these functions and nothing else to interpret a line.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

ZERO_HASH = "0" * 64
ZERO = ZERO_HASH.encode()
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "vllm-audit-segment-manifest/v1"
HEADER_START = b'{"seq":'
INFERENCE = b'"record_type":"inference"'
EVENT = b'"record_type":"event"'
ALERT = b'"record_type":"alert"'

_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.jsonl$")
_sha256 = hashlib.sha256
_LEAF_SEED = _sha256(b"\x00")
_hexlify = binascii.hexlify


# -- names -----------------------------------------------------------------------------------


def segment_name(first_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:012d}{SEGMENT_SUFFIX}"


def manifest_name(segment: str) -> str:
    return segment[: -len(SEGMENT_SUFFIX)] + MANIFEST_SUFFIX


def segment_first_seq(name: str) -> int | None:
    """The first seq a segment file name promises, or None when the name is not a segment's."""
    m = _SEGMENT_RE.match(name)
    return int(m.group(1)) if m else None


def is_manifest_name(name: str) -> bool:
    return name.startswith(SEGMENT_PREFIX) and name.endswith(MANIFEST_SUFFIX)


def segment_of_manifest(name: str) -> str:
    return name[: -len(MANIFEST_SUFFIX)] + SEGMENT_SUFFIX


# -- hashing ---------------------------------------------------------------------------------


def leaf_hash(line: bytes) -> bytes:
    """RFC 6962 leaf hash of one stored line (without its newline)."""
    return _sha256(b"\x00" + line).digest()


def split_torn(data: bytes) -> tuple[bytes, bytes]:
    """``(complete lines, torn tail)`` of a segment's bytes."""
    if not data or data.endswith(b"\n"):
        return data, b""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def split_lines(good: bytes) -> list[bytes]:
    """The stored lines of complete segment bytes (as returned by :func:`split_torn`)."""
    if not good:
        return []
    lines = good.split(b"\n")
    lines.pop()
    return lines


def leaf_inputs(good: bytes) -> list[bytes]:
    """``0x00 || line`` for every line of complete segment bytes: what each leaf hash is over.

    One ``replace`` and one ``split`` for the whole buffer (the verifier's vectorised fast path).
    """
    if not good:
        return []
    xlines = (b"\x00" + good.replace(b"\n", b"\n\x00")).split(b"\n")
    xlines.pop()  # the lone 0x00 after the final newline
    return xlines


# -- header ----------------------------------------------------------------------------------


def writer_tail(writer_id: str) -> bytes:
    """The bytes that follow ``prev`` in every header of ``writer_id``: ``","writer_id":"<id>",``."""
    return b'","writer_id":' + orjson.dumps(writer_id) + b","


def header_format(tail: bytes) -> bytes:
    """A ``%``-format of the exact header of a writer's entry: ``fmt % (seq, prev_hex)``."""
    return b'{"seq":%d,"prev":"%b' + tail.replace(b"%", b"%%")


def expected_header(seq: int, prev: bytes, tail: bytes) -> bytes:
    """The exact header bytes entry ``seq`` of a writer (its :func:`writer_tail`) must start with."""
    return header_format(tail) % (seq, prev)


def parse_header(line: bytes, tail: bytes) -> tuple[int, bytes, int] | None:
    """``(seq, prev hex, offset of the body)`` by slicing the fixed-position header, or None.

    ``tail`` is the writer's :func:`writer_tail`. ``seq`` must be a canonical decimal.
    """
    if line[:7] != HEADER_START:
        return None
    j = line.find(b',"prev":"', 7, 29)
    if j <= 7 or not line.startswith(tail, j + 73):
        return None
    digits = line[7:j]
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == 48):
        return None
    return int(digits), line[j + 9 : j + 73], j + 73 + len(tail)


def record_type_at(line: bytes, body: int) -> bytes:
    """``b"inference"``, ``b"event"``, ``b"alert"`` or ``b""``: the record type right after the header."""
    if line.startswith(INFERENCE, body):
        return b"inference"
    if line.startswith(EVENT, body):
        return b"event"
    if line.startswith(ALERT, body):
        return b"alert"
    return b""


# -- encoding --------------------------------------------------------------------------------


def encode_entries(
    entries: Iterable[Mapping[str, Any] | bytes], writer_id: str, seq: int, prev: bytes
) -> tuple[bytearray, list[bytes]]:
    """Encode entries ``seq, seq+1, ...`` chained after leaf ``prev`` (hex bytes).

    An entry is a mapping, or ``bytes`` already holding its JSON object (``orjson.dumps`` of a
    mapping without the header keys, e.g. made in another process). Returns the bytes to append
    (lines with newlines) and the leaf hash of each entry.
    """
    buf = bytearray()
    leaves: list[bytes] = []
    wid = orjson.dumps(writer_id)
    dumps = orjson.dumps
    seed = _LEAF_SEED
    hexlify = _hexlify
    for entry in entries:
        if isinstance(entry, bytes):
            if entry[:1] != b"{":
                raise EntryError("a pre-encoded entry must be a JSON object")
            body = memoryview(entry)[1:]
        else:
            body = memoryview(dumps(entry))[1:]  # without its "{"
        head = b'{"seq":%d,"prev":"%b","writer_id":%b,' % (seq, prev, wid)
        h = seed.copy()
        if len(body) > 1:
            h.update(head)
            h.update(body)
            buf += head
            buf += body
        else:  # an empty entry: the header alone
            head = head[:-1] + b"}"
            h.update(head)
            buf += head
        buf += b"\n"
        leaf = h.digest()
        leaves.append(leaf)
        prev = hexlify(leaf)
        seq += 1
    return buf, leaves


# -- decoded entries -------------------------------------------------------------------------


class EntryError(ValueError):
    """A stored line is not an entry of the expected writer (the message says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One link-checked entry of a writer's chain, as stored.

    ``line`` is the stored bytes (hashed as they are), ``leaf`` their leaf hash, ``prev`` the leaf
    hash (hex) of the entry before. ``record`` parses the line (once per call: keep the result).
    """

    writer_id: str
    seq: int
    prev: str
    leaf: bytes
    line: bytes
    record_type: str

    @property
    def leaf_hex(self) -> str:
        return self.leaf.hex()

    @property
    def key(self) -> str:
        """A stable identity for downstream dedupe: ``<writer_id>:<seq>``."""
        return f"{self.writer_id}:{self.seq}"

    def record(self) -> dict[str, Any]:
        rec = orjson.loads(self.line)
        if not isinstance(rec, dict):  # pragma: no cover - parse_header guarantees an object start
            raise EntryError(f"entry {self.key} is not a JSON object")
        return rec


def decode(line: bytes, tail: bytes, writer_id: str) -> Entry:
    """Decode one stored line of ``writer_id`` (header sliced, JSON validity not yet checked)."""
    h = parse_header(line, tail)
    if h is None:
        raise EntryError("malformed entry header")
    seq, prev, body = h
    return Entry(writer_id, seq, prev.decode(), leaf_hash(line), line, record_type_at(line, body).decode())


# -- manifests -------------------------------------------------------------------------------


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"


def parse_manifest(data: bytes, segment: str) -> dict[str, Any] | None:
    """A manifest's fields when well formed and naming ``segment``; None otherwise."""
    try:
        m = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(m, dict) or m.get("segment") != segment:
        return None
    try:
        int(m["tree_size"])
        int(m["first_seq"])
        int(m["last_seq"])
        [bytes.fromhex(h) for h in m["compact_range"]]
        bytes.fromhex(m["last_leaf"])
    except (KeyError, TypeError, ValueError):
        return None
    return m
