"""Text normalised for detection, with a map back to the original characters.

Recognizers look at a *detection copy* of the text: format characters (category Cf: zero-width
space U+200B, word joiner U+2060, soft hyphen U+00AD, ZWNJ/ZWJ, BOM, tag characters ...) and
variation selectors removed; every character with a Unicode decimal value (Arabic-Indic,
Devanagari, full-width, mathematical digits ...) mapped to its ASCII digit; characters whose NFKC
form is ASCII text a recognizer reads (full-width letters, ``＠``, ``．``, circled digits,
ligatures ...) replaced by that form; Unicode spaces, dashes and line separators mapped to ``" "``,
``"-"`` and ``"\\n"``. Spans found in the copy are mapped back to the *original* characters, so
the original span (invisible characters inside it included) is what gets replaced.

The clean path stays cheap: ASCII text (``str.isascii`` is O(1)) and text without any character
the copy would change (one regex search) are returned as they are, with no map. The tables are
built on first use (about 40 ms), not at import.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

#: ASCII characters some recognizer reads besides letters and digits; an NFKC form that holds
#: none of these (nor a letter or digit), e.g. the full-width comma, is not needed for detection.
_RELEVANT: Final = frozenset("@.+-_/:=~%()' \n")
#: Code point ranges scanned for the tables: the BMP, the SMP (mathematical letters and digits,
#: historic scripts' digits) and the tag characters (U+E0000..U+E0FFF: invisible, Cf, and
#: variation selectors supplement).
_RANGES: Final = ((0x80, 0x20000), (0xE0000, 0xE1000))
#: Characters common in Chinese prose that the copy changes but that matter for detection only
#: next to a digit (or a hex digit): they do not by themselves trigger normalisation.
_QUIET: Final = "\uff08\uff09\uff1a\u3000"


@dataclass(frozen=True, slots=True)
class _Tables:
    one: dict[int, str]  # one original character -> one ASCII character (str.translate)
    one_chars: dict[str, str]  # the same, keyed by the character (for the sparse path)
    one_filled: dict[int, str | int]  # ``one`` plus identity entries for CJK text (a hit is cheaper than a miss)
    one_bmp_re: re.Pattern[str]  # any key of ``one`` below U+10000
    var: dict[str, str]  # one original character -> "" or several characters
    trigger: str
    trigger_re: re.Pattern[str]
    var_re: re.Pattern[str] | None
    var_bmp_re: re.Pattern[str] | None  # the keys of ``var`` below U+10000


def _class(chars: list[str]) -> str:
    """A regex character class matching exactly ``chars`` (as ranges)."""
    cps = sorted({ord(c) for c in chars})
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = cps[i], cps[j]
        parts.append(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def _mapping(c: str) -> str | None:
    """What character ``c`` becomes in the detection copy, or None when it stays."""
    cat = unicodedata.category(c)
    if cat == "Cf" or 0xFE00 <= ord(c) <= 0xFE0F or 0xE0100 <= ord(c) <= 0xE01EF or c == "\u034f":
        return ""
    if cat == "Nd":
        return str(unicodedata.decimal(c))
    if cat == "Zs":
        return " "
    if cat in ("Zl", "Zp") or c == "\x85":
        return "\n"
    if cat == "Pd" or c in "\u2212\ufe63\uff0d":
        return "-"
    k = unicodedata.normalize("NFKC", c)
    if k != c and k.isascii() and any(ch.isalnum() or ch in _RELEVANT for ch in k):
        return k
    return None


@functools.cache
def _tables() -> _Tables:
    one: dict[int, str] = {}
    var: dict[str, str] = {}
    for lo, hi in _RANGES:
        for cp in range(lo, hi):
            if 0xD800 <= cp <= 0xDFFF:
                continue
            c = chr(cp)
            m = _mapping(c)
            if m is None:
                continue
            if len(m) == 1:
                one[cp] = m
            else:
                var[c] = m
    loud = [chr(cp) for cp in one if chr(cp) not in _QUIET] + list(var)
    trigger = _class(loud) + "|" + _class(list(_QUIET)) + "[0-9A-Fa-f\uff10-\uff19\uff21-\uff26\uff41-\uff46]"
    var_re = re.compile(_class(list(var))) if var else None
    one_chars = {chr(cp): m for cp, m in one.items()}
    one_filled: dict[int, str | int] = dict.fromkeys(_IDENTITY_FILL, 0)
    for cp in one_filled:
        one_filled[cp] = cp
    one_filled.update(one)
    # ``re`` matches a class holding only BMP characters with a bitmap, one holding a character
    # above U+FFFF range by range: ~30 times slower. Texts without such characters (nearly all)
    # are scanned with the BMP parts.
    one_bmp_re = re.compile(_class([c for c in one_chars if c <= _BMP_MAX]))
    var_bmp = [c for c in var if c <= _BMP_MAX]
    var_bmp_re = re.compile(_class(var_bmp)) if var_bmp else None
    return _Tables(one, one_chars, one_filled, one_bmp_re, var, trigger, re.compile(trigger), var_re, var_bmp_re)


#: Code points that ``str.translate`` meets most in Chinese text and leaves alone (CJK punctuation,
#: Hiragana/Katakana, the unified ideographs): looked up as identity entries instead of misses.
_IDENTITY_FILL: Final = (*range(0x3000, 0x3100), *range(0x4E00, 0xA000))
_BMP_MAX: Final = "\uffff"
_ASTRAL: Final = re.compile("[\U00010000-\U0010ffff]")


#: Up to this share of mapped characters, ``_map_one`` replaces them one by one (slices between
#: them); above it, ``str.translate`` over the whole text is cheaper.
_SPARSE: Final = 16


def _map_one(text: str, tables: _Tables, bmp: bool) -> str:
    """``text.translate(tables.one)``, without a dictionary miss per unmapped character.

    ``str.translate`` looks every non-ASCII character up in the table, and each one not in it
    (every Chinese character) costs a ``KeyError`` raised and caught inside it: ~50 ns a
    character. Where few characters map (the usual case: a phone number in full-width digits in a
    Chinese prompt), one regex pass finds them and the copy is built from slices. ``bmp``: the
    text holds no character above U+FFFF (else the table does it all).
    """
    if not bmp:
        return text.translate(tables.one_filled)
    one = tables.one_chars
    budget = len(text) // _SPARSE  # more mapped characters than this: the table is cheaper
    pieces: list[str] = []
    last = 0
    for m in tables.one_bmp_re.finditer(text):
        if budget == 0:
            return text.translate(tables.one_filled)
        budget -= 1
        i = m.start()
        pieces.append(text[last:i])
        pieces.append(one[text[i]])
        last = i + 1
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def trigger_pattern() -> str:
    """A regex (valid for ``re`` and for hyperscan in UTF-8 mode) matching where ``normalize`` changes text.

    The quiet characters (full-width parentheses and colon, the ideographic space) count only
    before a digit or hex letter, so ordinary Chinese punctuation does not trigger the copy.
    """
    return _tables().trigger


def needs_normalize(text: str) -> bool:
    """Whether ``normalize`` would build a copy of ``text`` (the Python form of the trigger)."""
    return not text.isascii() and _tables().trigger_re.search(text) is not None


@dataclass(frozen=True, slots=True)
class OffsetMap:
    """For each character of the detection copy, the index of the original character it came from."""

    origin: list[int]

    def span(self, a: int, b: int) -> tuple[int, int]:
        """The original span of the copy's span ``[a, b)`` (``b > a``)."""
        return self.origin[a], self.origin[b - 1] + 1


def normalize(text: str, *, checked: bool = False) -> tuple[str, OffsetMap | None]:
    """The detection copy of ``text`` and its offset map (None when spans are unchanged).

    ``checked``: the caller already knows the trigger matches (the compiled gate said so).
    """
    if text.isascii():
        return text, None
    tables = _tables()
    if not checked and tables.trigger_re.search(text) is None:
        return text, None
    bmp = _ASTRAL.search(text) is None
    t = _map_one(text, tables, bmp)  # one character to one: spans unchanged
    var_re = tables.var_bmp_re if bmp else tables.var_re
    if var_re is None or var_re.search(t) is None:
        return t, None
    var = tables.var
    pieces: list[str] = []
    origin: list[int] = []
    last = 0
    for m in var_re.finditer(t):
        i = m.start()
        if i > last:
            pieces.append(t[last:i])
            origin.extend(range(last, i))
        rep = var[t[i]]
        if rep:
            pieces.append(rep)
            origin.extend([i] * len(rep))
        last = i + 1
    pieces.append(t[last:])
    origin.extend(range(last, len(t)))
    return "".join(pieces), OffsetMap(origin)
