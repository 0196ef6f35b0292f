"""Recognizers: a few precompiled candidate patterns, then validators decide.

Chinese text has no word boundaries, so candidates are delimited with lookarounds on ASCII
letters and digits (``(?<![0-9A-Za-z])``), never ``\\b``. Recognizers read the detection copy of
the text (``normalize``: invisible characters removed, Unicode digits, full-width forms, spaces
and dashes mapped to ASCII) and each span found is mapped back to the original characters. Digit
groups may be separated by up to three of space, tab, newline, ``-`` and ``.`` (dots only as in
``138.1234.5678``: two or more, between groups of two or more digits). ``gate.hits`` says, in one
compiled pass, which recognizers can match at all; the others do not run.

``find(text)`` returns non-overlapping findings ``(start, end, entity_type, canonical_value)``
sorted by start; the canonical value (digits only, lower-case e-mail, ...) is what pseudonyms hash,
so ``138-1234-5678`` and ``13812345678`` get the same pseudonym.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable, Collection
from typing import Final

from vllm_audit.privacy import checksums as cs
from vllm_audit.privacy import gate
from vllm_audit.privacy.config import ENTITY_TYPES
from vllm_audit.privacy.normalize import normalize

Finding = tuple[int, int, str, str]

# One pass finds every number-like and ID-like candidate. It starts with a character class (so the
# regex engine skips ahead fast), checks the character before it with a two-character lookbehind,
# and ends each branch with an empty named group that tells which branch matched.
_SCAN: Final = re.compile(
    r"[0-9A-Z+(](?<![0-9+.][0-9A-Z+(])(?:"
    r"(?<=[0-9])[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9A-Za-z]|\.[0-9])(?P<IP>)"
    r"|(?<=[0-9+(])(?:(?<=\+)[ ]?|(?<=0)0[ ]?|(?<=\()\+?[0-9]{1,4}\)[ ]?)?"  # +86, 0086, (+86), (010)
    r"(?:(?<=[0-9])|[0-9])(?:[ \t\r\n.\-]{0,3}[0-9]){6,40}[Xx]?(?![0-9A-Za-z]|\.[0-9])(?P<NUM>)"
    r"|(?<=[0-9A-Z])(?:[A-Z][0-9]{2}(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?|[0-9A-Z]{7,33})(?![0-9A-Za-z])(?P<ALNUM>)"
    r")"
)
#: Every _SCAN match lies inside one run of these characters (lower-case only in ``[Xx]``).
_RUN_CHARS: Final = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+() .-x\t\r\n")
_RUN: Final = re.compile(r"[0-9A-Z+() .\-x\t\r\n]*")
#: Every _SCAN match that can yield an entity contains a seed of ``gate.NUM_SEED`` (9 digits with
#: separators, "+" and 8, "(0xx)"/"(+cc)" and 4, 7 in a row, "1.2.3.4", two capitals then two
#: digits), and a run without one holds no such match. Runs are independent: a match never spans
#: two of them. The search form of the same seeds:
_SEED: Final = re.compile(gate.NUM_SEED_SEARCH)
_MAX_RUNS: Final = 4
_ALL: Final = frozenset(ENTITY_TYPES)
#: The types the number/ID scan reports.
_SCAN_TYPES: Final = _ALL - {"EMAIL", "API_KEY", "JWT", "PRIVATE_KEY", "URL_CREDENTIALS"}
_IPV6_SEED: Final = re.compile(gate.IPV6_SEED)
_HEX_COLON_DOT_RUN: Final = re.compile(r"[0-9A-Fa-f:.]*")
#: ASCII words a number may be glued to in Chinese text ("ID110...", "Tel138...").
_GLUE_OK: Final = ("ID", "Id", "No", "Tel", "TEL", "NO", "SSN")
#: A 15-digit legacy ID is only taken with an identity keyword shortly before it.
_ID15_CONTEXT: Final = re.compile(r"(?i:身份|证件|证号|\bID|identity)")
_IBAN_GLUED: Final = re.compile(
    r"IBAN[ :：]?([A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)(?![0-9A-Za-z])"
)
_SSN: Final = re.compile(r"([0-9]{3})([ \-])([0-9]{2})\2([0-9]{4})")
_EMAIL_DOMAIN: Final = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_EMAIL_LOCAL: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_HEX_COLON: Final = frozenset("0123456789abcdefABCDEF:")
_HEX_COLON_DOT: Final = frozenset("0123456789abcdefABCDEF:.")
_VERSION_CONTEXT: Final = re.compile(
    r"(?i:version|ver\.?|release|build|rev(?:ision)?|版本[号為为是]?|内部版本号?)[ \t:：=]*$"
)
#: A 12-digit Chinese invoice code (发票代码) is not a landline.
_INVOICE_CONTEXT: Final = re.compile(r"(?i:发票|票据|税控|invoice)[^0-9]{0,8}$")
#: A rare character every match of a secret pattern holds (default: the hint's last character).
_SECRET_GATE = {"gh": "_", "aws_secret_access_key": "_", "AKIA": "K", "ASIA": "S", "xox": "-", "eyJ": "J"}
_SECRET_GATE |= {"-----BEGIN": "-", "Bearer ": "B"}
#: Secrets start with a literal: ``hint in text`` (fast) gates a search for the pattern. The gate
#: pattern (third) is a prefix of what every match of the pattern holds, hyperscan- and ``re``-valid,
#: so text where only the hint occurs ("gh" in "though", "sk-" in "task-list") sets no bit; None: the
#: hint alone gates.
_SECRET_DEFS: Final = (
    ("sk-", r"sk-(?:ant-|proj-|svcacct-|admin-)?(?P<s>[A-Za-z0-9_\-]{20,})", r"sk-[A-Za-z0-9_\-]{20}", "API_KEY"),
    ("AKIA", r"AKIA[A-Z0-9]{16}(?![A-Za-z0-9])", r"AKIA[A-Z0-9]{16}", "API_KEY"),
    ("ASIA", r"ASIA[A-Z0-9]{16}(?![A-Za-z0-9])", r"ASIA[A-Z0-9]{16}", "API_KEY"),
    ("gh", r"gh[pousr]_[A-Za-z0-9]{36,}", r"gh[pousr]_[A-Za-z0-9]{36}", "API_KEY"),
    ("github_pat_", r"github_pat_[A-Za-z0-9_]{22,}", r"github_pat_[A-Za-z0-9_]{22}", "API_KEY"),
    ("xox", r"xox[abposre]-[A-Za-z0-9\-]{10,}", r"xox[abposre]-[A-Za-z0-9\-]{10}", "API_KEY"),
    (
        "eyJ",
        r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{8,}",
        r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{8}",
        "JWT",
    ),
    (
        "-----BEGIN",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\Z)",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY",
        "PRIVATE_KEY",
    ),
    ("://", r"://(?P<s>[^\s/:@]{1,256}:[^\s/@]{1,256})@", None, "URL_CREDENTIALS"),
    (
        "aws_secret_access_key",
        r"aws_secret_access_key[ \t]*[=:][ \t]*[\"']?(?P<s>[A-Za-z0-9/+=]{40})",
        None,
        "API_KEY",
    ),
    ("Bearer ", r"Bearer (?P<s>[A-Za-z0-9._~+/\-]{20,}=*)", r"Bearer [A-Za-z0-9._~+/\-]{20}", "API_KEY"),
)
_SECRETS: Final[tuple[tuple[str, str, re.Pattern[str], str], ...]] = tuple(
    (_SECRET_GATE.get(hint, hint[-1]), hint, re.compile(pattern), kind) for hint, pattern, _, kind in _SECRET_DEFS
)


_ASCII_LETTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _span_end(pattern: re.Pattern[str], t: str, pos: int) -> int:
    """Where a match of ``pattern`` (a starred class: it always matches) at ``pos`` ends."""
    m = pattern.match(t, pos)
    return pos if m is None else m.end()


def _glued(t: str, a: int) -> bool:
    return a > 0 and t[a - 1] in _ASCII_LETTERS


_HINTS: Final = tuple(hint for _, hint, _, _ in _SECRETS)
_GATES: Final = tuple(g for g, _, _, _ in _SECRETS)
_GATE_PATTERNS: Final = tuple(gate_re for _, _, gate_re, _ in _SECRET_DEFS)
_hits: Final = gate.make_hits(_HINTS, _GATES, _GATE_PATTERNS)
#: (gate bit, pattern, kind) per secret pattern, and the union of their bits: a text without a
#: secret hint skips the loop with one ``&``.
_SECRET_SCANS: Final = tuple((gate.secret_bit(i), pattern, kind, "s" in pattern.groupindex)
                             for i, (_, _, pattern, kind) in enumerate(_SECRETS))  # fmt: skip
_SECRET_MASK: Final = sum(bit for bit, _, _, _ in _SECRET_SCANS)
#: Texts up to this long are scanned by _SCAN in one pass (cheaper than finding seeds and runs
#: there: ~5 against ~8 µs for the PII corpus's texts, nearly all shorter). Longer ones are
#: searched for seeds: prose with a timestamp or a number, 160-320 characters (the window across
#: a system/user boundary), costs ~4-5 µs that way against ~10-12 µs for the one pass.
_SHORT_SCAN: Final = 160
#: A run that is an ISO date and an hour ("2025-06-03 14": what a log line's "2025-06-03 14:22:51"
#: leaves between the characters no run holds) seeds the number scan (nine digits with separators)
#: but holds no finding: its one candidate has ten digits, which no rule takes (a landline's would
#: start with 0), and no sub-run of it has the nine a number needs. Such a run is not scanned
#: (``tests/privacy/test_fast_paths.py``); log lines are full of them.
_DATE_HOUR_RUN: Final = re.compile(r"[ \t\r\n]*[12][0-9]{3}-[0-9]{2}-[0-9]{2} [0-9]{2}[ \t\r\n]*")


def find(text: str, entities: Collection[str] | None = None) -> list[Finding]:
    """All validated entities in ``text``, non-overlapping, sorted by start.

    Spans are of ``text`` itself (the detection copy is mapped back); canonical values come from
    the copy (``１３８…`` and ``138…`` get the same pseudonym). ``entities`` restricts the search
    to those types (recognizers for other types do not run; overlaps are resolved among the
    requested types only).
    """
    found: list[Finding] = []
    if len(text) < 20 and text.isascii() and text.isalpha():
        return found  # JSON keys, roles, short words: every recognizer needs a digit, "@", "-" ... or 20 chars
    bits = _hits(text)
    t, omap = text, None
    if bits & gate.NORM:
        t, omap = normalize(text, checked=True)
        if t is not text:
            bits = _hits(t)
    if not bits & ~gate.NORM:
        return found
    want = _ALL if entities is None else frozenset(entities)
    if bits & gate.NUM and (entities is None or not want.isdisjoint(_SCAN_TYPES)):
        _scan_numbers(t, found)
        if found:
            found[:] = [f for f in found if _context_ok(t, f)]
    if bits & gate.IBAN and "IBAN" in want:
        for m in _IBAN_GLUED.finditer(t):
            if cs.is_iban(m.group(1).replace(" ", "")):
                found.append((m.start(1), m.end(1), "IBAN", m.group(1).replace(" ", "")))
    if bits & gate.EMAIL and "EMAIL" in want:
        for m in _EMAIL_DOMAIN.finditer(t):
            _email(t, m, found)
    if bits & gate.IPV6 and "IP_ADDRESS" in want:
        _scan_ipv6(t, found)
    if bits & _SECRET_MASK:
        for bit, pattern, kind, group in _SECRET_SCANS:
            if not bits & bit or kind not in want:
                continue
            # Every pattern starts with its hint, so searching for the pattern visits the same matches.
            sm = pattern.search(t)
            while sm is not None:
                if kind != "JWT" or jwt_header_ok(sm.group()):
                    sa, sb = sm.span("s") if group else sm.span()
                    found.append((sa, sb, kind, t[sa:sb]))
                sm = pattern.search(t, sm.end())
    if entities is not None:
        found = [f for f in found if f[2] in want]
    if len(found) > 1:
        found = _resolve(found)
    if omap is not None:
        out: list[Finding] = []
        for a, b, kind, canonical in found:
            oa, ob = omap.span(a, b)
            out.append((oa, ob, kind, canonical))
        return out
    return found


def scannable(text: str) -> bool:
    """Whether any recognizer could match in ``text`` (its detection copy included): one gate pass."""
    bits = _hits(text)
    if bits & gate.NORM:
        t, _ = normalize(text, checked=True)
        if t is not text:
            bits = _hits(t)
    return bool(bits & ~gate.NORM)


def _context_ok(t: str, f: Finding) -> bool:
    """Rules that need the text before a number: legacy IDs need a keyword, invoice codes are not phones."""
    if f[2] == "CN_ID" and len(f[3]) == 15:
        return _id15_context(t, f[0])
    if f[2] == "CN_LANDLINE":
        return _INVOICE_CONTEXT.search(t, max(0, f[0] - 16), f[0]) is None
    return True


def _scan_numbers(t: str, found: list[Finding]) -> None:
    """What ``_SCAN.finditer(t)`` over the whole text finds, visiting only runs that hold a seed."""
    if len(t) <= _SHORT_SCAN:  # short text: one pass costs less than looking for seeds and runs
        _scan_range(t, 0, len(t), found)
        return
    if _SEED_END is not None:
        try:
            data = gate.utf8(t)  # encoded by the gate's scan of t just before
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for hyperscan
            _scan_searched_runs(t, found)
            return
        _scan_seeded_runs(t, data, found, _SEED_END)
        return
    _scan_searched_runs(t, found)


#: The compiled seed search (hyperscan), or None.
_SEED_END: Final = gate.seed_end


def _scan_seeded_runs(t: str, data: bytes, found: list[Finding], seed_end: Callable[[bytes, int], int]) -> None:
    """``_scan_searched_runs`` with the seeds found by the compiled ``gate.NUM_SEED`` in ``data``
    (``t`` in UTF-8) instead of by ``re``. A seed lies inside one run and ends with a digit, so the
    run around its last character is the run the ``re`` search's seed opens; ``NUM_SEED`` and the
    search form match in the same runs (``tests/privacy/test_gate.py``), so the same runs are
    visited. Seeds and runs are ASCII and UTF-8 keeps ASCII bytes for ASCII characters, so byte
    offsets turn into character offsets by decoding the bytes between them (none to decode in
    ASCII text). One compiled pass costs ~1 µs per KB where the ``re`` search tried its seed at
    every digit, "+" and "(" (~15 µs for a 1.4 KB prompt of log lines with one timestamp)."""
    ascii = len(data) == len(t)
    hi = hi_b = 0  # where the next search starts, in characters and in bytes
    runs = 0
    end_b = seed_end(data, 0)
    while end_b >= 0:
        end = end_b if ascii else hi + len(data[hi_b:end_b].decode())
        lo = end - 1
        while lo and t[lo - 1] in _RUN_CHARS:
            lo -= 1
        runs += 1
        hi = _span_end(_RUN, t, end) if runs <= _MAX_RUNS else len(t)
        _scan_run(t, lo, hi, found)
        if runs > _MAX_RUNS:
            break
        hi_b = end_b + (hi - end)  # t[end:hi] is run characters: one byte each
        end_b = seed_end(data, hi_b)


def _scan_searched_runs(t: str, found: list[Finding]) -> None:
    """The number scan over the runs that hold a seed of the ``re`` search (``_SEED``)."""
    hi = 0
    runs = 0
    seed = _SEED.search(t)
    while seed is not None:
        # The run of characters a _SCAN match can contain around the seed; _SCAN looks at most two
        # characters beyond a match, so scanning the run (plus two) finds what a full scan finds.
        # Dense text (many runs): scanning everything from this run on costs less than run by run.
        lo = seed.start()
        while lo and t[lo - 1] in _RUN_CHARS:
            lo -= 1
        runs += 1
        hi = _span_end(_RUN, t, seed.end()) if runs <= _MAX_RUNS else len(t)
        _scan_run(t, lo, hi, found)
        if runs > _MAX_RUNS:
            break
        seed = _SEED.search(t, hi)


def _scan_run(t: str, lo: int, hi: int, found: list[Finding]) -> None:
    """``_scan_range`` over the run ``[lo, hi)`` (or from a run to the end), unless it is a date
    and an hour (``_DATE_HOUR_RUN``: it holds no finding)."""
    if _DATE_HOUR_RUN.fullmatch(t, lo, hi) is None:
        _scan_range(t, lo, hi, found)


def _scan_range(t: str, lo: int, hi: int, found: list[Finding]) -> None:
    """The findings of the _SCAN matches that start in ``[lo, hi)`` (it looks two characters beyond)."""
    for m in _SCAN.finditer(t, lo, hi + 2):
        a = m.start()
        if a >= hi:
            break
        kind = m.lastgroup
        if kind == "NUM":
            if a and t[a - 1] in _ASCII_LETTERS and not t[max(0, a - 3) : a].endswith(_GLUE_OK):
                continue
            raw = m.group()
            if raw.startswith("00") and a >= 2 and t[a - 1] in "-_/:" and t[a - 2].isalnum():
                continue  # "mp-0052-77828494": a zero-padded counter in an id, not "00" + a country code
            if "." in raw:
                quad = _DOTTED_QUAD.fullmatch(raw)
                if quad is not None:  # "(10.1.2.3": an address after a parenthesis
                    _ipv4(t, a + quad.start(1), a + quad.end(1), found)
                    continue
            _classify_run(raw, a, found)
        elif a and t[a - 1] in _ASCII_LETTERS:
            continue
        elif kind == "IP":
            _ipv4(t, a, m.end(), found)
        else:
            _classify_alnum(m.group(), a, found)


def _scan_ipv6(t: str, found: list[Finding]) -> None:
    """What ``_ipv6_scan`` from every colon of the text finds, visiting only runs with a seed."""
    hi = 0
    for v6 in _IPV6_SEED.finditer(t):
        if v6.start() >= hi:
            hi = _ipv6_scan(t, found, v6.start())


def _ipv6_scan(t: str, found: list[Finding], seed: int = 0) -> int:
    """Candidates around each colon of the hex/colon/dot run holding ``seed``; returns the run's end.

    Colons are visited as a scan from the start of the text would visit them: the chain restarts at
    the first colon of every run, and a run without a seed cannot hold an IPv6 address.
    """
    n = len(t)
    lo = seed
    while lo and t[lo - 1] in _HEX_COLON_DOT:
        lo -= 1
    run_end = _span_end(_HEX_COLON_DOT_RUN, t, seed)
    i = t.find(":", lo, run_end)
    while i >= 0:
        a = i
        while a > 0 and i - a < 40 and t[a - 1] in _HEX_COLON:
            a -= 1
        b = i + 1
        while b < n and b - a < 46 and t[b] in _HEX_COLON_DOT:
            b += 1
        end = b
        while end > a and t[end - 1] in ".:" and t[end - 2 : end] != "::":
            end -= 1
        cand = t[a:end]
        if cand.count(":") >= 2 and len(cand) >= 3 and not _glued(t, a) and not (end < n and t[end].isalnum()):
            try:
                addr = ipaddress.IPv6Address(cand)
            except ValueError:
                pass
            else:
                found.append((a, end, "IP_ADDRESS", addr.compressed))
        i = t.find(":", b, run_end)
    return run_end


def _id15_context(t: str, start: int) -> bool:
    return _ID15_CONTEXT.search(t, max(0, start - 16), start) is not None



def _email(t: str, m: re.Match[str], found: list[Finding]) -> None:
    at = m.start()
    a = at
    stop = max(0, at - 64)
    while a > stop and t[a - 1] in _EMAIL_LOCAL:
        a -= 1
    while a < at and not t[a].isalnum():
        a += 1
    if a < at:
        found.append((a, m.end(), "EMAIL", t[a : m.end()].lower()))


def _resolve(found: list[Finding]) -> list[Finding]:
    found.sort(key=lambda f: (f[0], f[0] - f[1]))
    out: list[Finding] = []
    end = -1
    for f in found:
        if f[0] >= end:
            out.append(f)
            end = f[1]
    return out


_NON_DIGIT: Final = re.compile(r"[^0-9]+")
_LANDLINE_HEAD: Final = re.compile(r"(0[0-9]{2,3})[ \t\r\n.\-]")
_DIGIT_GROUP: Final = re.compile(r"[0-9]+")
_DOTTED_QUAD: Final = re.compile(r"\(?([0-9]{1,3}(?:\.[0-9]{1,3}){3})")
_INTL_PREFIXES: Final = ("+", "00", "(+")
_CHUNK: Final = re.compile(r"\(?\+?([0-9]+)\)?[Xx]?")
#: (``bytes.translate`` deletes them at C speed; ``str.translate`` with a dict raised and caught a
#: ``KeyError`` inside it for every digit.)
_DROP_SEPARATORS: Final = b" -+()Xx.\t\r\n"


def _digits(s: str) -> str:
    if s.isdigit():
        return s
    if s.isascii():  # every _SCAN match is: drop the characters a run holds besides digits, in C
        d = s.encode().translate(None, _DROP_SEPARATORS).decode()
        if d.isdigit():
            return d
    return _NON_DIGIT.sub("", s)


def classify_number(raw: str) -> tuple[str, str] | None:
    """The entity type and canonical value of one digit run (with separators), or None."""
    if "." in raw and not _dots_ok(raw):
        return None  # a decimal, a version or an OID, not a number written with dots
    intl = raw.startswith(_INTL_PREFIXES)
    if raw[-1] in "Xx":
        d = _digits(raw) + "X"
        return ("CN_ID", d) if not intl and cs.is_cn_id(d) else None
    d = _digits(raw)
    n = len(d)
    if intl:
        hit = _classify_international(d[2:] if raw.startswith("00") else d)
        if hit is not None and hit[0] == "PHONE" and not _intl_groups_fit(raw, hit[1][1:]):
            return None
        return hit
    if not 9 <= n <= 19:
        return None  # every rule below needs 9 to 19 digits
    if n == 18 and cs.is_cn_id(d):
        return "CN_ID", d
    if 13 <= n <= 19:
        brand = cs.card_brand(d)
        if brand is not None and not (n == 18 and _id_shaped(d)):
            return ("BANK_CARD" if brand == "unionpay" else "CREDIT_CARD"), d
    if n == 15 and cs.is_cn_id(d):
        return "CN_ID", d
    if n == 18 and cs.is_uscc(d):
        return "CN_USCC", d
    if n == 11 and cs.is_cn_mobile(d):
        return "CN_PHONE", d
    if n == 13 and d.startswith("86") and cs.is_cn_mobile(d[2:]):
        return "CN_PHONE", d[2:]
    if n == 9:
        m = _SSN.fullmatch(raw)
        if m and cs.is_us_ssn(m.group(1), m.group(3), m.group(4)):
            return "US_SSN", d
    if d[:1] == "0" and 10 <= n <= 12 and _is_landline(raw, d):
        return "CN_LANDLINE", d
    return None


def _dots_ok(raw: str) -> bool:
    """``138.1234.5678``: two or more dots, every digit group at least two digits long."""
    return raw.count(".") >= 2 and min(map(len, _DIGIT_GROUP.findall(raw))) >= 2


def _id_shaped(d: str) -> bool:
    """Province code and a real birth date: an ID with a typo, not a card."""
    return cs.is_cn_id(d[:17] + cs.cn_id_check_char(d[:17]))


def _is_landline(raw: str, d: str) -> bool:
    if raw.startswith("("):
        if ")" not in raw:
            return False
        area = _digits(raw[: raw.index(")")])
        local = d[len(area) :]
        return cs.is_cn_area_code(area) and len(local) in (7, 8) and local[0] not in "01"
    head = _LANDLINE_HEAD.match(raw)
    if head:
        local = d[len(head.group(1)) :]
        return cs.is_cn_area_code(head.group(1)) and len(local) in (7, 8) and local[0] not in "01"
    return cs.cn_landline_split(d)


_GROUP_SEP: Final = re.compile(r"[ \t\r\n.\-()]+")


def _intl_groups_fit(raw: str, d: str) -> bool:
    """A written international number keeps its country code as a group of its own and, but in
    Italy, no trunk 0 after it: "0044 20 7946 0958" fits, "mp-0021-08273915" (an id) does not."""
    cc = cs.e164_country_code(d)
    if cc is None:
        return False
    if d[len(cc) : len(cc) + 1] == "0" and cc != "39":
        return False
    groups = [g for g in _GROUP_SEP.split(raw.lstrip("+(").removeprefix("00")) if g]
    if len(groups) < 2:
        return True  # written without separators: nothing to check against
    first = _digits(groups[0])
    return first.startswith(cc)  # the code, or the code glued to the area ("+4420 7946 0958")


def _classify_international(d: str) -> tuple[str, str] | None:
    if d.startswith("86"):
        rest = d[2:]
        if cs.is_cn_mobile(rest):
            return "CN_PHONE", rest
        if cs.cn_landline_split("0" + rest):
            return "CN_LANDLINE", "0" + rest
        return None
    cc = cs.e164_country_code(d)
    if cc is None or not 8 <= len(d) <= 15:
        return None
    if cc == "1" and (len(d) != 11 or d[1] in "01" or d[4] in "01"):
        return None
    return "PHONE", "+" + d


def _sub_runs_too_short(raw: str) -> bool:
    """Whether no sub-run of ``raw`` (a run of several digit groups, ``_CHUNK``) has the digits a
    number needs: every sub-run leaves out the first or the last group, so the longest has all the
    digits but the shorter end group's, and the fewest a number has are 7 (written international,
    after "+" or "00") or 9. "2025-06-03 14": 8 digits without the "14"."""
    need = 7 if "+" in raw or "00" in raw else 9
    head = raw.lstrip("(+")
    first = len(head) - len(head.lstrip("0123456789"))
    tail = raw.rstrip(")Xx")
    last = len(tail) - len(tail.rstrip("0123456789"))
    return len(_digits(raw)) - min(first, last) < need


def _classify_run(raw: str, start: int, found: list[Finding]) -> None:
    if raw[0] == "(" and ")" not in raw:  # an opening parenthesis before a number
        raw, start = raw[1:], start + 1
    hit = classify_number(raw)
    if hit is not None:
        found.append((start, start + len(raw), hit[0], hit[1]))
        return
    if raw.isdigit() or _sub_runs_too_short(raw):
        return  # one chunk, or chunks whose sub-runs are all too short: nothing to split
    # A run may hold several numbers separated by spaces/hyphens: try the longest sub-runs.
    found_chunks = list(_CHUNK.finditer(raw))
    if len(found_chunks) < 2 or len(found_chunks) > 24:
        return
    chunks = [m.span() for m in found_chunks]
    # A sub-run never starts or ends at a dot: "0.13812345678" is a decimal, not a phone.
    dot_gap = [False] + ["." in raw[chunks[k - 1][1] : chunks[k][0]] for k in range(1, len(chunks))] + [False]
    cum = [0]  # digits before each chunk: a sub-run's digit count without counting characters
    for m in found_chunks:
        cum.append(cum[-1] + m.end(1) - m.start(1))
    i = 0
    while i < len(chunks):
        if dot_gap[i]:
            i += 1
            continue
        # Fewer than 9 digits classify as nothing unless written as international (+, 00, (+):
        # those sub-runs are not tried (the count falls as the sub-run shrinks).
        need = 7 if raw.startswith(_INTL_PREFIXES, chunks[i][0]) else 9
        for j in range(len(chunks), i, -1):
            if j - i == len(chunks) or dot_gap[j]:
                continue
            if cum[j] - cum[i] < need:
                break
            sub = raw[chunks[i][0] : chunks[j - 1][1]]
            hit = classify_number(sub)
            if hit is not None:
                found.append((start + chunks[i][0], start + chunks[j - 1][1], hit[0], hit[1]))
                i = j - 1
                break
        i += 1


def _classify_alnum(raw: str, start: int, found: list[Finding]) -> None:
    if raw.isdigit():
        return  # digit runs are the number recognizer's
    s = raw.replace(" ", "")
    n = len(s)
    kind: str | None = None
    if n == 18 and cs.is_uscc(s):
        kind = "CN_USCC"
    elif n >= 15 and s[:2].isalpha() and cs.is_iban(s):
        kind = "IBAN"
    elif " " in raw:
        kind = None
    elif n == 9 and s[0] in "EG" and (s[1:].isdigit() or (s[1] not in "IO" and s[1].isalpha() and s[2:].isdigit())):
        kind = "CN_PASSPORT"
    elif n == 9 and s[0] in "CW" and s[1:].isdigit():
        kind = "CN_HKMO_PERMIT"
    elif n == 9 and s[0] == "C" and s[1].isalpha() and s[1] not in "IO" and s[2:].isdigit():
        kind = "CN_HKMO_PERMIT"
    elif n in (9, 11) and s[0] in "HM" and s[1:].isdigit():
        kind = "CN_HKMO_PERMIT"
    if kind is not None:
        found.append((start, start + len(raw), kind, s))


def _ipv4(t: str, a: int, b: int, found: list[Finding]) -> None:
    try:
        ipaddress.IPv4Address(t[a:b])
    except ValueError:
        return
    if _VERSION_CONTEXT.search(t, max(0, a - 12), a):
        return
    found.append((a, b, "IP_ADDRESS", t[a:b]))


def jwt_header_ok(token: str) -> bool:
    """The first segment of a JWT decodes to a JSON object naming ``alg``."""
    head = token.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    except ValueError:
        return False
    return b'"alg"' in raw
