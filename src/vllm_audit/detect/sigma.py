"""Export the rules as Sigma, for the custom log source ``product: vllm-audit, category: llm``.

Field names in the exported rules are vllm-audit's record fields (``input_prompt``,
``output_response``, ``user_id``, ``auth_status``, ``client_ip`` ...); docs/sigma/logsource.md maps
each to its ECS and OpenTelemetry GenAI name (a backend pipeline renames them where a SIEM stores
ECS). ``pattern`` rules become one regular-expression selection per pattern; ``rate`` and
``distinct`` rules become a base rule plus a Sigma correlation rule (``event_count`` /
``value_count`` grouped by the rule's key over its window); ``pii`` rules match the redaction tags
of their entity types in outputs. ``outlier`` (a baseline learnt from the stream), ``canary``
(tokens taken from each record's own system prompt) and ``classifier`` rules have no Sigma form:
they are listed as skipped. ``convert`` runs pySigma backends offline (the ``sigma`` extra).
"""

from __future__ import annotations

import uuid
from typing import Any

from vllm_audit.detect.rules import Rule, Rules

LOGSOURCE = {"product": "vllm-audit", "category": "llm"}
_NS = uuid.UUID("6f1c9a52-3d1e-4b7e-9a43-2b9f0c7d1e55")
_LEVEL = {"low": "low", "medium": "medium", "high": "high", "critical": "critical"}
_TEXT = {"prompt": "input_prompt", "output": "output_response", "system": "input_prompt"}


def _rid(rule: Rule, suffix: str = "") -> str:
    return str(uuid.uuid5(_NS, rule.id + suffix))


def _base(rule: Rule, detection: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    return {
        "title": f"vllm-audit {rule.id}{suffix}",
        "id": _rid(rule, suffix),
        "name": f"vllm_audit_{rule.id.replace('-', '_')}{suffix.replace('-', '_')}",
        "status": "experimental",
        "description": rule.description or rule.id,
        "author": "vllm-audit",
        "logsource": dict(LOGSOURCE),
        "detection": detection,
        "level": _LEVEL[rule.severity],
        "tags": ["detection.threat-hunting"],
    }


def _where(rule: Rule) -> dict[str, Any]:
    sel: dict[str, Any] = {"record_type": "inference"}
    for field, values in rule.where.items():
        sel[field] = list(values) if len(values) > 1 else values[0]
    return sel


def to_sigma(rule: Rule) -> list[dict[str, Any]]:
    """The Sigma documents of one rule (empty when it has no Sigma form)."""
    if rule.kind == "pattern":
        field = _TEXT[rule.field]
        return [_base(rule, {"selection": {f"{field}|re": [f"(?i){p}" for p in rule.patterns]},
                             "condition": "selection"})]
    if rule.kind == "pii":
        tags = [f"<{e}" for e in rule.entities]
        return [_base(rule, {"selection": {"output_response|contains": tags}, "condition": "selection"})]
    if rule.kind in ("rate", "distinct"):
        base = _base(rule, {"selection": _where(rule), "condition": "selection"}, "-events")
        corr: dict[str, Any] = {
            "title": f"vllm-audit {rule.id}",
            "id": _rid(rule),
            "name": f"vllm_audit_{rule.id.replace('-', '_')}",
            "status": "experimental",
            "description": rule.description or rule.id,
            "author": "vllm-audit",
            "level": _LEVEL[rule.severity],
            "correlation": {
                "type": "event_count" if rule.kind == "rate" and not rule.sum else "value_count",
                "rules": [base["name"]],
                "group-by": [rule.group_by],
                "timespan": f"{int(rule.window_s)}s",
                "condition": {"gte": int(rule.threshold)},
            },
        }
        if rule.kind == "distinct":
            corr["correlation"]["condition"]["field"] = rule.distinct
        elif rule.sum:
            # Sigma has no sum correlation: count distinct requests as the closest portable form.
            corr["correlation"]["type"] = "event_count"
            corr["description"] += f" (Sigma form counts records; the detector sums {rule.sum})"
        return [base, corr]
    return []


def export(rules: Rules) -> tuple[list[dict[str, Any]], list[str]]:
    """``(Sigma documents, ids of rules without a Sigma form)``."""
    docs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for rule in rules.rules:
        out = to_sigma(rule)
        if out:
            docs += out
        else:
            skipped.append(rule.id)
    return docs, skipped


def export_yaml(rules: Rules) -> str:
    """Every Sigma document as one multi-document YAML text."""
    import yaml

    docs, _ = export(rules)
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True, width=1000)


BACKENDS = ("lucene", "esql", "splunk", "loki")


def convert(text: str, backend: str) -> list[str]:
    """Convert a Sigma YAML text with a pySigma backend, offline: one query per rule."""
    from sigma.collection import SigmaCollection

    collection = SigmaCollection.from_yaml(text)
    if backend in ("lucene", "esql"):
        from sigma.backends.elasticsearch import ESQLBackend, LuceneBackend  # type: ignore[attr-defined]

        be: Any = LuceneBackend() if backend == "lucene" else ESQLBackend()
    elif backend == "splunk":
        from sigma.backends.splunk import SplunkBackend  # type: ignore[attr-defined]

        be = SplunkBackend()
    elif backend == "loki":
        from sigma.backends.loki import LogQLBackend

        be = LogQLBackend()
    else:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if getattr(be, "correlation_methods", None) is None:
        # This backend has no correlation support (Lucene): convert the base rules only.
        from sigma.rule import SigmaRule

        collection = SigmaCollection([r for r in collection.rules if isinstance(r, SigmaRule)])
    return [str(q) for q in be.convert(collection)]
