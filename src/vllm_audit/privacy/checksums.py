"""Validators with check digits and structure rules; pure functions over normalised ASCII strings.

Specs: GB 11643-1999 (resident identity number, ISO 7064 MOD 11-2), GB 32100-2015 (unified social
credit code), ISO/IEC 7812 (Luhn), ISO 13616 (IBAN, MOD 97-10), SSA rules for US SSNs, ITU-T E.164.
"""

from __future__ import annotations

import datetime
from operator import mul
from typing import Final

#: First two digits of a resident ID: provinces, Taiwan (71), Hong Kong (81), Macau (82), 83.
CN_PROVINCES: Final = frozenset(
    {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53, 54}
    | {61, 62, 63, 64, 65, 71, 81, 82, 83}
)
_ID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK: Final = "10X98765432"
_ID_OFFSET: Final = 48 * sum(_ID_WEIGHTS)

_USCC_CHARS: Final = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VALUE: Final = {c: i for i, c in enumerate(_USCC_CHARS)}
#: Registration authority + organisation type pairs (GB 32100-2015 tables 1-2).
_USCC_KINDS: Final = frozenset("11 12 13 19 21 29 31 32 33 34 35 39 41 49 51 52 53 59 61 62 69 71 72 79 81 89 91 92 93 "
                               "A1 A9 N1 N2 N3 N9 Y1".split())
_USCC_WEIGHTS: Final = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_USCC_DROP: Final = dict.fromkeys(map(ord, _USCC_CHARS))  # translate() deletes the alphabet: "" when valid
_USCC_BYTES: Final = bytes(_USCC_VALUE.get(chr(b), 0) for b in range(256))  # ASCII code -> character value

#: IBAN length per country (ISO 13616 registry, the common ones).
IBAN_LENGTHS: Final = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24,
    "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21,
    "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31,
    "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24,
    "XK": 20,
}  # fmt: skip

#: ITU-T E.164 country calling codes (1 to 3 digits).
_CC_1_2: Final = frozenset(
    {"1", "7", "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45"}
    | {"46", "47", "48", "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62"}
    | {"63", "64", "65", "66", "81", "82", "84", "86", "90", "91", "92", "93", "94", "95", "98"}
)
_CC_3_PREFIXES: tuple[str, ...] = ("21", "22", "23", "24", "25", "26", "29", "35", "37", "38", "42", "50", "59")
_CC_3_PREFIXES += ("67", "68", "69", "85", "88", "96", "97", "99")


def cn_id_check_char(first17: str) -> str:
    """The GB 11643 check character for the first 17 digits of a resident ID."""
    if len(first17) == 17 and first17.isascii() and first17.isdigit():
        # sum(map(mul, ...)) runs in C; the ASCII codes carry an offset of 48 per digit.
        return _ID_CHECK[(sum(map(mul, first17.encode(), _ID_WEIGHTS)) - _ID_OFFSET) % 11]
    total = sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def _valid_date(year: int, month: int, day: int) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def is_cn_id(value: str) -> bool:
    """An 18-digit (check digit) or 15-digit (legacy) resident ID: province, real birth date."""
    n = len(value)
    if n == 18:
        if not value[:17].isdigit() or value[17] not in "0123456789Xx":
            return False
        if int(value[:2]) not in CN_PROVINCES:
            return False
        year = int(value[6:10])
        if not 1900 <= year <= 2099 or not _valid_date(year, int(value[10:12]), int(value[12:14])):
            return False
        return cn_id_check_char(value[:17]) == value[17].upper()
    if n == 15 and value.isdigit():
        if int(value[:2]) not in CN_PROVINCES:
            return False
        return _valid_date(1900 + int(value[6:8]), int(value[8:10]), int(value[10:12]))
    return False


