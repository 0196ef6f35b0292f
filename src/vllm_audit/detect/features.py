"""What rules look at in a stored (already redacted) record: its texts and their decoded variants.

Prompts are stored redacted (PII replaced by tags such as ``<EMAIL>``); injection patterns survive
redaction, so rules match the stored text. ``variants(text)`` adds the decoded forms of obvious
obfuscation, each only when the text shows a sign of it (so clean text costs one scan):

- zero-width and soft-hyphen characters removed (``ig\u200bnore``);
- NFKC (full-width ``ＳＥＬＥＣＴ`` → ``SELECT``);
- ``%``-encoding undone (``%27%20OR%201%3D1``);
- SQL comments removed (``UN/**/ION SEL/**/ECT``);
- base64 runs decoded when they decode to printable UTF-8;
- leet digits and signs mapped to letters (``1gn0r3`` → ``ignore``), as an extra variant.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_audit.detect.prefilter import Prefilter
from vllm_audit.record import prompt_sha256

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad"))
_ZW_RE = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]")
_B64_RUN = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_SQL_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_SIGN = re.compile(r"[a-z][0-9@$!]|[0-9@$!][a-z]", re.IGNORECASE)
_MAX_TEXT = 64 * 1024


def variants(text: str) -> list[str]:
    """``text`` (cut to 64 KiB) and each decoded form it shows a sign of, in the order above."""
    t = text[:_MAX_TEXT]
    out = [t]
    if not t.isascii():
        if _ZW_RE.search(t):
            t = t.translate(_ZERO_WIDTH)
        n = unicodedata.normalize("NFKC", t)
        if n != text:
            out.append(n)
        t = n
    if "%" in t and _PCT.search(t):
        u = urllib.parse.unquote(t)
        if u != t:
            out.append(u)
            t = u
    if "/*" in t:
        c = _SQL_COMMENT.sub("", t)
        if c != t:
            out.append(c)
    if len(t) >= 16:
        for m in _B64_RUN.finditer(t):
            decoded = _b64(m.group())
            if decoded:
                out.append(decoded)
    if _LEET_SIGN.search(t):
        leet = t.lower().translate(_LEET)
        if leet != t:
            out.append(leet)
    return out


def _b64(run: str) -> str:
    try:
        raw = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
        s = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return ""
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in s)
    return s if s and printable >= 0.9 * len(s) else ""


def _content_text(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)


def prompt_texts(input_prompt: Any) -> tuple[str, str]:
    """``(user text, system text)`` of a stored prompt: chat messages, a prompt string, or a list.

    User text is what callers (users, tools, retrieved documents) supplied: user, tool and
    function messages and plain prompts; system text is the operator's system/developer messages.
    """
    user: list[str] = []
    system: list[str] = []
    if isinstance(input_prompt, str):
        user.append(input_prompt)
    elif isinstance(input_prompt, list):
        for item in input_prompt:
            if isinstance(item, Mapping):
                role = item.get("role")
                target = system if role in ("system", "developer") else user
                _content_text(item.get("content"), target)
            elif isinstance(item, str):
                user.append(item)
    elif isinstance(input_prompt, Mapping):  # a route-specific shape: every string value
        for v in input_prompt.values():
            _content_text(v, user)
    return "\n".join(user), "\n".join(system)


def output_text(output: Any) -> str:
    """The stored output as one text (a list of choices joined; anything else: empty)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(o for o in output if isinstance(o, str))
    return ""


class View:
    """The parts of one record the rules use, computed on first use and kept."""

    __slots__ = ("_masks", "_out", "_prompt", "_system", "_variants", "rec", "values")

    def __init__(self, rec: Mapping[str, Any]) -> None:
        self.rec = rec
        self._prompt: str | None = None
        self._system = ""
        self._out: str | None = None
        self._variants: dict[str, list[str]] = {}
        #: Grouping values computed so far (``value`` fills it).
        self.values: dict[str, str | None] = {}
        self._masks: dict[tuple[str, bool], list[int]] = {}

    def text(self, field: str) -> str:
        if field == "output":
            if self._out is None:
                self._out = output_text(self.rec.get("output_response"))
            return self._out
        if self._prompt is None:
            self._prompt, self._system = prompt_texts(self.rec.get("input_prompt"))
        return self._prompt if field == "prompt" else self._system

    def variants(self, field: str) -> list[str]:
        v = self._variants.get(field)
        if v is None:
            text = self.text(field)
            v = variants(text) if text else []
            self._variants[field] = v
        return v

    def masks(self, key: tuple[str, bool], pf: Prefilter, texts: Sequence[str]) -> list[int]:
        """``pf``'s mask of each of ``texts`` (the variants of one field), computed once per key."""
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = [pf.mask(t) for t in texts]
        return m

    def value(self, field: str) -> str | None:
        """A grouping value as a string (None when the record has none)."""
        try:
            return self.values[field]
        except KeyError:
            v = self.values[field] = self._value(field)
            return v

    def _value(self, field: str) -> str | None:
        v = self.rec.get(field)
        if v is None and field == "prompt_sha256" and self.rec.get("input_prompt") is not None:
            v = prompt_sha256(self.rec.get("input_prompt"))
        if v is None or v == "":
            return None
        return v if isinstance(v, str) else str(v)

    def number(self, field: str) -> float | None:
        if field == "output_chars":
            return float(len(self.text("output")))
        if field == "output_tokens":
            field = "completion_tokens"
        v = self.rec.get(field)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        return None
