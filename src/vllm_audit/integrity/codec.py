"""The entry codec: the only code that knows how one log entry is laid out in a segment file.

A segment is a file of lines, one entry each::

    {"seq":N,"prev":"<64 hex>","writer_id":"<id>","org_tag":"<32 hex>",<the entry's fields>}\\n

The header (``seq``, ``prev``, ``writer_id``, ``org_tag``) comes first, in this order and this
spelling, so that readers slice it instead of parsing JSON; it ends with the comma after
``org_tag`` (with the closing brace for an entry without fields). ``org_tag`` commits the entry
to its tenant without naming it::

    org_tag = hex(SHA-256("vllm-audit/org-tag/v1" 0x00 writer_id 0x00 str(seq) 0x00 org_id)[:16])

with ``org_id`` the entry's top-level ``org_id`` when it is a string, else ``""``.

Hashes commit to what is stored, through the *tlog entry* of a line::

    entry = header || SHA-256(body)          # body: the bytes after the header (32-byte digest)
    leaf  = SHA-256(0x00 || entry)           # RFC 6962 leaf of that entry (C2SP tlog-proof)

so an export can show an entry it withholds as its header and body digest: enough to recompute its
leaf, follow ``prev`` links and compare its tenant tag, without revealing its fields.
``prev`` is the leaf hash (hex) of the entry before (64 zeros for seq 0). Pure functions, no I/O:
the :mod:`vllm_audit.integrity.reader` reads files, the :class:`~vllm_audit.integrity.chain.Chain`
writes them; the verifier, proofs and every projection use these functions and nothing else to
interpret a line.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import io
import operator
import re
from collections.abc import Iterable, Mapping
from itertools import compress, repeat
from typing import Any

import orjson

ZERO_HASH = "0" * 64
ZERO = ZERO_HASH.encode()
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "vllm-audit-segment-manifest/v2"
HEADER_START = b'{"seq":'
TAG_KEY = b'"org_tag":"'
#: Length of an ``org_tag`` in hex digits (16 bytes of SHA-256).
TAG_HEX = 32
ORG_TAG_DOMAIN = b"vllm-audit/org-tag/v1\x00"
INFERENCE = b'"record_type":"inference"'
EVENT = b'"record_type":"event"'
ALERT = b'"record_type":"alert"'

_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.jsonl$")
_HEX32 = re.compile(rb"[0-9a-f]{32}")
_sha256 = hashlib.sha256
_hexlify = binascii.hexlify
_EMPTY_DIGEST = _sha256(b"").digest()
_HEX_DIGITS = b"0123456789abcdef"
_digest = type(_sha256()).digest
_getitem = bytes.__getitem__


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


# -- tenant tags -----------------------------------------------------------------------------


def org_tag(writer_id: str, seq: int, org_id: str) -> bytes:
    """The ``org_tag`` (32 lowercase hex digits, as bytes) of entry ``seq`` of ``writer_id`` for ``org_id``."""
    data = b"%b%b\x00%d\x00%b" % (ORG_TAG_DOMAIN, writer_id.encode(), seq, org_id.encode())
    return _sha256(data).hexdigest()[:TAG_HEX].encode()


def org_of(entry: Mapping[str, Any]) -> str:
    """The ``org_id`` an entry's tag is made from: its top-level ``org_id`` if a string, else ``""``."""
    org = entry.get("org_id")
    return org if isinstance(org, str) else ""


# -- hashing ---------------------------------------------------------------------------------


def header_end(line: bytes) -> int:
    """Where the header of a stored line ends (the offset of its body).

    Right after the comma (or closing brace) that follows the ``org_tag`` value; a line without an
    ``org_tag`` field (damaged, never a valid entry) is all header. The first ``"org_tag":"`` of a
    line is the header's: ``seq``, ``prev`` and the JSON-escaped writer id cannot contain it.
    """
    at = line.find(TAG_KEY)
    if at < 0:
        return len(line)
    return min(at + len(TAG_KEY) + TAG_HEX + 2, len(line))


