"""PII evasion (issue 15 item 9): invisible characters, Unicode digits, full-width forms, separators,
values split across message parts or messages; and the false positives of item 11."""

from __future__ import annotations

import pytest

from vllm_audit.config import Config
from vllm_audit.privacy.recognizers import find
from vllm_audit.privacy.redactor import build_redactor, redact_text

PHONE = "13812345678"
AR = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
DEVA = str.maketrans("0123456789", "०१२३४५६७८९")
FW = {ord(c): chr(ord(c) + 0xFEE0) for c in "0123456789abcdefghijklmnopqrstuvwxyz@."}


@pytest.mark.parametrize(
    "value",
    [
        "138\u200b1234\u200b5678",  # zero-width space
        "138\u20601234\u20605678",  # word joiner
        "138\u00ad12345678",  # soft hyphen
        "138\u200c1234\u200d5678",  # ZWNJ, ZWJ
        "\ufeff138\ufeff12345678",  # BOM
        PHONE.translate(AR),
        PHONE.translate(DEVA),
        "".join(chr(0x1D7CE + int(c)) for c in PHONE),  # mathematical bold digits
        PHONE.translate(FW),
        "138.1234.5678",
        "138  1234  5678",
        "138\t1234\t5678",
        "138\n1234\n5678",
    ],
)
def test_phone_evasions_are_found_and_the_original_span_replaced(value: str) -> None:
    """Each variant is one CN_PHONE covering the original characters; nothing of it survives."""
    text = f"请联系 {value} 谢谢"
    [(a, b, kind, canonical)] = find(text)
    assert (kind, canonical) == ("CN_PHONE", PHONE)
    assert text[a:b].strip("\u200b\u2060\u00ad\u200c\u200d\ufeff") == value.strip("\ufeff")
    assert redact_text(text).replace("\ufeff", "") == "请联系 <CN_PHONE> 谢谢"  # a BOM before the value may stay


@pytest.mark.parametrize(
    "value",
    ["bob\u200b@example.com", "bob@exa\u2060mple.com", "ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ", "bob@example\u00ad.com"],
)
def test_email_evasions_are_found(value: str) -> None:
    """Invisible characters and full-width letters or ``＠`` do not hide an e-mail address."""
    text = f"mail {value} now"
    [(a, b, kind, canonical)] = find(text)
    assert (kind, canonical, text[a:b]) == ("EMAIL", "bob@example.com", value)
    assert redact_text(text) == "mail <EMAIL> now"


def test_clean_unicode_text_is_left_alone() -> None:
    """Chinese prose with full-width punctuation and Arabic prose with ZWNJ are not rewritten."""
    for text in ("这是一个测试（注：没有个人信息），谢谢！", "می\u200cخواهم", "版本 1.2.3.4 已发布"):
        assert find(text) == []
        assert redact_text(text) is text or redact_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "发票代码：044031900111",
        "发票代码 044031900111，发票号码 12345678",
        "版本 1.2.3.4",
        "版本号：10.0.19041.1",
        "版本号：10.0.1.1",
        "pi = 0.13812345678",
    ],
)
def test_false_positives_of_ordinary_text(text: str) -> None:
    """Invoice codes are not landlines, labelled versions are not addresses, decimals are not phones."""
    assert find(text) == []


@pytest.mark.parametrize("text", ["电话：075587654321", "ip 10.0.1.1", "（0755）87654321", "IP地址（10.1.2.3）"])
def test_recall_kept_next_to_the_fixes(text: str) -> None:
    """The same shapes without the invoice or version label are still found."""
    assert len(find(text)) == 1


def _prompt(*parts: object) -> dict[str, object]:
    return {"org_id": "acme", "input_prompt": list(parts)}


@pytest.mark.parametrize(
    ("messages", "kind"),
    [
        ([{"role": "user", "content": [{"type": "text", "text": "call 138 1234"},
                                       {"type": "text", "text": "5678 ok"}]}], "CN_PHONE"),
        ([{"role": "user", "content": "call 138 1234"}, {"role": "user", "content": "5678 ok"}], "CN_PHONE"),
        ([{"role": "user", "content": "mail bob@exa"}, {"role": "user", "content": "mple.com ok"}], "EMAIL"),
        ([{"role": "user", "content": "key sk-"}, {"role": "user", "content": "proj-" + "A1b2C3d4" * 4}], "API_KEY"),
        ([{"role": "user", "content": "id 1101"}, {"role": "user", "content": "0519"},
          {"role": "user", "content": "491231002X"}], "CN_ID"),
    ],
)  # fmt: skip
def test_values_split_across_parts_or_messages_are_redacted(messages: list[dict[str, object]], kind: str) -> None:
    """Each part's covered characters are replaced; the value is counted once."""
    rec = build_redactor(Config())(_prompt(*messages))
    stored = repr(rec["input_prompt"])
    assert rec["redaction"]["entities"] == {kind: 1}
    for fragment in ("1234", "5678", "exa", "mple", "A1b2", "491231"):
        assert fragment not in stored


def test_split_needs_both_parts_to_be_adjacent_values() -> None:
    """A value already whole in one part is not extended into its neighbour's text."""
    messages = [{"role": "user", "content": "13812345678"}, {"role": "user", "content": "9 items"}]
    rec = build_redactor(Config())(_prompt(*messages))
    assert [m["content"] for m in rec["input_prompt"]] == ["<CN_PHONE>", "9 items"]


def test_request_id_shapes_are_not_international_numbers() -> None:
    """Client request ids like ``mp-0021-08273915`` are not "00 + country code" phone numbers (a
    real vLLM test lost the id of one record of 300 to this false positive)."""
    import random

    from vllm_audit.privacy.recognizers import find

    rng = random.Random(7)
    ids = ["mp-0021-08273915", "mp-0052-77828494", "req-0042-12345678", "job-0044-0001"]
    ids += [f"mp-{i % 300:04d}-{rng.getrandbits(32):08x}" for i in range(3000)]  # the vLLM test's ids
    assert [rid for rid in ids if find(rid)] == []


@pytest.mark.parametrize(
    "text", ["0044 20 7946 0958", "+44 20 7946 0958", "+4420 7946 0958", "00 44 20 7946 0958", "0039 06 6988 4857"]
)
def test_written_international_numbers_are_still_found(text: str) -> None:
    from vllm_audit.privacy.recognizers import find

    assert [f[2] for f in find(text)] == ["PHONE"]
