"""The compiled gate (hyperscan) and the Python gates give the same bits; a clear bit means no match."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_audit.privacy import gate
from vllm_audit.privacy import recognizers as rz
from vllm_audit.privacy.recognizers import find

_SAMPLES = (
    "请联系 138 1234 5678 谢谢", "mail ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ", "IP地址（10.1.2.3）", "版本号：10.0.19041.1",
    "key sk-proj-" + "A1b2" * 6, "Authorization: Bearer " + "x" * 30, "fe80::1 and 2001:db8::2",
    "IBAN DE89370400440532013000",
    "-----BEGIN PRIVATE KEY-----", "postgres://u:p@h/db", "aws_secret_access_key = " + "A" * 40, "AKIA" + "B" * 16,
    "这是一个测试（注：没有个人信息），谢谢！", "plain ascii prose without anything", "tel ١٣٨١٢٣٤٥٦٧٨", "a\u200bb",
)  # fmt: skip
_ALPHABET = "0123456789 .-\t\n@:AZKSIBN_abxyz+()（）：\u3000\u200b١٣８ｂ＠" + "sk-eyJ"


def _python(text: str) -> int:
    return gate.python_hits(text, rz._HINTS, rz._GATES, rz._GATE_PATTERNS)


def test_hyperscan_is_installed() -> None:
    """The dependency is there on this platform, so the fast path is what the other tests exercise."""
    assert gate.AVAILABLE


def test_compiled_and_python_gates_agree_on_samples() -> None:
    """Same bits on Chinese, English, full-width, secrets and look-alikes; every sample sets some bit."""
    compiled = gate.make_hits(rz._HINTS, rz._GATES, rz._GATE_PATTERNS)
    for text in _SAMPLES[:12]:
        assert compiled(text) == _python(text) != 0, text
    for text in _SAMPLES[12:]:
        assert compiled(text) == _python(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=60))
def test_compiled_and_python_gates_agree(text: str) -> None:
    """Same bits on arbitrary mixes of the characters the gates look at."""
    assert gate.make_hits(rz._HINTS, rz._GATES, rz._GATE_PATTERNS)(text) == _python(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=60))
def test_nothing_is_found_where_the_gate_is_clear(text: str) -> None:
    """A text whose gate bits (besides NORM) are clear holds no finding: skipping it loses nothing."""
    if not rz.scannable(text):
        assert find(text) == []


_SECRET_BODY = st.text(alphabet="aZ09_-.=+/~ Ab", min_size=0, max_size=60)


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet=_ALPHABET, max_size=12),
    st.sampled_from(rz._SECRET_DEFS),
    st.lists(st.sampled_from(["ant-", "proj-", "p_", "s_", "a-", "eyJ", ".", "hbGci", ":", "@", "-----", " ", "KEY"]),
             max_size=6),
    _SECRET_BODY,
    st.text(alphabet=_ALPHABET, max_size=12),
)  # fmt: skip
def test_a_secret_pattern_never_matches_where_its_gate_bit_is_clear(
    head: str, secret: tuple[str, str, str | None, str], pieces: list[str], body: str, tail: str
) -> None:
    """Every gate pattern is a prefix of each match of its secret: a match implies the bit, in both gates.

    Texts are built from the hint, pieces of the secrets' syntax and their alphabet, so matches and
    near misses both occur; the bare hints ("gh" in "though") set no bit.
    """
    hint = secret[0]
    text = head + hint + "".join(pieces) + body + tail
    compiled, python = rz._hits(text), _python(text)
    assert compiled == python
    for i, (_, _, pattern, _) in enumerate(rz._SECRETS):
        if pattern.search(text) is not None:
            assert compiled & gate.secret_bit(i), (text, rz._HINTS[i])


def test_a_bare_hint_in_prose_sets_no_secret_bit() -> None:
    """'gh' in 'though', 'sk-' in 'task-list', 'Bearer ' in prose: no secret pattern runs on them."""
    text = "Although the high task-list is long, the Bearer of bad news said -----BEGIN review."
    assert rz._hits(text) & rz._SECRET_MASK == 0 == _python(text) & rz._SECRET_MASK
    assert rz._hits("token ghp_" + "a" * 36) & gate.secret_bit(rz._HINTS.index("gh"))


_SEED_ALPHABET = list("0123456789  .-+()\t\nABZIx:")


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=_SEED_ALPHABET, max_size=40))
def test_the_number_scan_seeds_where_the_gate_seeds(text: str) -> None:
    """``NUM_SEED_SEARCH`` (the number scan's search) matches exactly where ``NUM_SEED`` (the gate)
    does: the two spellings of one set of seeds cannot drift apart (a text the gate lets through
    but the scan finds no seed in would lose its findings; the other way round costs scans)."""
    import re

    assert (re.search(gate.NUM_SEED, text) is None) == (re.search(gate.NUM_SEED_SEARCH, text) is None)


def test_seed_samples_of_every_branch_agree() -> None:
    """One text per seed branch, and near misses: both spellings say the same."""
    import re

    for text, seeded in [
        ("138 1234 5678", True), ("1234567", True), ("1.2.3.4", True), ("GB82", True), ("+1 415 555 0", True),
        ("(010)6234", True), ("(+44)2079", True), ("123456", False), ("2025-06-03", False), ("G8 2", False),
        ("+1 415 555", False), ("(010)623", False), ("14:22:51", False), ("1.2.3", False),
    ]:  # fmt: skip
        assert (re.search(gate.NUM_SEED, text) is not None) is seeded, text
        assert (re.search(gate.NUM_SEED_SEARCH, text) is not None) is seeded, text


_PIECES = (
    "138 1234 5678", "1234567", "10.1.2.3", "GB82 WEST 1234 5698 7654 32", "+1 415 555 0134", "(010)6234 5678",
    "2025-06-03 14:22:51,093", "v1.2.3", "ID 11010519491231002X", "4111 1111 1111 1111", "ABCDEF12", "x", "(",
    "ms (p99 845 ms)", "line 653, in run", "Q3-2025", "12-34-56", "+", "\n", "  ", ".", "-", ":", "@",
    "手机", "，", "：", "\u3000", "日期2025-06-03 14:22", "电话010-6234 5678", "é", "😀",
)  # fmt: skip


_PROSE = st.sampled_from("the quick brown fox jumps over a lazy dog while our team ships code on time".split())


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(_PIECES), st.text(alphabet=_SEED_ALPHABET + list("abcz,;"), max_size=12)),
             min_size=30, max_size=120)
    | st.lists(st.one_of(*[_PROSE] * 9, st.sampled_from(_PIECES)), min_size=60, max_size=200),
    st.lists(st.sampled_from([" ", " ", ", ", ":", "a", ";", "\n"]), min_size=1, max_size=8),
)  # fmt: skip
def test_compiled_seeds_visit_the_runs_the_search_visits(pieces: list[str], glue: list[str]) -> None:
    """The number scan of a long text (ASCII, Chinese, an emoji's four UTF-8 bytes) finds the same
    with the compiled seed search (hyperscan's ``NUM_SEED`` end offsets in the UTF-8 bytes) as with
    the ``re`` search, and what a full ``_SCAN`` pass over the whole text finds."""
    text = "".join(p + glue[i % len(glue)] for i, p in enumerate(pieces))
    if len(text) <= rz._SHORT_SCAN:
        text = (text + " ") * (rz._SHORT_SCAN // max(1, len(text)) + 1)
    assert gate.seed_end is not None
    compiled: list[rz.Finding] = []
    searched: list[rz.Finding] = []
    whole: list[rz.Finding] = []
    rz._scan_seeded_runs(text, text.encode(), compiled, gate.seed_end)
    rz._scan_searched_runs(text, searched)
    rz._scan_range(text, 0, len(text), whole)
    assert compiled == searched == whole


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_the_detection_copy_is_never_triggered_by_ascii(text: str) -> None:
    """ASCII text is scanned without the detection copy's trigger (hyperscan's ASCII database, the
    Python gate's ``isascii`` check): that is right only while the trigger matches no ASCII text."""
    import re

    from vllm_audit.privacy import normalize as nz

    assert re.search(nz.trigger_pattern(), text) is None
    assert not nz.needs_normalize(text)
    assert not gate.make_hits(rz._HINTS, rz._GATES, rz._GATE_PATTERNS)(text) & gate.NORM


_V6_ALPHABET = "0123456789abcdefABCDEF:.::gstxyzGZ -_/(é中"


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["::", "fe80", "ffff", "1.2.3.4", "std", "x", "2001:db8", ":", "0", "a"])
                | st.text(alphabet=_V6_ALPHABET, max_size=6), max_size=14))  # fmt: skip
