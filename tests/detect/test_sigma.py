"""Sigma export of the default rules, validated and converted offline with pySigma backends."""

from __future__ import annotations

import pytest

from vllm_audit.detect import sigma
from vllm_audit.detect.rules import load_rules


def test_export_parses_and_validates() -> None:
    """Every exported document parses; the built-in validators (less the two that go online) find nothing."""
    from sigma.collection import SigmaCollection
    from sigma.validators.core import validators

    text = sigma.export_yaml(load_rules(None))
    collection = SigmaCollection.from_yaml(text)
    assert len(collection.rules) >= 12
    from sigma.validation import SigmaValidator

    online = ("attacktag", "d3_fendtag")  # these download MITRE data on first use
    offline = [v for name, v in validators.items() if name not in online]
    from sigma.rule import SigmaRule

    issues = SigmaValidator(offline).validate_rules(iter([r for r in collection.rules if isinstance(r, SigmaRule)]))
    assert [] == [str(i) for i in issues]


@pytest.mark.parametrize("backend", sigma.BACKENDS)
def test_export_converts_to_each_backend(backend: str) -> None:
    """Lucene, ES|QL, Splunk and LogQL queries come out for the pattern rules, and (all but Lucene,
    which has no correlations) for the window rules."""
    queries = sigma.convert(sigma.export_yaml(load_rules(None)), backend)
    joined = "\n".join(queries)
    assert "input_prompt" in joined and "union" in joined.lower()
    if backend == "lucene":
        assert len(queries) >= 3
    else:
        assert len(queries) >= 9
        assert "prompt_sha256" in joined and "key_id" in joined


def test_rules_without_a_sigma_form_are_listed() -> None:
    """Baselines, canaries from the system prompt and the classifier are reported as skipped."""
    _, skipped = sigma.export(load_rules(None))
    assert {"output-length-abnormal", "canary-in-output", "classifier-attack"} == set(skipped)
