from __future__ import annotations

import pytest

from vllm_audit.privacy.recognizers import find

ID = "11010519491231002X"


def kinds(text: str) -> list[tuple[str, str]]:
    return [(text[a:b], kind) for a, b, kind, _ in find(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"身份证号{ID}，请核实", [(ID, "CN_ID")]),
        ("手机13812345678联系", [("13812345678", "CN_PHONE")]),
        ("电话：+86 138-1234-5678。", [("+86 138-1234-5678", "CN_PHONE")]),
        ("座机0755-87654321转分机", [("0755-87654321", "CN_LANDLINE")]),
        ("卡号6212345678901232到账", [("6212345678901232", "BANK_CARD")]),
        ("visa 4111 1111 1111 1111 ok", [("4111 1111 1111 1111", "CREDIT_CARD")]),
        ("信用代码91350100M000100Y43。", [("91350100M000100Y43", "CN_USCC")]),
        ("护照E12345678，通行证C12345678", [("E12345678", "CN_PASSPORT"), ("C12345678", "CN_HKMO_PERMIT")]),
        ("邮箱zhang.san@example.com谢谢", [("zhang.san@example.com", "EMAIL")]),
        ("call +44 20 7946 0958 now", [("+44 20 7946 0958", "PHONE")]),
        ("from 192.168.1.10 and fe80::1ff:fe23:4567:890a", [("192.168.1.10", "IP_ADDRESS"),
                                                           ("fe80::1ff:fe23:4567:890a", "IP_ADDRESS")]),
        ("SSN 536-22-1234.", [("536-22-1234", "US_SSN")]),
        ("IBAN DE89 3704 0044 0532 0130 00.", [("DE89 3704 0044 0532 0130 00", "IBAN")]),
        ("db https://alice:s3cret@db.example.com/x", [("alice:s3cret", "URL_CREDENTIALS")]),
        ("key AKIAIOSFODNN7EXAMPLE here", [("AKIAIOSFODNN7EXAMPLE", "API_KEY")]),
    ],
)
def test_find_recognises_entities(text: str, expected: list[tuple[str, str]]) -> None:
    """Each entity type is found with its exact span, in Chinese text without spaces too."""
    assert kinds(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "订单号20240115123456789已发货",  # order number
        "身份证11010519491231002Y",  # wrong check character
        "ID 110105194913310021",  # invalid date
        "version 1.2.3.4 released",  # version string
        "at 2024-01-15 10:30:45 UTC",  # timestamp
        "tracking SF1234567890123",  # courier tracking number
        "card 4111111111111112",  # Luhn fails
        "SSN 666-12-3456 and 123-00-4567",  # invalid SSNs
        "pi is 3.14159265358979",  # decimal
        "std::vector and Class::method",  # C++ scopes
    ],
)
def test_find_ignores_look_alikes(text: str) -> None:
    """Look-alike numbers (wrong check digits, dates, versions, order numbers) are not entities."""
    assert kinds(text) == []


def test_find_full_width_digits_replace_original_span() -> None:
    """Full-width digits are normalised for matching and the span points at the original characters."""
    text = "手机１３８１２３４５６７８，身份证" + "".join(chr(ord(c) + 0xFEE0) for c in ID)
    found = find(text)
    assert [f[2] for f in found] == ["CN_PHONE", "CN_ID"]
    assert text[found[0][0] : found[0][1]] == "１３８１２３４５６７８"
    assert found[0][3] == "13812345678"


def test_find_splits_adjacent_numbers() -> None:
    """Two numbers separated by a space are found separately."""
    assert kinds("13812345678 13912345678") == [("13812345678", "CN_PHONE"), ("13912345678", "CN_PHONE")]


def test_find_secrets() -> None:
    """API keys, JWTs, PEM private keys are recognised."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdefghijk"
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----"
    text = f"sk-proj-{'a' * 30} sk-ant-api03-{'b' * 30} ghp_{'c' * 36} xoxb-1234567890-abc {jwt}\n{pem}"
    assert [k for _, k in kinds(text)] == ["API_KEY", "API_KEY", "API_KEY", "API_KEY", "JWT", "PRIVATE_KEY"]
