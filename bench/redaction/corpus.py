"""Deterministic labelled PII corpus (Chinese and English) with look-alike negatives.

``generate(seed)`` returns a list of ``{"text": str, "lang": "zh"|"en", "entities": [[start, end, type]]}``.
Run ``python bench/redaction/corpus.py > corpus.jsonl`` to see it; ``run.py`` generates it in memory.
"""

from __future__ import annotations

import datetime
import random
import string
import sys
from collections.abc import Callable

import orjson

from vllm_audit.privacy import checksums as cs

SEED = 20260101
PROVINCES = sorted(cs.CN_PROVINCES - {71, 81, 82, 83})
FW = {ord(c): ord(c) + 0xFEE0 for c in "0123456789X-"}


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for d in string.digits:
        if cs.luhn_ok(body + d):
            return body + d
    raise AssertionError


def _date(rng: random.Random) -> datetime.date:
    return datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 70))


def cn_id(rng: random.Random) -> str:
    d = _date(rng)
    body = f"{rng.choice(PROVINCES)}{rng.randrange(100, 9999):04d}{d:%Y%m%d}{rng.randrange(1000):03d}"
    return body + cs.cn_id_check_char(body)


def cn_id_bad_check(rng: random.Random) -> str:
    good = cn_id(rng)
    return good[:17] + rng.choice([c for c in "0123456789X" if c != good[17]])


def cn_id_bad_date(rng: random.Random) -> str:
    body = f"{rng.choice(PROVINCES)}{rng.randrange(100, 9999):04d}{rng.randrange(1950, 2010)}"
    body += rng.choice(["13", "00", "02"])
    body += f"{rng.choice(['30', '31', '00'])}{rng.randrange(1000):03d}"
    return body + cs.cn_id_check_char(body)


def cn_mobile(rng: random.Random) -> str:
    n = "1" + rng.choice("3456789") + "".join(rng.choice(string.digits) for _ in range(9))
    style = rng.randrange(5)
    if style == 1:
        return f"{n[:3]} {n[3:7]} {n[7:]}"
    if style == 2:
        return f"{n[:3]}-{n[3:7]}-{n[7:]}"
    if style == 3:
        return f"+86 {n}"
    if style == 4:
        return f"0086-{n[:3]}-{n[3:7]}-{n[7:]}"
    return n


def cn_landline(rng: random.Random) -> str:
    area = rng.choice(["010", "021", "020", "0755", "0571", "028"])
    local = rng.choice("2345678") + "".join(rng.choice(string.digits) for _ in range(7 if len(area) == 3 else 6))
    return rng.choice([f"{area}-{local}", f"({area}){local}", f"{area} {local}"])


def bank_card(rng: random.Random) -> str:
    n = _luhn_complete(rng.choice(["622202", "622848", "621700", "623668", "625807"]), rng.choice([16, 19]), rng)
    return " ".join(n[i : i + 4] for i in range(0, len(n), 4)) if rng.random() < 0.3 else n


def credit_card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("3530", 16)])
    n = _luhn_complete(prefix, length, rng)
    return "-".join(n[i : i + 4] for i in range(0, len(n), 4)) if rng.random() < 0.3 else n


def uscc(rng: random.Random) -> str:
    body = rng.choice(["91", "92", "93", "11", "12", "52", "Y1"]) + f"{rng.choice(PROVINCES)}{rng.randrange(10000):04d}"
    org = "".join(rng.choice(string.digits + "ABCDEFGHJKLMNPQRTUWXY") for _ in range(8))
    body += org + cs.org_code_check_char(org)
    return body + cs.uscc_check_char(body)


def passport(rng: random.Random) -> str:
    return rng.choice("EG") + "".join(rng.choice(string.digits) for _ in range(8))


def hkmo(rng: random.Random) -> str:
    return rng.choice("CHM") + "".join(rng.choice(string.digits) for _ in range(8))


def email(rng: random.Random) -> str:
    user = rng.choice(["zhang.san", "li_si", "wang5", "alice", "bob.smith", "j.doe+test", "13812345678"])
    return f"{user}{rng.randrange(100)}@{rng.choice(['example.com', 'qq.com', '163.com', 'corp.example.cn'])}"


def intl_phone(rng: random.Random) -> str:
    return rng.choice([
        f"+1 {rng.randrange(201, 989)}-{rng.randrange(200, 999)}-{rng.randrange(1000, 9999)}",
        f"+44 20 {rng.randrange(7000, 7999)} {rng.randrange(1000, 9999)}",
        f"+49 30 {rng.randrange(1000000, 9999999)}",
        f"+81 3-{rng.randrange(1000, 9999)}-{rng.randrange(1000, 9999)}",
    ])


def ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randrange(1, 255)) for _ in range(4))


def ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
    return rng.choice([":".join(groups), f"2001:db8::{groups[0]}:{groups[1]}", f"fe80::{groups[2]}"])


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def iban(rng: random.Random) -> str:
    country, bban_len = rng.choice([("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14)])
    if country in ("GB", "NL"):
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
        bban += "".join(rng.choice(string.digits) for _ in range(bban_len - 4))
    else:
        bban = "".join(rng.choice(string.digits) for _ in range(bban_len))
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    value = f"{country}{98 - num % 97:02d}{bban}"
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4)) if rng.random() < 0.5 else value


def secret(rng: random.Random) -> tuple[str, str]:
    tok = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40))
    return rng.choice([
        (f"sk-proj-{tok}", "API_KEY"),
        (f"sk-ant-api03-{tok}", "API_KEY"),
        ("AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)), "API_KEY"),
        (f"ghp_{tok[:36]}", "API_KEY"),
        (f"xoxb-{rng.randrange(10**11)}-{tok[:24]}", "API_KEY"),
        (f"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI{tok[:10]}In0.{tok[10:40]}", "JWT"),
    ])


POSITIVE: dict[str, Callable[[random.Random], str]] = {
    "CN_ID": cn_id, "CN_PHONE": cn_mobile, "CN_LANDLINE": cn_landline, "BANK_CARD": bank_card,
    "CREDIT_CARD": credit_card, "CN_USCC": uscc, "CN_PASSPORT": passport, "CN_HKMO_PERMIT": hkmo,
    "EMAIL": email, "PHONE": intl_phone, "IP_ADDRESS": ipv4, "US_SSN": ssn, "IBAN": iban,
}  # fmt: skip

NEGATIVE: list[Callable[[random.Random], str]] = [
    lambda r: f"{r.randrange(2020, 2027)}{r.randrange(1, 13):02d}{r.randrange(1, 29):02d}{r.randrange(10**9):09d}",
    cn_id_bad_check,
    cn_id_bad_date,
    lambda r: f"v{r.randrange(10)}.{r.randrange(20)}.{r.randrange(50)}",
    lambda r: f"version {r.randrange(10)}.{r.randrange(20)}.{r.randrange(50)}.{r.randrange(99)}",
    lambda r: f"2025-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d} {r.randrange(24):02d}:{r.randrange(60):02d}",
    lambda r: f"SF{r.randrange(10**12, 10**13)}",
    lambda r: f"JD{r.randrange(10**13, 10**14)}",
    lambda r: f"{r.randrange(10**14, 10**15)}",
    lambda r: (lambda c: c[:-1] + str((int(c[-1]) + 1) % 10))(_luhn_complete("4", 16, r)),
    lambda r: f"{r.choice(['000', '666', '912'])}-{r.randrange(10, 99)}-{r.randrange(1000, 9999)}",
    lambda r: f"3.{r.randrange(10**10, 10**11)}",
    lambda r: f"1{r.choice('012')}{r.randrange(10**8, 10**9)}",
    lambda r: f"{r.randrange(1700000000, 1800000000)}{r.randrange(1000):03d}",
    lambda r: f"INV-{r.randrange(10**6, 10**7)}",
]  # fmt: skip

ZH = [
    "您好，我的{k}是{v}，请帮我核实一下。",
    "客户资料：{k}{v}，已于昨日登记。",
    "请把{v}这个{k}从系统里删掉",
    "用户反馈说{k}（{v}）无法使用，订单号{n}，请尽快处理。",
]
EN = [
    "Hi, my {k} is {v}, can you check it?",
    "Customer record: {k}: {v}. Ticket {n} is open.",
    "Please remove {v} from the database ({k}).",
    "Logs show {k} {v} at {t}; order {n} pending.",
]
LABEL_ZH = {"CN_ID": "身份证号", "CN_PHONE": "手机号", "CN_LANDLINE": "座机", "BANK_CARD": "银行卡号",
            "CREDIT_CARD": "信用卡", "CN_USCC": "统一社会信用代码", "CN_PASSPORT": "护照号",
            "CN_HKMO_PERMIT": "通行证", "EMAIL": "邮箱", "PHONE": "国际电话", "IP_ADDRESS": "IP地址",
            "US_SSN": "SSN", "IBAN": "IBAN", "API_KEY": "密钥", "JWT": "令牌"}  # fmt: skip


def _fill(template: str, k: str, v: str, rng: random.Random) -> tuple[str, tuple[int, int]]:
    n = NEGATIVE[rng.randrange(len(NEGATIVE))](rng) if "{n}" in template else ""
    t = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    head, _, tail = template.partition("{v}")
    head = head.format(k=k, n=n, t=t)
    return head + v + tail.format(k=k, n=n, t=t), (len(head), len(head) + len(v))


def _untyped(f: Callable[[random.Random], str]) -> Callable[[random.Random], tuple[str, str]]:
    return lambda r: (f(r), "")


def generate(seed: int = SEED, per_type: int = 40, negatives: int = 300) -> list[dict[str, object]]:
    """The corpus: ``per_type`` positives per entity type and language, plus negative texts."""
    rng = random.Random(seed)
    items: list[dict[str, object]] = []
    kinds: list[tuple[str, Callable[[random.Random], tuple[str, str]]]] = [
        (t, _untyped(f)) for t, f in POSITIVE.items()
    ]
    kinds.append(("SECRET", secret))
    for kind, gen in kinds:
        for i in range(per_type * 2):
            lang = "zh" if i % 2 == 0 else "en"
            v, sub = gen(rng)
            etype = sub or kind
            if lang == "zh" and etype in ("CN_ID", "CN_PHONE", "BANK_CARD") and rng.random() < 0.2:
                v = v.translate(FW)  # full-width digits
            label = LABEL_ZH.get(etype, etype) if lang == "zh" else etype.lower().replace("_", " ")
            template = rng.choice(ZH if lang == "zh" else EN)
            text, (a, b) = _fill(template, label, v, rng)
            items.append({"text": text, "lang": lang, "entities": [[a, b, etype]]})
    for i in range(negatives):
        lang = "zh" if i % 2 == 0 else "en"
        v = NEGATIVE[i % len(NEGATIVE)](rng)
        template = rng.choice(ZH if lang == "zh" else EN)
        text, _ = _fill(template, "编号" if lang == "zh" else "reference", v, rng)
        items.append({"text": text, "lang": lang, "entities": []})
    rng.shuffle(items)
    return items


if __name__ == "__main__":
    for item in generate():
        sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
