"""Which recognizers can match a text: one compiled multi-pattern pass (hyperscan), or Python gates.

``hits(text)`` returns a bit mask: ``NORM`` (the text holds a character the detection copy
changes, see ``normalize``), ``NUM`` (a number/ID/IPv4 seed, ``NUM_SEED``: nine digits with
separators, ``+`` and eight, an area code in parentheses and four, seven in a row, ``d.d.d.d``,
or two capitals then two digits), ``EMAIL`` (``@``), ``IPV6`` (``::`` or six colons), ``IBAN``
(the literal), and one bit per secret (``secret_bit(i)``: its gate pattern, a prefix every match
of the secret holds, or its literal hint where it has none). A recognizer
whose bit is clear cannot match, so it does not run: a clean text costs one scan.

With the ``hyperscan`` package (Intel Hyperscan, a DFA-based multi-pattern matcher; Linux/macOS
x86-64 wheels) every gate is one pattern of one database, matched in one pass over the UTF-8
bytes, each pattern reported at most once (``HS_FLAG_SINGLEMATCH``). Without it the same bits
come from Python checks (``in``, a regex per gate); both give the same bits
(``tests/privacy/test_gate.py``).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from vllm_audit._hyperscan import HS
from vllm_audit.privacy import normalize as nz

NORM: Final = 1 << 0
NUM: Final = 1 << 1
EMAIL: Final = 1 << 2
IPV6: Final = 1 << 3
IBAN: Final = 1 << 4
_SECRET0: Final = 5

#: Number/ID seeds: a superset of what any validated finding of the number scan holds. Nine digits
#: with separators (every national number, ID and card: 9 to 19 digits), ``+`` and eight (an
#: international number: a country code and at least 7 more), ``(0xx)`` / ``(+cc)`` and four more
#: digits (the area or code in parentheses, then 7-8 / 4+), seven digits in a row (passports,
#: permits: a letter or two then 7-8 digits; a USCC's 2nd-8th characters), ``d.d.d.d`` (IPv4) and
#: two capitals then two digits (IBAN). Dates and clock times (``2025-06-03``, ``14:22:51``) hold none.
NUM_SEED: Final = (
    r"[0-9](?:[ \t\r\n.\-]{0,3}[0-9]){8}|[0-9]{7}|[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]|[A-Z]{2}[0-9]{2}"
    r"|\+[ ]?[0-9](?:[ \t\r\n.\-]{0,3}[0-9]){7}|\(\+?[0-9]{1,4}\)[ ]?[0-9](?:[ \t\r\n.\-]{0,3}[0-9]){3}"
)
#: The same seeds written for a ``re`` search (the number scan's, ``recognizers._scan_numbers``):
#: one character class first (``re`` then skips to the next digit, "+" or "(" at C speed instead of
#: trying three branches at every position: half the time over prose), each branch re-checking
#: that character with a lookbehind, the IBAN branch as a lookbehind on its two capitals. Its
#: matches are those of ``NUM_SEED`` but for the IBAN branch, which starts at the digits; it
#: matches somewhere exactly where ``NUM_SEED`` does (``tests/privacy/test_gate.py``). Hyperscan
#: has no lookbehind, so the gate keeps the plain form.
NUM_SEED_SEARCH: Final = (
    r"[0-9+(](?:"
    r"(?<=[0-9])(?:(?:[ \t\r\n.\-]{0,3}[0-9]){8}|[0-9]{6}|\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]|(?<=[A-Z]{2}[0-9])[0-9])"
    r"|(?<=\+)[ ]?[0-9](?:[ \t\r\n.\-]{0,3}[0-9]){7}"
    r"|(?<=\()\+?[0-9]{1,4}\)[ ]?[0-9](?:[ \t\r\n.\-]{0,3}[0-9]){3})"
)
#: A valid IPv6 candidate holds "::" or at least six colons with only hex digits and dots between.
IPV6_SEED: Final = r"::|:(?:[0-9A-Fa-f.]*:){5}"
_NUM_RE: Final = re.compile(NUM_SEED)
_NUM_BYTES: Final = re.compile(NUM_SEED.encode())
_NOT_NUM: Final = bytes(sorted(set(range(256)) - set(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ \t\r\n.-+()")))
_IPV6_RE: Final = re.compile(IPV6_SEED)


def secret_bit(i: int) -> int:
    """The bit of the ``i``-th secret hint."""
    return 1 << (_SECRET0 + i)


_hs: Final = HS

AVAILABLE: Final = _hs is not None


class _Compiled:
    """A compiled hyperscan database with a scratch space per thread (cloned on first use)."""

    def __init__(self, exprs: Sequence[str], ids: Sequence[int], flags: int) -> None:
        assert _hs is not None
        self.db = _hs.Database()
        self.db.compile(
            expressions=[e.encode() for e in exprs], ids=list(ids), elements=len(exprs), flags=[flags] * len(exprs)
        )
        self._scratch = _hs.Scratch(self.db)
        self._local = threading.local()

    def scan(self, data: bytes, handler: Callable[..., Any], context: Any) -> None:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._scratch.clone()
        # Positional: (data, match_event_handler, flags, context, scratch), the binding's order in
        # every release pyproject admits. Keywords cost ~0.3 µs a call, a third of a short scan.
        self.db.scan(data, handler, 0, context, scratch)


class _Scanner:
    """Every gate in one compiled database; ASCII text gets a second one without the detection
    copy's trigger (it holds no ASCII character, so its bit stays clear there) and without UTF-8
    decoding: ~40 % less per scan."""

    def __init__(self, hints: Sequence[str], patterns: Sequence[str | None]) -> None:
        assert _hs is not None
        norm = nz.trigger_pattern()
        secrets = (re.escape(h) if p is None else p for h, p in zip(hints, patterns, strict=True))
        exprs = [norm, NUM_SEED, "@", IPV6_SEED, "IBAN", *secrets]
        self.full = _Compiled(exprs, range(len(exprs)), _hs.HS_FLAG_UTF8 | _hs.HS_FLAG_SINGLEMATCH)
        self.ascii = _Compiled(exprs[1:], range(1, len(exprs)), _hs.HS_FLAG_SINGLEMATCH)

    def hits(self, text: str) -> int:
        bits = [0]
        try:
            data = utf8(text)
        except UnicodeEncodeError:  # lone surrogates: hyperscan needs valid UTF-8
            self.full.scan(text.encode("utf-8", "replace"), _on_match, bits)
            return bits[0]
        if len(data) == len(text):  # ASCII: the database without the detection copy's trigger
            self.ascii.scan(data, _on_match, bits)
        else:
            self.full.scan(data, _on_match, bits)
        return bits[0]


#: The text :func:`utf8` encoded last and its UTF-8, replaced whole (one slot: it keeps at most one
#: text and its bytes alive; threads read the old pair or the new one, never a mix). The gate
#: encodes every text it scans; the number scan and the redactor's lone-surrogate check, which
#: look at the same text right after, read its bytes from here.
_last_utf8: tuple[str, bytes] = ("", b"")


def utf8(text: str) -> bytes:
    """``text.encode()`` (``UnicodeEncodeError`` on a lone surrogate): the bytes of the last call
    when it was for this very object (strings are immutable), else encoded now and kept."""
    global _last_utf8
    last = _last_utf8
    if last[0] is text:
        return last[1]
    data = text.encode()
    _last_utf8 = (text, data)
    return data


def forget() -> None:
    """Empty :func:`utf8`'s slot: the redactor calls it when a record is done, so the raw text
    it last scanned is not kept alive by the slot until the next scan."""
    global _last_utf8
    _last_utf8 = ("", b"")


def _on_match(i: int, _a: int, _b: int, _f: int, bits: list[int]) -> None:
    """Hyperscan's match callback: sets pattern ``i``'s bit in the scan's context (no closure per scan)."""
    bits[0] |= 1 << i