def tlog_entry(line: bytes) -> bytes:
    """The tlog entry of a stored line: ``header || SHA-256(body)`` (what its leaf hash is over)."""
    cut = header_end(line)
    return line[:cut] + _sha256(line[cut:]).digest()


def leaf_hash(line: bytes) -> bytes:
    """The leaf hash of one stored line (without its newline): ``SHA-256(0x00 || tlog_entry(line))``."""
    cut = header_end(line)
    return _sha256(b"\x00" + line[:cut] + _sha256(line[cut:]).digest()).digest()


def entry_leaf(header: bytes, body_digest: bytes) -> bytes:
    """The leaf hash of an entry known by its header and the SHA-256 of its body."""
    return _sha256(b"\x00" + header + body_digest).digest()


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


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """A run of consecutive, exactly formed entries of one writer (see :func:`scan_run`)."""

    leaves: list[bytes]
    #: Hex of each leaf (the ``prev`` of the entry after it).
    hexes: list[bytes]
    #: ``(index in the run, stored line)`` of every ``event`` entry.
    events: list[tuple[int, bytes]]
    inference: int


def scan_run(good: bytes, first: int, first_prev: bytes, tail: bytes) -> Run | None:
    """Leaf hashes of complete segment bytes whose lines are entries ``first, first+1, ...`` of a writer.

    ``first_prev`` is the prev (hex) the first line must carry, ``tail`` the writer's
    :func:`writer_tail`. Returns None as soon as any line is not exactly the expected next entry
    (header bytes, ``prev`` link, tag format): the caller then takes the careful path, entry by entry
    with :func:`parse_header` and :func:`leaf_hash`. It accepts exactly the lines those accept as
    the next entries. The verifier's fast path, so no Python bytecode runs per entry: lines are cut
    by ``BytesIO.readlines`` (memchr), the header length follows from the seq, hashes are ``map``s
    over builtins and all headers of a run are compared at once (:func:`_scan_part`).
    """
    if not good:
        return Run([], [], [], 0)
    if not good.endswith(b"\n"):
        return None
    lines = io.BytesIO(good).readlines()  # each with its b"\n"
    fmt = header_format(tail)
    base = len(fmt % (0, first_prev)) - 1 + TAG_HEX + 2  # a header's length without its seq digits
    n = len(lines)
    leaves: list[bytes] = []
    hexes: list[bytes] = []
    events: list[tuple[int, bytes]] = []
    n_inf = 0
    lo, prev = 0, first_prev
    while lo < n:  # runs of seqs of one number of digits: one header length each
        seq = first + lo
        hi = min(n, 10 ** len(str(seq)) - first)
        part = _scan_part(lines[lo:hi] if lo or hi < n else lines, base + len(str(seq)), fmt, seq, prev)
        if part is None:
            return None
        leaves += part[0]
        hexes += part[1]
        n_inf += part[2]
        events += [(lo + k, line) for k, line in part[3]]
        prev = hexes[-1]
        lo = hi
    return Run(leaves, hexes, events, n_inf)


