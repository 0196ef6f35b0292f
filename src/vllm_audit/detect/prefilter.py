"""Which pattern rules *may* match a text: one hyperscan pass over every rule's patterns at once.

The pattern rules' regexes are Python regexes; a Python search costs ~5 µs per rule and variant
even on a clean prompt. :class:`Prefilter` compiles the patterns of several rules into one
hyperscan database in *prefilter mode* (``HS_FLAG_PREFILTER``: hyperscan may report a match the
pattern would not make, never miss one) and returns a bit mask: bit ``i`` set means rule ``i``'s
Python regex must run on this text; clear means it cannot match. The engine then runs the exact
Python regex only on those candidates, so a decision is the Python regex's, always.

The mask is trusted only where hyperscan's regex dialect provably agrees with Python's (else the
bit is set and the Python regex decides):

- per pattern: only plain syntax (escapes ``\\b \\B \\d \\D \\s \\S \\w \\W \\A \\Z \\n \\r \\t \\f \\v``,
  escaped punctuation, back-references, ``(?:`` and look-arounds; no ``{,n}``, no ``[:``, no
  ``\\u``/``\\x``/named groups, no inline flags) and no cased non-ASCII letter (Python's and
  hyperscan's Unicode case folding could differ); a pattern hyperscan cannot compile leaves its
  rule uncovered;
- per text: only printable ASCII with ``\\t \\n \\r``, common CJK ideographs (U+4E00–U+9FA5) and
  CJK / full-width / general punctuation. Any other character (``\\x1c``, which Python's ``\\s``
  matches and hyperscan's does not; accented letters; exotic spaces; lone surrogates) sets every
  bit. Obfuscated text is decoded into variants first (``features.variants``), each scanned.

Without the ``hyperscan`` package every bit is always set (the plain engine).
``tests/detect/test_prefilter.py`` checks that the pre-filtered engine and the plain engine give
identical decisions over the fixtures and thousands of generated records.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from vllm_audit._hyperscan import HS

_hs = HS

AVAILABLE = _hs is not None

#: Characters outside the set where hyperscan (UTF-8, UCP, caseless) and Python ``re`` agree.
_UNTRUSTED = re.compile(
    "[^\t\n\r\x20-\x7e\u4e00-\u9fa5\u3001-\u3004\u3008-\u3011\u3014-\u301f"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff3e\uff40\uff5b-\uff5e\u2010-\u2027\u2030-\u203e]"
)
_ESCAPE_OK = frozenset("bBdDsSwWAZnrtfv123456789") | frozenset(
    chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()
)
_GROUP_OK = ("(?:", "(?=", "(?!", "(?<=", "(?<!")


def plain_syntax(pattern: str) -> bool:
    """The pattern uses only syntax that means the same (or less) in Python and in hyperscan."""
    if "{," in pattern or "[:" in pattern or "[=" in pattern or "[." in pattern or "[[" in pattern:
        return False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= n or pattern[i + 1] not in _ESCAPE_OK:
                return False
            i += 2
            continue
        if ch == "(" and pattern.startswith("(?", i) and not pattern.startswith(_GROUP_OK, i):
            return False
        if not ch.isascii() and (ch.lower() != ch or ch.upper() != ch or ch.casefold() != ch):
            return False
        i += 1
    return True


def trusted(text: str) -> bool:
    """Hyperscan's verdict on ``text`` may be trusted (see the module docstring)."""
    return _UNTRUSTED.search(text) is None


class Prefilter:
    """One database over several rules' patterns; :meth:`mask` says which rules may match."""

    __slots__ = ("_db", "_local", "_scratch", "all", "covered")

    def __init__(self, rules: Sequence[Sequence[str]]) -> None:
        #: A bit per rule; ``covered``: the rules whose patterns all compiled.
        self.all = (1 << len(rules)) - 1
        self.covered = 0
        self._db: Any = None
        self._scratch: Any = None
        self._local = threading.local()
        if _hs is None:
            return
        flags = (
            _hs.HS_FLAG_CASELESS
            | _hs.HS_FLAG_UTF8
            | _hs.HS_FLAG_UCP
            | _hs.HS_FLAG_PREFILTER
            | _hs.HS_FLAG_SINGLEMATCH
            | _hs.HS_FLAG_ALLOWEMPTY
        )
        plain = [i for i, patterns in enumerate(rules) if patterns and all(plain_syntax(p) for p in patterns)]
        db = _database(rules, plain, flags)
        if db is None:  # some pattern does not compile: leave its rule out (each checked alone)
            plain = [i for i in plain if all(_database(((p,),), [0], flags) for p in rules[i])]
            db = _database(rules, plain, flags)
        if db is None:
            return
        for i in plain:
            self.covered |= 1 << i
        self._db = db
        self._scratch = _hs.Scratch(db)

    def mask(self, text: str) -> int:
        """A bit per rule: set when the rule's Python regex must run on ``text``."""
        if self._db is None or not trusted(text):
            return self.all
        bits = [self.all & ~self.covered]

        def on_match(i: int, _a: int, _b: int, _f: int, _c: object) -> None:
            bits[0] |= 1 << i

        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._scratch.clone()
        self._db.scan(text.encode(), match_event_handler=on_match, scratch=scratch)
        return bits[0]


def _database(rules: Sequence[Sequence[str]], which: Sequence[int], flags: int) -> Any:
    """A database of the patterns of ``rules[i]`` for ``i`` in ``which`` (id ``i``); None if it does not compile."""
    assert _hs is not None
    exprs = [p.encode() for i in which for p in rules[i]]
    ids = [i for i in which for _p in rules[i]]
    if not exprs:
        return None
    db = _hs.Database()
    try:
        db.compile(expressions=exprs, ids=ids, elements=len(exprs), flags=[flags] * len(exprs))
    except Exception:  # hyperscan.error: an unsupported construct
        return None
    return db


@functools.cache
def prefilter(rules: tuple[tuple[str, ...], ...]) -> Prefilter:
    """The (shared) prefilter over these rules' pattern lists."""
    return Prefilter(rules)