class _SeedScanner:
    """``NUM_SEED`` alone, compiled: where the first seed of a stretch of bytes ends."""

    def __init__(self) -> None:
        assert _hs is not None
        self.compiled = _Compiled([NUM_SEED], [0], _hs.HS_FLAG_SINGLEMATCH)

    def end(self, data: bytes, start: int) -> int:
        """The end offset in ``data`` of the first seed match that ends in ``data[start:]`` and
        starts there (hyperscan reports matches by their end; with one match per scan, the
        earliest), or -1. ``start`` must not fall inside a seed's characters."""
        found = [-1]
        self.compiled.scan(data[start:] if start else data, _on_seed, found)
        return found[0] + start if found[0] >= 0 else -1


def _on_seed(_i: int, _a: int, b: int, _f: int, found: list[int]) -> None:
    found[0] = b


#: ``seed_end(data, start)``: the compiled seed search (None without hyperscan).
seed_end: Final[Callable[[bytes, int], int] | None] = _SeedScanner().end if AVAILABLE else None


@functools.cache
def _scanner(hints: tuple[str, ...], patterns: tuple[str | None, ...]) -> _Scanner:
    return _Scanner(hints, patterns)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def python_hits(
    text: str, hints: Sequence[str], gates: Sequence[str], patterns: Sequence[str | None] | None = None
) -> int:
    """The same bits as the compiled scanner, from Python checks.

    ``gates``: a rare character per hint (checked first, at C speed); ``patterns``: the secrets'
    gate patterns (None: the hint alone), searched only where the hint occurs.
    """
    bits = 0
    if not text.isascii() and nz.needs_normalize(text):
        bits |= NORM
    if text.isascii():
        # Dropping (at C speed) every byte no seed holds keeps each seed contiguous: no seed in
        # what is left means none in the text; otherwise the real search decides.
        if _NUM_BYTES.search(text.encode().translate(None, _NOT_NUM)) is not None and _NUM_RE.search(text):
            bits |= NUM
    elif _NUM_RE.search(text) is not None:
        bits |= NUM
    if "@" in text:
        bits |= EMAIL
    if ":" in text and ("::" in text or (text.count(":") >= 6 and _IPV6_RE.search(text) is not None)):
        bits |= IPV6
    if "IBAN" in text:
        bits |= IBAN
    pats = (None,) * len(hints) if patterns is None else patterns
    for i, (hint, gate, pattern) in enumerate(zip(hints, gates, pats, strict=True)):
        if gate in text and hint in text and (pattern is None or _compiled(pattern).search(text) is not None):
            bits |= secret_bit(i)
    return bits


def make_hits(
    hints: Sequence[str],
    gates: Sequence[str],
    patterns: Sequence[str | None] | None = None,
    *,
    compiled: bool = True,
) -> Callable[[str], int]:
    """The gate function for these secrets: compiled when hyperscan is installed (and wanted)."""
    pats = (None,) * len(hints) if patterns is None else tuple(patterns)
    if compiled and AVAILABLE:
        return _scanner(tuple(hints), pats).hits
    hints, gates = tuple(hints), tuple(gates)
    return lambda text: python_hits(text, hints, gates, pats)
