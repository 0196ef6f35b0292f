"""The console's parts without a browser: languages, sessions, search parameters, HTML escaping, charts."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_audit.access.store import BadQuery
from vllm_audit.console import i18n
from vllm_audit.console.charts import line_chart
from vllm_audit.console.html import data_block, esc, marked
from vllm_audit.console.queries import decode_cursor, encode_cursor, parse_search
from vllm_audit.console.session import Sessions, load_or_create_key


def test_both_languages_have_every_text() -> None:
    assert set(i18n.EN) == set(i18n.ZH)
    assert all(i18n.ZH[k].strip() for k in i18n.ZH)


@pytest.mark.parametrize(
    ("cookie", "accept", "want"),
    [
        (None, "zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        (None, "en-US,en;q=0.9,zh;q=0.8", "en"),
        (None, "fr-FR, zh;q=0.5", "zh"),
        (None, "de, fr", "en"),
        (None, "zh;q=0, en;q=0.1", "en"),
        ("en", "zh-CN", "en"),
        ("zh", "en", "zh"),
        ("xx", "zh-Hans-CN", "zh"),
        (None, None, "en"),
    ],
)
def test_language_from_cookie_then_accept_language(cookie: str | None, accept: str | None, want: str) -> None:
    assert i18n.pick_lang(cookie, accept) == want


def test_a_session_opens_only_unaltered_and_unexpired(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "keys" / "console.key")
    assert load_or_create_key(tmp_path / "keys" / "console.key") == key  # created once, then read
    assert (tmp_path / "keys" / "console.key").stat().st_mode & 0o777 == 0o600
    s = Sessions(key, ttl_s=60)
    cookie = s.seal("vak_secret", now=1000)
    opened = s.open(cookie, now=1001)
    assert opened is not None and opened.credential == "vak_secret"
    assert "vak_secret" not in cookie  # sealed, not merely signed
    assert s.open(cookie, now=1061) is None  # expired
    flipped = cookie[:20] + ("A" if cookie[20] != "A" else "B") + cookie[21:]
    assert s.open(flipped, now=1001) is None
    assert Sessions(b"\x00" * 32).open(cookie, now=1001) is None  # another server's key
    assert s.open("", now=1001) is None and s.open("!!", now=1001) is None
    assert s.csrf_ok(opened.nonce, s.csrf_token(opened.nonce))
    assert not s.csrf_ok(opened.nonce, s.csrf_token("other"))
    assert not s.csrf_ok(opened.nonce, None)


def test_search_parameters_are_checked() -> None:
    s = parse_search({"org_id": "acme", "sort": "latency_ms", "dir": "asc", "limit": "25", "since": "2026-01-01"})
    assert s.filters == (("org_id", "acme"),) and s.sort == "latency_ms" and not s.descending
    assert s.since == "2026-01-01T00:00:00.000Z"
    for bad, msg in [
        ({"sort": "record"}, "sort"),
        ({"dir": "up"}, "dir"),
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"status": "weird"}, "status"),
        ({"auth_status": "root"}, "auth_status"),
        ({"prompt_sha256": "ABC"}, "prompt hash"),
        ({"since": "yesterday"}, "ISO 8601"),
        ({"cursor": "%%%"}, "cursor"),
        ({"user_id": "x" * 300}, "too long"),
    ]:
        with pytest.raises(BadQuery, match=msg):
            parse_search(bad)
    c = encode_cursor(12.5, "2026-01-01T00:00:00.000Z", "w", 3)
    assert decode_cursor(c) == (12.5, "2026-01-01T00:00:00.000Z", "w", 3)


def test_text_is_escaped_and_redaction_markers_are_marked() -> None:
    assert esc('<a href="x">') == "&lt;a href=&quot;x&quot;&gt;"
    out = marked("mail <EMAIL:ps_1a2b3c> or <script>alert(1)</script> and [REDACTED:phone]")
    assert '<mark class="redacted" title="redacted">&lt;EMAIL:ps_1a2b3c&gt;</mark>' in out
    assert "&lt;script&gt;" in out and "<script>" not in out
    assert out.count("<mark") == 2
    block = data_block("d", '{"x":"</script><script>alert(1)</script>"}')
    assert block.count("</script>") == 1  # only the block's own end tag


def test_chart_has_one_series_per_group_and_a_text_alternative() -> None:
    svg = line_chart("Calls", ["2026-01-01", "2026-01-02"], {"a": [1, 2], "b<": [0, 5]}, chart_id="c")
    assert svg.count('<g class="series') == 2
    assert "<title id=\"c-t\">Calls</title>" in svg and 'data-series="b&lt;"' in svg
