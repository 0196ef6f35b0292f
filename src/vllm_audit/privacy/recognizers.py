"""Recognizers: a few precompiled candidate patterns, then validators decide.

Chinese text has no word boundaries, so candidates are delimited with lookarounds on ASCII
letters and digits (``(?<![0-9A-Za-z])``), never ``\\b``. Full-width digits, letters and common
separators are folded to ASCII by a length-preserving ``str.translate`` first, so every span found
in the folded text is also the span of the original characters.

``find(text)`` returns non-overlapping findings ``(start, end, entity_type, canonical_value)``
sorted by start; the canonical value (digits only, lower-case e-mail, ...) is what pseudonyms hash,
so ``138-1234-5678`` and ``13812345678`` get the same pseudonym.
"""

from __future__ import annotations

import base64
import ipaddress
import re

from vllm_audit.privacy import checksums as cs

Finding = tuple[int, int, str, str]

# Full-width forms (U+FF01..U+FF5E) map to ASCII; dashes and wide spaces map to "-" and " ".
_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_FOLD.update({0x3000: 0x20, 0x00A0: 0x20, 0x2010: 0x2D, 0x2011: 0x2D, 0x2012: 0x2D, 0x2013: 0x2D, 0x2014: 0x2D})
_FOLD.update({cp: 0x20 for cp in range(0x2002, 0x200B)})
_NEEDS_FOLD = re.compile("[\uff0b\uff0d\uff0e\uff10-\uff1a\uff20-\uff3a\uff41-\uff5a]")

# Each pattern starts with a character class (so the regex engine can skip ahead fast) and then
# checks the character before it with a two-character lookbehind.
_NUM = re.compile(
    r"[0-9+(](?<![0-9+.][0-9+(])"
    r"(?:(?<=\+)[ ]?|(?<=0)0[ ]?|(?<=\()\+?[0-9]{1,4}\)[ ]?)?"  # +86, 0086, (+86), (010)
    r"(?:(?<=[0-9])|[0-9])(?:[ \-]?[0-9]){6,40}[Xx]?"
    r"(?![0-9A-Za-z]|\.[0-9])"
)
#: ASCII words a number may be glued to in Chinese text ("ID110...", "Tel138...").
_GLUE_OK = ("ID", "Id", "No", "Tel", "TEL", "NO")
_SSN = re.compile(r"([0-9]{3})([ \-])([0-9]{2})\2([0-9]{4})")
_ALNUM = re.compile(
    r"[0-9A-Z](?<![0-9A-Za-z][0-9A-Z])"
    r"(?:[A-Z][0-9]{2}(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?|[0-9A-Z]{7,33})"
    r"(?![0-9A-Za-z])"
)
_EMAIL_DOMAIN = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_IPV4 = re.compile(
    r"[0-9](?<![0-9A-Za-z.][0-9])[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9A-Za-z]|\.[0-9])"
)
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![0-9A-Za-z:.][0-9A-Fa-f:])[0-9A-Fa-f:]{1,45}(?:\.[0-9]{1,3}){0,3}(?![0-9A-Za-z:.])"
)
_VERSION_CONTEXT = re.compile(r"(?i:version|ver\.?|release|build|版本)[ :：]*$")
_SECRET = re.compile(
    r"(?P<API_KEY>sk-ant-[A-Za-z0-9_\-]{20,}"
    r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"
    r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abposre]-[A-Za-z0-9\-]{10,})"
    r"|(?P<JWT>eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{8,})"
    r"|(?P<PRIVATE_KEY>-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\Z))"
    r"|://(?P<URL_CREDENTIALS>[^\s/:@]{1,256}:[^\s/@]{1,256})@"
    r"|aws_secret_access_key[ \t]*[=:][ \t]*[\"']?(?P<AWS_SECRET>[A-Za-z0-9/+=]{40})"
    r"|Bearer (?P<BEARER>[A-Za-z0-9._~+/\-]{20,}=*)"
)
_SECRET_HINTS: tuple[str, ...] = ("sk-", "AKIA", "ASIA", "ABIA", "ACCA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_")
_SECRET_HINTS += ("github_pat_", "xox", "eyJ", "-----BEGIN", "://", "aws_secret", "Bearer")
_ALNUM_HINT = re.compile(r"[A-Z][0-9]|[0-9][A-Z]")
_DIGITS7 = re.compile(r"[0-9][0-9 \-]{5,}[0-9]")


def fold(text: str) -> str:
    """Full-width digits, letters and separators folded to ASCII; same length as ``text``."""
    return text.translate(_FOLD) if _NEEDS_FOLD.search(text) else text


