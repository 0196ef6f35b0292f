"""The configuration reference stays true."""

from __future__ import annotations

from tests.helpers import ROOT
from vllm_audit.configdoc import render


def test_configuration_reference_is_up_to_date() -> None:
    """docs/configuration.md equals what the config dataclasses render (regenerate if not)."""
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert render() == committed, "run: python -m vllm_audit.configdoc > docs/configuration.md"
