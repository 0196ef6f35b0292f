"""Adversarial variants of a labelled corpus: the evasions of issue 15 item 9.

``variants(items, seed)`` returns ``{name: [item, ...]}`` where each item is the corpus item with
its entity values rewritten (spans updated):

- ``zero_width``: one to three invisible characters (ZWSP, word joiner, soft hyphen, ZWNJ, ZWJ,
  BOM) inserted inside each value;
- ``full_width``: ASCII letters, digits and ``@.-+_`` of each value in full-width forms;
- ``unicode_digits``: digits in Arabic-Indic, Devanagari, Bengali or mathematical bold forms;
- ``separators``: digit values regrouped (3-4 digits) with ``.``, two spaces, a tab or a newline;
- ``split``: the text cut inside the value into two message parts (``parts`` holds them).

Run on a held-out corpus (another seed than the one the recognizers were written against).
"""

from __future__ import annotations

import random
from typing import Any

_INVISIBLE = "\u200b\u2060\u00ad\u200c\u200d\ufeff"
_DIGIT_SETS = ("٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗")
_SEPARATORS = (".", "  ", "\t", "\n")
#: Types written as digit groups (the separator variant applies to them).
DIGIT_TYPES = frozenset({"CN_ID", "CN_PHONE", "BANK_CARD", "CREDIT_CARD"})


def _fw(c: str) -> str:
    return chr(ord(c) + 0xFEE0) if c.isascii() and (c.isalnum() or c in "@.-+_") else c


def _rewrite(item: dict[str, Any], fn: Any) -> dict[str, Any] | None:
    text: str = item["text"]
    out, pos, spans = [], 0, []
    for a, b, t in sorted(item["entities"]):
        new = fn(text[a:b], t)
        if new is None:
            return None
        out.append(text[pos:a])
        start = sum(map(len, out))
        out.append(new)
        spans.append([start, start + len(new), t])
        pos = b
    out.append(text[pos:])
    return {**item, "text": "".join(out), "entities": spans}


def variants(items: list[dict[str, Any]], seed: int) -> dict[str, list[dict[str, Any]]]:
    """The adversarial variants of every item holding one or more entities."""
    rng = random.Random(seed)
    pos = [i for i in items if i["entities"]]

    def zero_width(v: str, _t: str) -> str:
        chars = list(v)
        for _ in range(rng.randint(1, 3)):
            chars.insert(rng.randint(1, len(chars) - 1), rng.choice(_INVISIBLE))
        return "".join(chars)

    def full_width(v: str, _t: str) -> str:
        return "".join(map(_fw, v))

    def unicode_digits(v: str, _t: str) -> str | None:
        if not any(c.isdigit() for c in v):
            return None
        digits = rng.choice(_DIGIT_SETS)
        return "".join(digits[int(c)] if c.isascii() and c.isdigit() else c for c in v)

    def separators(v: str, t: str) -> str | None:
        if t not in DIGIT_TYPES:
            return None
        d = "".join(c for c in v if c.isalnum())
        sep = rng.choice(_SEPARATORS)
        groups, i = [], 0
        first = 3 if t == "CN_PHONE" else 4 if t != "CN_ID" else 6
        while i < len(d):
            n = first if not groups else 4
            groups.append(d[i : i + n])
            i += n
        return sep.join(groups)

    out: dict[str, list[dict[str, Any]]] = {}
    for name, fn in (("zero_width", zero_width), ("full_width", full_width),
                     ("unicode_digits", unicode_digits), ("separators", separators)):  # fmt: skip
        out[name] = [v for v in (_rewrite(i, fn) for i in pos) if v is not None]
    split = []
    for item in pos:
        if len(item["entities"]) != 1:
            continue
        a, b, t = item["entities"][0]
        if b - a < 4:
            continue
        cut = rng.randint(a + 2, b - 2)
        split.append({**item, "parts": [item["text"][:cut], item["text"][cut:]]})
    out["split"] = split
    return out
