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
    return gate.python_hits(text, rz._HINTS, rz._GATES)


def test_hyperscan_is_installed() -> None:
    """The dependency is there on this platform, so the fast path is what the other tests exercise."""
    assert gate.AVAILABLE


def test_compiled_and_python_gates_agree_on_samples() -> None:
    """Same bits on Chinese, English, full-width, secrets and look-alikes; every sample sets some bit."""
    compiled = gate.make_hits(rz._HINTS, rz._GATES)
    for text in _SAMPLES[:12]:
        assert compiled(text) == _python(text) != 0, text
    for text in _SAMPLES[12:]:
        assert compiled(text) == _python(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=60))
def test_compiled_and_python_gates_agree(text: str) -> None:
    """Same bits on arbitrary mixes of the characters the gates look at."""
    assert gate.make_hits(rz._HINTS, rz._GATES)(text) == _python(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=60))
def test_nothing_is_found_where_the_gate_is_clear(text: str) -> None:
    """A text whose gate bits (besides NORM) are clear holds no finding: skipping it loses nothing."""
    if not rz.scannable(text):
        assert find(text) == []