def _scan_part(
    lines: list[bytes], cut: int, fmt: bytes, seq: int, prev: bytes
) -> tuple[list[bytes], list[bytes], int, list[tuple[int, bytes]]] | None:
    """``(leaves, their hex, inference entries, [(index, line) of each event entry])`` of lines
    (newline included) that are entries ``seq, seq+1, ...`` after leaf ``prev`` with headers
    ``cut`` bytes long; None if any is not."""
    m = len(lines)
    sha, digest = _sha256, _digest
    bodies = map(digest, map(sha, map(_getitem, lines, repeat(slice(cut, -1)))))
    headers = list(map(_getitem, lines, repeat(slice(cut))))
    leaves = list(map(digest, map(sha, map(b"".join, zip(repeat(b"\x00"), headers, bodies)))))
    hexes = list(map(_hexlify, leaves))
    # The headers, joined, must be the expected ones (one %-format for the whole run) but for the
    # tag values, which must be lowercase hex: every header is exactly ``cut`` long (else the total
    # length differs), so the tags are the same columns of each; they are taken out and zeroed,
    # then one comparison covers seq, prev (the previous leaf), writer id and punctuation.
    stored = bytearray().join(headers)
    if len(stored) != m * cut:
        return None
    args: list[object] = [None] * (2 * m)
    args[0::2] = range(seq, seq + m)
    args[1] = prev
    args[3::2] = hexes[:-1]
    expected = ((fmt + b"0" * TAG_HEX + b'",') * m) % tuple(args)
    zeros = b"0" * m
    tags = bytearray()
    for col in range(cut - TAG_HEX - 2, cut - 2):
        tags += stored[col::cut]
        stored[col::cut] = zeros
    if stored != expected or tags.translate(None, _HEX_DIGITS):
        return None
    inference = list(map(bytes.startswith, lines, repeat(INFERENCE), repeat(cut)))
    n_inf = sum(inference)
    events: list[tuple[int, bytes]] = []
    if n_inf < m:  # the other entries are few: look at each
        for k in compress(range(m), map(operator.not_, inference)):
            if lines[k].startswith(EVENT, cut):
                events.append((k, lines[k][:-1]))
    return leaves, hexes, n_inf, events


# -- header ----------------------------------------------------------------------------------


def writer_tail(writer_id: str) -> bytes:
    """The bytes between ``prev`` and the tag value in every header of ``writer_id``:
    ``","writer_id":"<id>","org_tag":"``."""
    return b'","writer_id":' + orjson.dumps(writer_id) + b"," + TAG_KEY


def header_format(tail: bytes) -> bytes:
    """A ``%``-format of a writer's header up to its tag value: ``fmt % (seq, prev_hex)``."""
    return b'{"seq":%d,"prev":"%b' + tail.replace(b"%", b"%%")


def expected_header(seq: int, prev: bytes, tail: bytes) -> bytes:
    """The bytes entry ``seq`` of a writer (its :func:`writer_tail`) must start with, up to its tag."""
    return header_format(tail) % (seq, prev)


def parse_header(line: bytes, tail: bytes) -> tuple[int, bytes, int] | None:
    """``(seq, prev hex, offset of the body)`` by slicing the fixed-position header, or None.

    ``tail`` is the writer's :func:`writer_tail`. ``seq`` must be a canonical decimal, ``prev`` and
    the tag lowercase hex; the header ends with ``",`` after the tag, or ``"}`` for an entry
    without fields (the whole line). The tag is ``line[body - 34 : body - 2]`` (:func:`tag_at`).
    """
    if line[:7] != HEADER_START:
        return None
    j = line.find(b',"prev":"', 7, 29)
    if j <= 7 or not line.startswith(tail, j + 73):
        return None
    digits = line[7:j]
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == 48):
        return None
    k = j + 73 + len(tail)
    end = line[k + TAG_HEX : k + TAG_HEX + 2]
    if (end != b'",' and (end != b'"}' or len(line) != k + TAG_HEX + 2)) or _HEX32.fullmatch(
        line, k, k + TAG_HEX
    ) is None:
        return None
    return int(digits), line[j + 9 : j + 73], k + TAG_HEX + 2


def tag_at(line: bytes, body: int) -> bytes:
    """The ``org_tag`` of a line whose body starts at ``body`` (from :func:`parse_header`)."""
    return line[body - TAG_HEX - 2 : body - 2]


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

#: One entry for :func:`encode_entries`: a mapping, its JSON object bytes, ``(bytes, org_id)`` or
#: ``(bytes, org_id, body_digest(bytes))``.
EntryInput = Mapping[str, Any] | bytes | tuple[bytes, str] | tuple[bytes, str, bytes]


def body_digest(raw: bytes) -> bytes:
    """The SHA-256 an entry's leaf hash covers for a pre-encoded body (see :func:`leaf_hash`):
    of ``raw`` without its ``{``, or of nothing for ``{}``. Computed where the body is made (a
    prepare process), it is handed to :func:`encode_entries` with the body."""
    return _sha256(memoryview(raw)[1:]).digest() if len(raw) > 2 else _EMPTY_DIGEST


