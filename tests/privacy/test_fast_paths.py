"""The fast paths (seeded runs, memchr gates, C-level checksums) find exactly what full scans find."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_audit.config import Config
from vllm_audit.privacy import checksums as cs
from vllm_audit.privacy import gate
from vllm_audit.privacy import recognizers as rz
from vllm_audit.privacy import redactor as rd
from vllm_audit.privacy.recognizers import Finding, find
from vllm_audit.privacy.redactor import build_redactor, redact_text

# Reference implementations: the straightforward versions the fast paths replace.


def ref_scan_numbers(t: str) -> list[Finding]:
    found: list[Finding] = []
    for m in rz._SCAN.finditer(t):
        a = m.start()
        if m.lastgroup == "NUM":
            if rz._glued(t, a) and not t[max(0, a - 3) : a].endswith(rz._GLUE_OK):
                continue
            rz._classify_run(m.group(), a, found)
        elif rz._glued(t, a):
            continue
        elif m.lastgroup == "IP":
            rz._ipv4(t, m.start(), m.end(), found)
        else:
            rz._classify_alnum(m.group(), a, found)
    return found


def ref_scan_ipv6(t: str) -> list[Finding]:
    found: list[Finding] = []
    n = len(t)
    i = t.find(":")
    while i >= 0:
        a = i
        while a > 0 and i - a < 40 and t[a - 1] in rz._HEX_COLON:
            a -= 1
        b = i + 1
        while b < n and b - a < 46 and t[b] in rz._HEX_COLON_DOT:
            b += 1
        end = b
        while end > a and t[end - 1] in ".:" and t[end - 2 : end] != "::":
            end -= 1
        cand = t[a:end]
        if cand.count(":") >= 2 and len(cand) >= 3 and not rz._glued(t, a) and not (end < n and t[end].isalnum()):
            try:
                import ipaddress

                found.append((a, end, "IP_ADDRESS", ipaddress.IPv6Address(cand).compressed))
            except ValueError:
                pass
        i = t.find(":", b)
    return found


def ref_luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i & 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def ref_iban(value: str) -> bool:
    if len(value) < 15 or cs.IBAN_LENGTHS.get(value[:2]) != len(value) or not value[2:4].isdigit():
        return False
    if not value.isalnum() or not value.isascii():
        return False
    return int("".join(str(int(c, 36)) for c in value[4:] + value[:4])) % 97 == 1


RUN_ALPHABET = list("0123456789 -.+()xXABEGCHMNWYZab:@_中，．０１２３\u3000")


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=st.sampled_from(RUN_ALPHABET), max_size=120))
def test_seeded_runs_find_what_a_full_scan_finds(text: str) -> None:
    t = text
    found: list[Finding] = []
    rz._scan_numbers(t, found)
    assert found == ref_scan_numbers(t)


_GROUP = st.text(alphabet="0123456789", min_size=1, max_size=11)
_SEP = st.sampled_from(["", " ", "-", ".", "  ", " - ", "\n", ":", "T", "/"])
_LEAD = st.sampled_from(["", "+", "+ ", "00", "(", "(+", "(0", "E", "G", "C", "CA", "H", "M", "W", "EA", "DE", "GB",
                         "91", "Y1", "ID", "Tel", "x"])  # fmt: skip
_TAIL = st.sampled_from(["", ")", ") ", "X", "x", "Z", "AB", ".", "1.2"])


@st.composite
def _number_like(draw: st.DrawFn) -> str:
    """Digit groups with the separators, prefixes and suffixes the number/ID recognizers read."""
    parts = [draw(_LEAD)]
    for _ in range(draw(st.integers(1, 5))):
        parts.append(draw(_GROUP))
        parts.append(draw(_SEP))
    parts.append(draw(_TAIL))
    return "".join(parts)


_FILLER = st.sampled_from([" the ", " 会议 ", ", then ", " at ", "\n", " (see below) ", " version ", " 身份证 "])


_numbers_in_prose = st.lists(st.tuples(_FILLER, _number_like()), min_size=1, max_size=8).map(
    lambda pairs: "".join(f + n for f, n in pairs)
)
_PROSE_330 = "Please summarise the notes below and list the action items for each team. " * 5


@settings(max_examples=500, deadline=None)
@given(_numbers_in_prose, _numbers_in_prose, st.booleans())
def test_seeded_runs_find_what_a_full_scan_finds_in_long_texts(head: str, tail: str, dense: bool) -> None:
    """Over 320 characters the scan visits only runs holding a seed: it finds what a scan of all finds."""
    text = head + (" " if dense else _PROSE_330) + tail + ("" if dense else _PROSE_330) + head
    if len(text) <= rz._SHORT_SCAN:
        text += _PROSE_330
    found: list[Finding] = []
    rz._scan_numbers(text, found)
    full: list[Finding] = []
    rz._scan_range(text, 0, len(text), full)
    assert found == full


@settings(max_examples=1500, deadline=None)
@given(_numbers_in_prose)
def test_no_number_or_id_is_found_where_the_seed_gate_is_clear(text: str) -> None:
    """A text without a number seed (dates, clock times, 8-digit counters ...) holds no number finding."""
    if not gate.python_hits(text, (), ()) & gate.NUM or not rz._hits(text) & gate.NUM:
        full: list[Finding] = []
        rz._scan_range(text, 0, len(text), full)
        assert full == []
    assert bool(gate.python_hits(text, (), ()) & gate.NUM) == bool(rz._hits(text) & gate.NUM)


_TWO = st.integers(0, 99).map("{:02d}".format)
_WS = st.sampled_from(["", " ", "\n", " \n ", "\t", "\r\n"])
#: Years from 0000 on (wider than the fast path's [12]...: "0213-45-67 89" is a Shanghai landline).
_YEAR = st.integers(0, 2999).map("{:04d}".format) | st.sampled_from(["0213", "0755", "0101", "1380", "2025"])
_date_hour = st.builds(lambda a, y, m, d, h, b: f"{a}{y}-{m}-{d} {h}{b}", _WS, _YEAR, _TWO, _TWO, _TWO, _WS)
#: Shapes around it too (groups of 1-5 digits, other separators: "1380-01-23 456" is a mobile
#: number), so that a fast path wider than the date and hour meets a run it must not skip.
_GROUPS = st.lists(st.text(alphabet="0123456789", min_size=1, max_size=5), min_size=3, max_size=5)
_near_date_hour = st.builds(
    lambda a, g, seps, b: a + "".join(x + y for x, y in zip(g, seps, strict=False)) + g[-1] + b,
    _WS, _GROUPS, st.lists(st.sampled_from(["-", " ", ".", "--", "  "]), min_size=4, max_size=4), _WS,
)
#: Characters no run holds, around a run (so the run is the text's only one).
_NOT_RUN = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwyz:/_[]会议时间，@")), max_size=12)


@settings(max_examples=1500, deadline=None)
@given(_NOT_RUN, _date_hour | _near_date_hour, _NOT_RUN)
@example("[", "0213-45-67 89", "]")
@example("[", "1380-01-23 456", "]")
def test_a_date_and_hour_run_left_unscanned_holds_no_finding(before: str, run: str, after: str) -> None:
    """Every run the scan skips as a date and an hour is one in which the full scan finds nothing."""
    text = before + run + after
    if rz._DATE_HOUR_RUN.fullmatch(run):
        full: list[Finding] = []
        rz._scan_range(text, 0, len(text), full)
        assert full == [], (text, full)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_FILLER, _number_like() | _date_hour), min_size=1, max_size=8), st.booleans())
def test_runs_of_log_timestamps_among_numbers_find_what_a_full_scan_finds(
    pairs: list[tuple[str, str]], ts: bool
) -> None:
    """Long text where date-and-hour runs (skipped) stand among numbers: the findings of a full scan."""
    stamp = "[2025-06-03 14:22:51] " if ts else ""
    text = "".join(f + stamp + n for f, n in pairs) + _PROSE_330
    found: list[Finding] = []
    rz._scan_numbers(text, found)
    full: list[Finding] = []
    rz._scan_range(text, 0, len(text), full)
    assert found == full


def test_dates_and_clock_times_set_no_number_seed() -> None:
    """What made most clean prompts pay the number scan: an ISO date, a time, short counters."""
    clean = ("[2025-06-03T14:22:51.093Z] GET /v1", "LIMIT 100 OFFSET 2000", "build 2025.06.03", "port 8080 pid 424242")
    for text in clean:
        assert not rz._hits(text) & gate.NUM, text
    for text in ("call 138 1234 5678", "+44 20 7946 0958", "(010) 1234 5678", "E12345678", "DE89370400440532013000"):
        assert rz._hits(text) & gate.NUM, text
    # The shortest numbers each seed exists for: 8 digits after "+", an area code in parentheses.
    assert [f[2] for f in find("call +376 12345 now")] == ["PHONE"]
    assert [f[2] for f in find("tel (010)6234 5678")] == ["CN_LANDLINE"]


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789abcdefABCDEF:::..  g/")), max_size=140))
def test_ipv6_seeds_find_what_a_scan_from_every_colon_finds(text: str) -> None:
    found: list[Finding] = []
    rz._scan_ipv6(text, found)
    assert found == ref_scan_ipv6(text)


def ref_classify_run(raw: str, start: int) -> list[Finding]:
    """Every sub-run of 7 or more digits tried, longest first (no shortcut by digit count)."""
    found: list[Finding] = []
    if raw[0] == "(" and ")" not in raw:
        raw, start = raw[1:], start + 1
    hit = rz.classify_number(raw)
    if hit is not None:
        return [(start, start + len(raw), *hit)]
    chunks = [m.span() for m in rz._CHUNK.finditer(raw)]
    if raw.isdigit() or len(chunks) < 2 or len(chunks) > 24:
        return found
    gap = [False] + ["." in raw[chunks[k - 1][1] : chunks[k][0]] for k in range(1, len(chunks))] + [False]
    i = 0
    while i < len(chunks):
        if not gap[i]:
            for j in range(len(chunks), i, -1):
                sub = raw[chunks[i][0] : chunks[j - 1][1]]
                if j - i == len(chunks) or gap[j]:
                    continue
                if len(rz._digits(sub)) < 7:
                    break
                hit = rz.classify_number(sub)
                if hit is not None:
                    found.append((start + chunks[i][0], start + chunks[j - 1][1], *hit))
                    i = j - 1
                    break
        i += 1
    return found


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["", "", "+", "00", "(+", "(", "0"]),
            st.text(alphabet=st.sampled_from(list("0123456789")), min_size=1, max_size=11),
            st.sampled_from([" ", "-", " - ", ".", "\n", ") ", "x "]),
        ),
        min_size=1,
        max_size=6,
    )
)
@example([("", "2025", " "), ("", "536", "-"), ("", "90", "-"), ("", "4399", "")])  # a year, then an SSN (9 digits)
@example([("", "2025", " "), ("+", "44", " "), ("", "20", " "), ("", "7946", " "), ("", "0958", "")])
def test_sub_runs_shorter_than_any_number_are_not_tried(groups: list[tuple[str, str, str]]) -> None:
    """A run of digit groups (a date before a phone, "+44 20 ..." after an order number) gives what
    trying every sub-run gives: the digit-count shortcut only skips sub-runs that classify as nothing."""
    raw = "".join(p + d + sep for p, d, sep in groups).rstrip(" -.\n)x")
    if not raw or not raw[-1].isdigit():
        return
    found: list[Finding] = []
    rz._classify_run(raw, 5, found)
    assert found == ref_classify_run(raw, 5)


def test_dense_text_beyond_the_run_limit() -> None:
    phones = [f"1{3 + i % 7}{i:09d}" for i in range(3 * rz._MAX_RUNS)]
    text = "，".join(f"手机{p}" for p in phones) + " ip 10.0.0.1"
    assert [t[3] for t in find(text)] == [*phones, "10.0.0.1"]
    t = text
    found: list[Finding] = []
    rz._scan_numbers(t, found)
    assert found == ref_scan_numbers(t)


def test_long_hex_colon_run_before_an_address() -> None:
    text = "a:" * 30 + " deadbeef:" * 3 + " fe80::1ff:fe23:4567:890a ok 12:00:01 std::vector"
    found: list[Finding] = []
    rz._scan_ipv6(text, found)
    assert found == ref_scan_ipv6(text)
    assert ("IP_ADDRESS", "fe80::1ff:fe23:4567:890a") in [(f[2], f[3]) for f in find(text)]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("key AKIAABCDEFGHIJKLMNOP", "API_KEY"),  # letters only, 20 characters: not the short-word path
        ("AKIAABCDEFGHIJKLMNOP", "API_KEY"),
        ("ASIAABCDEFGHIJKLMNOP here", "API_KEY"),
        ("token ghp_" + "a" * 36, "API_KEY"),
        ("xoxb-abcdefghijkl", "API_KEY"),
        ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "API_KEY"),
        ("aws_secret_access_key = " + "A" * 40, "API_KEY"),
        ("postgres://admin:hunter2@db.internal/app", "URL_CREDENTIALS"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "PRIVATE_KEY"),
        ("use sk-proj-abcdefghijklmnopqrstuvwx now", "API_KEY"),
    ],
)
def test_secret_gates_let_secrets_through(text: str, kind: str) -> None:
    assert kind in [f[2] for f in find(text)]


def test_short_words_and_restricted_types() -> None:
    assert find("content") == [] and find("role") == []
    text = "mail bob@example.com, card 4111111111111111, ID 11010519491231002X, ip 10.1.2.3, ghp_" + "b" * 36
    types = {"EMAIL", "CREDIT_CARD", "IP_ADDRESS", "US_SSN", "IBAN"}
    assert [f[2] for f in find(text, types)] == ["EMAIL", "CREDIT_CARD", "IP_ADDRESS"]
    assert [f for f in find(text) if f[2] in types] == find(text, types)
    assert find(text, ()) == []


def test_checksums_match_reference_implementations() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        d = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 20)))
        assert cs.luhn_ok(d) == ref_luhn(d)
        first17 = (d * 2)[:17].ljust(17, "7")
        weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
        total = sum(int(c) * w for c, w in zip(first17, weights, strict=True))
        assert cs.cn_id_check_char(first17) == "10X98765432"[total % 11]
        cc = rng.choice(sorted(cs.IBAN_LENGTHS))
        body = "".join(rng.choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZab") for _ in range(cs.IBAN_LENGTHS[cc] - 4))
        for check in ("00", "42", f"{rng.randrange(100):02d}"):
            assert cs.is_iban(cc + check + body) == ref_iban(cc + check + body)
    assert cs.luhn_ok("１２") == ref_luhn("１２")  # non-ASCII digits take the generic path
    assert cs.cn_id_check_char("１" * 17) == cs.cn_id_check_char("1" * 17)
    assert not cs.is_uscc("91110108MA01abcdeX") and not cs.is_uscc("91110108MA01ÀBCDEX")


def test_no_pii_returns_the_same_object_and_none_fields_stay() -> None:
    text = "请帮我总结一下 version 3.11.7, 2025-06-03 14:22:51 INFO done in 312 ms " * 5
    assert redact_text(text) is text
    rec = build_redactor(Config())(
        {"org_id": "acme", "input_prompt": [{"role": "user", "content": text}], "output_response": None}
    )
    assert rec["input_prompt"][0]["content"] is text
    assert rec["output_response"] is None and "output_response_enc" not in rec
    assert rec["redaction"] == {"policy": "default", "entities": {}}
    assert re.fullmatch(r"<API_KEY>", redact_text("AKIAABCDEFGHIJKLMNOP"))


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789abcdef")), min_size=32, max_size=32), st.booleans(),
       st.sampled_from(["", "chatcmpl-", "cmpl-"]))  # fmt: skip
def test_uuid_id_fast_path_never_hides_a_finding(hexdigits: str, hyphens: bool, prefix: str) -> None:
    h = hexdigits
    body = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if hyphens else h
    value = prefix + body
    if rd._id_clean(value):
        assert find(value) == []


def test_uuid_shaped_ids_holding_a_number_are_still_scanned() -> None:
    rid = "41111111-1111-1111-ffff-ffffffffffff"  # a Luhn-valid card in the first three groups
    assert not rd._id_clean(rid) and find(rid)
    assert rd._id_clean("126a1e48-cc11-d357-c30d-8b7628dbd25e")
    assert rd._id_clean("chatcmpl-126a1e48-cc11-d357-c30d-8b7628dbd25e")
    assert not rd._id_clean("sk-126a1e48-cc11-d357-c30d-8b7628dbd25e")  # not the id shape: full scan
    assert find("sk-126a1e48-cc11-d357-c30d-8b7628dbd25e")
    rec = build_redactor(Config())({"org_id": "x", "request_id": "13812345678-cc11-d357-c30d-8b7628dbd25e",
                                    "request_id_source": "client", "response_id": f"chatcmpl-{rid}"})  # fmt: skip
    assert "13812345678" not in rec["request_id"] and "4111" not in rec["response_id"][9:13]
    assert rec["redaction"]["entities"] == {"CN_PHONE": 1, "CREDIT_CARD": 1}


def test_record_plans_follow_each_shape_and_policy() -> None:
    redact = build_redactor(Config())
    first = redact({"org_id": "x", "route": "/v1/chat", "notes": "call 13812345678"})
    assert first["notes"] == "call <CN_PHONE>"
    # Same field names in another order, a new field, and a field the class table does not name.
    second = redact({"notes": "mail bob@example.com", "org_id": "x", "route": "13912345678", "extra": "10.1.2.3"})
    assert second["notes"] == "mail <EMAIL>" and second["route"] == "<CN_PHONE>"
    assert second["extra"] == "<IP_ADDRESS>"
    # An operational field is never scanned; the tenant field neither (it selects the policy).
    third = redact({"org_id": "13812345678", "record_id": "13812345678", "notes": "13812345678"})
    assert third["org_id"] == third["record_id"] == "13812345678" and third["notes"] == "<CN_PHONE>"