_LUHN_DOUBLE: Final = bytes(range(48)) + b"0246813579" + bytes(range(58, 256))


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check over a string of ASCII digits."""
    if digits.isascii() and digits.isdigit():
        odd = digits[-1::-2].encode()  # from the right: kept as is
        even = digits[-2::-2].encode().translate(_LUHN_DOUBLE)  # doubled, digits summed
        return (sum(odd) + sum(even) - 48 * len(digits)) % 10 == 0
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_brand(digits: str) -> str | None:
    """The brand of a Luhn-valid card number by IIN prefix and length, or None."""
    n = len(digits)
    if not 13 <= n <= 19 or not digits.isdigit() or not luhn_ok(digits):
        return None
    p2 = int(digits[:2])
    p4 = int(digits[:4])
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or 644 <= int(digits[:3]) <= 649 or p2 == 65) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (p2 == 36 or 300 <= int(digits[:3]) <= 305) and n == 14:
        return "diners"
    return None


def is_uscc(value: str) -> bool:
    """An 18-character unified social credit code with a valid GB 32100 check character."""
    if len(value) != 18 or value[:2] not in _USCC_KINDS or not value[2:8].isdigit():
        return False
    if int(value[2:4]) not in CN_PROVINCES and value[2:4] != "10":  # 10xxxx: national level
        return False
    body = value[:17]
    if not body.isascii() or body.translate(_USCC_DROP):  # a character outside the code's alphabet
        return False
    total = sum(map(mul, body.encode().translate(_USCC_BYTES), _USCC_WEIGHTS))
    check = (31 - total % 31) % 31
    return _USCC_CHARS[check] == value[17] and is_org_code(value[8:17])


_ORG_WEIGHTS: Final = (3, 7, 9, 10, 5, 8, 4, 2)


def org_code_check_char(first8: str) -> str:
    """The GB 11714 check character of an organization code (the 9th-17th characters of a USCC)."""
    total = sum(int(c, 36) * w for c, w in zip(first8, _ORG_WEIGHTS, strict=True))
    c = 11 - total % 11
    return "X" if c == 10 else "0" if c == 11 else str(c)


def is_org_code(value: str) -> bool:
    """A 9-character organization code with a valid GB 11714 check character."""
    if len(value) != 9 or not value[:8].isalnum() or not value.isascii():
        return False
    return org_code_check_char(value[:8]) == value[8]


def uscc_check_char(first17: str) -> str:
    """The GB 32100 check character for the first 17 characters of a social credit code."""
    total = sum(_USCC_VALUE[c] * w for c, w in zip(first17, _USCC_WEIGHTS, strict=True))
    return _USCC_CHARS[(31 - total % 31) % 31]


#: A -> "10" ... Z -> "35" (ISO 13616 letter values), for str.translate; digits map to themselves
#: (a hit: a character missing from the table costs a KeyError inside translate).
_IBAN_DIGITS = {ord(c): str(i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 10)}
_IBAN_DIGITS |= {ord(d): d for d in "0123456789"}


def is_iban(value: str) -> bool:
    """An IBAN (spaces removed) with the registered length and a valid MOD 97-10 check."""
    if len(value) < 15 or IBAN_LENGTHS.get(value[:2]) != len(value) or not value[2:4].isdigit():
        return False
    if not value.isalnum() or not value.isascii():
        return False
    moved = (value[4:] + value[:4]).upper()  # int(c, 36) reads both cases alike
    return int(moved.translate(_IBAN_DIGITS)) % 97 == 1


def is_us_ssn(area: str, group: str, serial: str) -> bool:
    """A US SSN by the SSA rules: area not 000/666/9xx, group not 00, serial not 0000."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}{group}{serial}" not in ("078051120", "219099999", "123456789")


def is_cn_mobile(digits: str) -> bool:
    """An 11-digit mainland mobile number (1[3-9] then 9 digits)."""
    return len(digits) == 11 and digits[0] == "1" and digits[1] in "3456789" and digits.isdigit()


def cn_landline_split(digits: str) -> bool:
    """A mainland landline without separators: 0 + area code + 7-8 digit local number."""
    if len(digits) < 10 or digits[0] != "0" or not digits.isdigit():
        return False
    for area_len in (3, 4):  # "010"/"02x" then "0xxx"
        area = digits[:area_len]
        if area_len == 3 and not (area == "010" or area[1] == "2"):
            continue
        if area_len == 4 and area[1] in "012":
            continue
        local = digits[area_len:]
        if len(local) in (7, 8) and local[0] not in "01":
            return True
    return False


def is_cn_area_code(area: str) -> bool:
    """A mainland long-distance area code with its leading 0 (010, 02x, 0[3-9]xx)."""
    if not area.isdigit() or area[:1] != "0":
        return False
    if len(area) == 3:
        return area == "010" or area[1] == "2"
    return len(area) == 4 and area[1] in "3456789"


def e164_country_code(digits: str) -> str | None:
    """The country calling code a full international number starts with, or None."""
    if digits[:1] in ("", "0"):
        return None
    for n in (1, 2):
        if digits[:n] in _CC_1_2:
            return digits[:n]
    if digits[:2] in _CC_3_PREFIXES:
        return digits[:3]
    return None
