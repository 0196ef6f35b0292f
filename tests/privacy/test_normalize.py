"""The detection copy's fast paths give what the plain table lookups give (``privacy/normalize.py``)."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_audit.privacy import normalize as nz
from vllm_audit.privacy import recognizers as rz

_T = nz._tables()
#: Characters the copy maps one to one or drops/expands (a sample of each kind, BMP and astral),
#: Chinese text and punctuation it leaves alone, ASCII.
_MAPPED = sorted(_T.one_chars)[::7] + sorted(_T.var)[::5]
_ALPHABET = st.sampled_from([*_MAPPED, *"中文张三，。、「」アい 0123456789abcXZ-+().@\n", "\U0001d7d8", "\U0001f600"])


def _reference(text: str) -> tuple[str, list[int] | None]:
    """The copy as ``str.translate`` over the whole text and the full (astral-aware) classes make it."""
    if text.isascii() or _T.trigger_re.search(text) is None:
        return text, None
    t = text.translate(_T.one)
    if _T.var_re is None or _T.var_re.search(t) is None:
        return t, None
    pieces: list[str] = []
    origin: list[int] = []
    last = 0
    for m in _T.var_re.finditer(t):
        i = m.start()
        pieces.append(t[last:i])
        origin.extend(range(last, i))
        rep = _T.var[t[i]]
        pieces.append(rep)
        origin.extend([i] * len(rep))
        last = i + 1
    pieces.append(t[last:])
    origin.extend(range(last, len(t)))
    return "".join(pieces), origin


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=300))
@example("中文" * 200 + "１３８１２３４５６７８")  # sparse: built from slices
@example("１３８１２３４５６７８" * 30)  # dense: the table
@example("电话\U0001d7cf３８\u200b１２３４５６７８")  # an astral digit: the full classes
def test_the_copy_and_its_offsets_are_those_of_the_plain_table(text: str) -> None:
    """Sparse slices, the dense table with identity entries and the BMP-only classes build exactly
    the copy (and offset map) a ``str.translate`` over the whole text with the full classes does."""
    copy, omap = nz.normalize(text)
    want, origin = _reference(text)
    assert copy == want
    assert (omap.origin if omap is not None else None) == origin


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 -+()Xx.\t\r\n")), max_size=40))
def test_digits_of_a_run_drop_exactly_its_separators(run: str) -> None:
    """``_digits`` (``bytes.translate``) keeps the digits of a number run, as a regex would."""
    assert rz._digits(run) == re.sub("[^0-9]", "", run)