def encode_entries(
    entries: Iterable[EntryInput], writer_id: str, seq: int, prev: bytes
) -> tuple[bytearray, list[bytes]]:
    """Encode entries ``seq, seq+1, ...`` chained after leaf ``prev`` (hex bytes).

    An entry is

    - a mapping (its ``org_id`` is read from it, see :func:`org_of`);
    - ``(body, org_id)``: ``body`` already holding its JSON object (``orjson.dumps`` of a mapping
      without the header keys, e.g. made in another process) and ``org_id`` what :func:`org_of`
      gives for that mapping (``""`` when it has no string ``org_id``). The caller vouches for the
      pair: the tag is made from ``org_id`` as given (the writer's prepare processes know it);
    - ``(body, org_id, digest)``: the same with ``digest`` being :func:`body_digest` of ``body``,
      vouched for by the caller too (one hash less here; a wrong one makes a leaf hash that does
      not match the stored line, which verification reports);
    - ``bytes`` alone: such a body whose ``org_id`` this function finds by parsing it (correct,
      but a JSON parse per entry: prefer the pair).

    Returns the bytes to append (lines with newlines) and the leaf hash of each entry.
    """
    buf = bytearray()
    leaves: list[bytes] = []
    wid = orjson.dumps(writer_id)
    dumps = orjson.dumps
    sha = _sha256
    hexlify = _hexlify
    tag_seed = sha(ORG_TAG_DOMAIN + writer_id.encode() + b"\x00")
    for entry in entries:
        digest = None
        if isinstance(entry, tuple):
            if len(entry) == 3:
                raw, org, digest = entry
                if not isinstance(digest, bytes) or len(digest) != 32:
                    raise EntryError("a pre-encoded entry's digest must be 32 bytes")
            else:
                raw, org = entry
            if not isinstance(raw, bytes) or not isinstance(org, str):
                raise EntryError("a pre-encoded entry pair must be (bytes, str)")
        elif isinstance(entry, bytes):
            raw = entry
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise EntryError("a pre-encoded entry must be a JSON object") from None
            if not isinstance(obj, dict):
                raise EntryError("a pre-encoded entry must be a JSON object")
            org = org_of(obj)
        else:
            raw = dumps(entry)
            org = org_of(entry)
        if raw[:1] != b"{":
            raise EntryError("a pre-encoded entry must be a JSON object")
        t = tag_seed.copy()
        t.update(b"%d\x00%b" % (seq, org.encode()))
        tag = t.hexdigest()[:TAG_HEX].encode()
        if digest is None:
            digest = body_digest(raw)
        if len(raw) > 2:
            head = b'{"seq":%d,"prev":"%b","writer_id":%b,"org_tag":"%b",' % (seq, prev, wid, tag)
            buf += head
            buf += memoryview(raw)[1:]  # without its "{"
        else:  # an entry without fields: the header alone, closed
            head = b'{"seq":%d,"prev":"%b","writer_id":%b,"org_tag":"%b"}' % (seq, prev, wid, tag)
            buf += head
        buf += b"\n"
        leaf = sha(b"\x00" + head + digest).digest()
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

    ``line`` is the stored bytes (hashed as they are, see :func:`leaf_hash`), ``leaf`` their leaf
    hash, ``prev`` the leaf hash (hex) of the entry before. ``record`` parses the line (once per call: keep the result).
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

    @property
    def header(self) -> bytes:
        """The stored header, up to and including the comma (or brace) after ``org_tag``."""
        return self.line[: header_end(self.line)]

    @property
    def org_tag(self) -> bytes:
        """The entry's tenant tag (32 hex digits): compare with :func:`org_tag` of a candidate tenant."""
        cut = header_end(self.line)
        return self.line[cut - TAG_HEX - 2 : cut - 2]

    def body_digest(self) -> bytes:
        """SHA-256 of the body (the bytes after the header): with :attr:`header`, the tlog entry."""
        return _sha256(self.line[header_end(self.line) :]).digest()

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