def find(text: str) -> list[Finding]:
    """All validated entities in ``text``, non-overlapping, sorted by start."""
    t = fold(text)
    found: list[Finding] = []
    if _DIGITS7.search(t):
        for m in _NUM.finditer(t):
            a = m.start()
            if a and t[a - 1].isascii() and t[a - 1].isalpha() and not t[max(0, a - 3) : a].endswith(_GLUE_OK):
                continue
            _classify_run(m.group(), a, found)
    if "." in t:
        for m in _IPV4.finditer(t):
            _ipv4(t, m, found)
    if _ALNUM_HINT.search(t):
        for m in _ALNUM.finditer(t):
            _classify_alnum(m.group(), m.start(), found)
    if "@" in t:
        for m in _EMAIL_DOMAIN.finditer(t):
            _email(t, m, found)
    if "::" in t or t.count(":") >= 2:
        for m in _IPV6.finditer(t):
            _ipv6(m, found)
    if _has_secret_hint(t):
        for m in _SECRET.finditer(t):
            kind = m.lastgroup or "API_KEY"
            if kind != "JWT" or jwt_header_ok(m.group()):
                a, b = m.span(kind)
                found.append((a, b, _SECRET_KIND.get(kind, kind), t[a:b]))
    if len(found) > 1:
        found = _resolve(found)
    return found


def _has_secret_hint(t: str) -> bool:
    for h in _SECRET_HINTS:
        if h in t:
            return True
    return False


_SECRET_KIND = {"AWS_SECRET": "API_KEY", "BEARER": "API_KEY"}


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


_NON_DIGIT = re.compile(r"[^0-9]+")


def _digits(s: str) -> str:
    return s if s.isdigit() else _NON_DIGIT.sub("", s)


def classify_number(raw: str) -> tuple[str, str] | None:
    """The entity type and canonical value of one digit run (with separators), or None."""
    intl = raw.startswith(("+", "00", "(+"))
    if raw[-1] in "Xx":
        d = _digits(raw) + "X"
        return ("CN_ID", d) if not intl and cs.is_cn_id(d) else None
    d = _digits(raw)
    n = len(d)
    if intl:
        return _classify_international(d[2:] if raw.startswith("00") else d)
    if n == 18 and cs.is_cn_id(d):
        return "CN_ID", d
    if 13 <= n <= 19:
        brand = cs.card_brand(d)
        if brand == "unionpay":
            return "BANK_CARD", d
        if brand is not None:
            return "CREDIT_CARD", d
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


def _is_landline(raw: str, d: str) -> bool:
    if raw.startswith("("):
        area = _digits(raw[: raw.index(")")])
        local = d[len(area) :]
        return cs.is_cn_area_code(area) and len(local) in (7, 8) and local[0] not in "01"
    head = re.match(r"(0[0-9]{2,3})[ \-]", raw)
    if head:
        local = d[len(head.group(1)) :]
        return cs.is_cn_area_code(head.group(1)) and len(local) in (7, 8) and local[0] not in "01"
    return cs.cn_landline_split(d)


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


def _classify_run(raw: str, start: int, found: list[Finding]) -> None:
    hit = classify_number(raw)
    if hit is not None:
        found.append((start, start + len(raw), hit[0], hit[1]))
        return
    # A run may hold several numbers separated by spaces/hyphens: try the longest sub-runs.
    chunks = [(m.start(), m.end()) for m in re.finditer(r"\(?\+?[0-9]+\)?[Xx]?", raw)]
    if len(chunks) < 2 or len(chunks) > 24:
        return
    i = 0
    while i < len(chunks):
        for j in range(len(chunks), i, -1):
            if j - i == len(chunks):
                continue
            sub = raw[chunks[i][0] : chunks[j - 1][1]]
            if sum(c.isdigit() for c in sub) < 7:
                break
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


def _ipv4(t: str, m: re.Match[str], found: list[Finding]) -> None:
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:
        return
    if _VERSION_CONTEXT.search(t, max(0, m.start() - 12), m.start()):
        return
    found.append((m.start(), m.end(), "IP_ADDRESS", m.group()))


def _ipv6(m: re.Match[str], found: list[Finding]) -> None:
    s = m.group()
    if s.count(":") < 2 or len(s) < 3:
        return
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return
    found.append((m.start(), m.end(), "IP_ADDRESS", addr.compressed))


def jwt_header_ok(token: str) -> bool:
    """The first segment of a JWT decodes to a JSON object naming ``alg``."""
    head = token.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    except ValueError:
        return False
    return b'"alg"' in raw