def test_the_ipv6_scan_finds_nothing_where_the_ipv6_gate_is_clear(pieces: list[str]) -> None:
    """The IPv6 gate is set wherever the IPv6 scan finds an address (hex, colons, dots, letters
    that glue and characters that do not, before and after), by both gates alike."""
    text = "".join(pieces)
    compiled = gate.make_hits(rz._HINTS, rz._GATES, rz._GATE_PATTERNS)(text)
    assert compiled & gate.IPV6 == _python(text) & gate.IPV6
    found: list[rz.Finding] = []
    rz._scan_ipv6(text, found)
    if found:
        assert compiled & gate.IPV6, (text, found)



def test_utf8_gives_each_text_its_own_bytes_whatever_was_encoded_last() -> None:
    """The one-slot memo of the gate's encoding answers only for the very object it encoded."""
    a, b = "naïve " * 8, "façade" * 8  # the same length in characters and in bytes
    assert gate.utf8(a) == a.encode()
    assert gate.utf8(a) is gate.utf8(a)  # the memo: the same bytes object, not encoded again
    assert gate.utf8(b) == b.encode()
    assert gate.utf8(a) == a.encode()
    lone = "x\ud800y"
    try:
        gate.utf8(lone)
    except UnicodeEncodeError:
        pass
    else:  # pragma: no cover - the assertion below names the failure
        raise AssertionError("a lone surrogate was encoded")
    assert gate.utf8(a) == a.encode()
    assert gate.utf8(a + "") == a.encode() and gate.utf8("".join(["naïve "] * 8)) == a.encode()


def test_the_gate_scans_a_text_as_the_memo_last_held_it() -> None:
    """A scan of a text right after a scan of another gives that text's bits, not the other's."""
    hits = rz._hits
    mail, plain = "écrire à bob@example.com", "écrire à bob, example dot com"
    assert hits(mail) & gate.EMAIL
    assert not hits(plain) & gate.EMAIL
    assert hits(mail) & gate.EMAIL
