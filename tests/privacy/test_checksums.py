from __future__ import annotations

from vllm_audit.privacy import checksums as cs


def test_cn_id_known_good_and_wrong_check_digit() -> None:
    """A GB 11643 ID with the right check character passes; any other check character fails."""
    first17 = "11010519491231002"
    good = first17 + cs.cn_id_check_char(first17)
    assert good == "11010519491231002X"
    assert cs.is_cn_id(good)
    for c in "0123456789":
        assert not cs.is_cn_id(first17 + c)


def test_cn_id_rejects_bad_region_and_date() -> None:
    """Unknown province codes and impossible birth dates are rejected even with a valid check digit."""
    for first17 in ("99010519491231002", "11010519490231002", "11010518991231002", "11010519491301002"):
        assert not cs.is_cn_id(first17 + cs.cn_id_check_char(first17))


def test_cn_id_legacy_15_digits() -> None:
    """A 15-digit legacy ID needs a province code and a real date (19YYMMDD)."""
    assert cs.is_cn_id("110105491231002")
    assert not cs.is_cn_id("110105491331002")


def test_luhn_and_card_brands() -> None:
    """Known test card numbers get their brand; a changed digit breaks Luhn."""
    assert cs.card_brand("4111111111111111") == "visa"
    assert cs.card_brand("5555555555554444") == "mastercard"
    assert cs.card_brand("378282246310005") == "amex"
    assert cs.card_brand("6011111111111117") == "discover"
    assert cs.card_brand("3530111333300000") == "jcb"
    assert cs.card_brand("6212345678901232") == "unionpay"
    assert cs.card_brand("4111111111111112") is None


def test_uscc_check_character() -> None:
    """A GB 32100 code with its computed check character passes; another character fails."""
    assert cs.is_uscc("91350100M000100Y43")
    org = "71092849"
    body = "91110000" + org + cs.org_code_check_char(org)
    assert cs.is_uscc(body + cs.uscc_check_char(body))
    wrong = "0" if cs.uscc_check_char(body) != "0" else "1"
    assert not cs.is_uscc(body + wrong)


def test_uscc_requires_valid_org_code() -> None:
    """The embedded GB 11714 organization code must carry its own check character."""
    org = "MA01ABCD"
    good = org + cs.org_code_check_char(org)
    bad = org + ("1" if good[8] != "1" else "2")
    assert cs.is_org_code(good) and not cs.is_org_code(bad)
    body_bad = "91440300" + bad
    assert not cs.is_uscc(body_bad + cs.uscc_check_char(body_bad))


def test_iban_mod97() -> None:
    """Registry examples pass MOD 97-10; a changed digit or wrong length fails."""
    assert cs.is_iban("DE89370400440532013000")
    assert cs.is_iban("GB82WEST12345698765432")
    assert not cs.is_iban("DE89370400440532013001")
    assert not cs.is_iban("DE8937040044053201300")


def test_us_ssn_rules() -> None:
    """Area 000/666/9xx, group 00 and serial 0000 are invalid."""
    assert cs.is_us_ssn("536", "22", "1234")
    for area, group, serial in (("000", "12", "1234"), ("666", "12", "1234"), ("912", "12", "1234")):
        assert not cs.is_us_ssn(area, group, serial)
    assert not cs.is_us_ssn("536", "00", "1234")
    assert not cs.is_us_ssn("536", "22", "0000")


def test_cn_landline_and_area_codes() -> None:
    """Landlines need a real area code and a local number not starting with 0 or 1."""
    assert cs.cn_landline_split("01062345678")
    assert cs.cn_landline_split("075587654321")
    assert not cs.cn_landline_split("01012345678")
    assert cs.is_cn_area_code("0755") and not cs.is_cn_area_code("0155")
