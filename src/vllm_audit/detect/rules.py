"""The rules file: every detection rule in one YAML (or JSON) document, thresholds per tenant.

::

    version: 1
    defaults: {dedupe_window_s: 300, max_alerts_per_minute: 30}
    rules:
      - id: burst-per-user
        kind: rate            # rate | distinct | pattern | outlier | pii | canary | classifier
        group_by: user_id     # the window / dedupe key: key_id, user_id, client_ip, org_id, ...
        window_s: 60
        threshold: 120
    tenants:
      acme: {burst-per-user: {threshold: 600}, sql-injection: {enabled: false}}

Every key is checked: an unknown key, a wrong type or a bad regex is a :class:`RulesError` naming
the file, the rule and the key. ``load_rules(None)`` loads the packaged ``rules/default.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from vllm_audit.errors import ConfigError

Kind = Literal["rate", "distinct", "pattern", "outlier", "pii", "canary", "classifier"]
KINDS: tuple[str, ...] = ("rate", "distinct", "pattern", "outlier", "pii", "canary", "classifier")
Severity = Literal["low", "medium", "high", "critical"]
#: Record fields a rule may group by (the window and dedupe key).
GROUP_FIELDS: tuple[str, ...] = (
    "key_id",
    "user_id",
    "client_ip",
    "org_id",
    "model_name",
    "prompt_sha256",
    "route",
    "record_id",
)
#: Texts a pattern rule may look at (see ``features.py``).
TEXT_FIELDS: tuple[str, ...] = ("prompt", "output", "system")


class RulesError(ConfigError):
    """A rules file is malformed (the message names the file, the rule and the key)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule, with the tenant overrides already applied when it comes from :meth:`Rules.for_tenant`."""

    id: str
    kind: Kind
    description: str = ""
    severity: Severity = "medium"
    enabled: bool = True
    #: The key of the window and of the dedupe: one alert per (rule, tenant, key value, window).
    group_by: str = "user_id"
    #: Only records whose fields hold one of these values count (``{auth_status: [failed]}``).
    where: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: rate / distinct: the sliding window, seconds.
    window_s: float = 60.0
    #: rate: events (or ``sum`` units) in the window; distinct: distinct values; pii: entities.
    threshold: float = 0.0
    #: rate: add this numeric field instead of 1 per record (``total_tokens``).
    sum: str = ""
    #: distinct: the field whose distinct values are counted per key (``user_id``).
    distinct: str = ""
    #: pattern: the text looked at; outlier: ``output_tokens`` or ``output_chars``.
    field: str = "prompt"
    #: pattern / canary: regular expressions (case-insensitive), matched on the decoded variants.
    patterns: tuple[str, ...] = ()
    #: pattern: also match base64 / full-width / leet / zero-width / %-encoded / comment-split forms.
    deobfuscate: bool = True
    #: outlier: alert when the value exceeds median + k * 1.4826 * MAD of the model's baseline.
    k: float = 6.0
    #: outlier: values the baseline must hold before it is used.
    min_samples: int = 50
    #: outlier: never alert below this value (short outputs are never a leak).
    min_value: float = 0.0
    #: outlier: values kept per baseline (the most recent).
    baseline_size: int = 500
    #: pii: the entity types counted in outputs (redaction tags and unredacted values).
    entities: tuple[str, ...] = ()
    #: canary: fixed canary strings that must never appear in an output.
    strings: tuple[str, ...] = ()
    #: One alert per (rule, tenant, key value) per this many seconds (0: the rule's window).
    dedupe_window_s: float = 0.0
    #: At most this many alerts of this rule per minute across every detector (rate limit).
    max_alerts_per_minute: int = 30
    #: classifier: the probability above which a prompt is flagged.
    probability: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", self.id):
            raise ValueError(f"rule id {self.id!r} must be 1-64 of a-z 0-9 _ . - (starting alphanumeric)")
        if self.group_by not in GROUP_FIELDS:
            raise ValueError(f"group_by {self.group_by!r} is not one of {', '.join(GROUP_FIELDS)}")
        if self.window_s <= 0 or self.dedupe_window_s < 0:
            raise ValueError("window_s must be positive and dedupe_window_s not negative")
        if self.kind in ("rate", "distinct") and self.threshold <= 0:
            raise ValueError("a rate or distinct rule needs a positive threshold")
        if self.kind == "distinct" and not self.distinct:
            raise ValueError("a distinct rule names the field counted: distinct = user_id")
        if self.kind == "pattern":
            if not self.patterns:
                raise ValueError("a pattern rule needs patterns")
            if self.field not in TEXT_FIELDS:
                raise ValueError(f"field {self.field!r} is not one of {', '.join(TEXT_FIELDS)}")
        if self.kind == "outlier" and self.field not in ("output_tokens", "output_chars"):
            raise ValueError("an outlier rule's field is output_tokens or output_chars")
        if self.kind == "pii" and not self.entities:
            raise ValueError("a pii rule names its entities")
        if self.kind == "canary" and not (self.strings or self.patterns):
            raise ValueError("a canary rule needs strings or patterns (matched in the system prompt)")
        if self.max_alerts_per_minute < 1 or self.min_samples < 1 or self.baseline_size < self.min_samples:
            raise ValueError("max_alerts_per_minute and min_samples must be >= 1, baseline_size >= min_samples")
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None

    @property
    def dedupe_s(self) -> float:
        """The dedupe window: ``dedupe_window_s``, or the rule's own window when that is 0."""
        return self.dedupe_window_s or self.window_s

    def compiled(self) -> re.Pattern[str] | None:
        """All ``patterns`` as one case-insensitive alternation (None when there are none)."""
        if not self.patterns:
            return None
        return re.compile("|".join(f"(?:{p})" for p in self.patterns), re.IGNORECASE)


_FIELDS = {f.name: f for f in dataclasses.fields(Rule)}
_OVERRIDABLE = frozenset(_FIELDS) - {"id", "kind"}


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:
    """The parsed rules file: rules in file order and per-tenant overrides (``{org: {rule: {key: v}}}``)."""

    rules: tuple[Rule, ...]
    tenants: Mapping[str, Mapping[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)
    source: str = "<rules>"

    def for_tenant(self, org: str | None) -> tuple[Rule, ...]:
        """The rules as they apply to ``org`` (its overrides applied; disabled rules left out)."""
        over = self.tenants.get(org or "", {})
        out = []
        for rule in self.rules:
            changes = over.get(rule.id)
            r = rule
            if changes:
                r = dataclasses.replace(rule, **_typed(changes, f"{self.source} tenants.{org}.{rule.id}"))
            if r.enabled:
                out.append(r)
        return tuple(out)

    def by_id(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


def default_rules_text() -> str:
    return resources.files("vllm_audit.detect").joinpath("rules/default.yaml").read_text("utf-8")


def load_rules(path: str | Path | None) -> Rules:
    """Read and check a rules file (YAML, or JSON by suffix); ``None``: the packaged default rules."""
    if path is None:
        return parse_rules_text(default_rules_text(), "default.yaml")
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"Cannot read rules file {str(p)!r}: {getattr(exc, 'strerror', None) or exc}.") from None
    return parse_rules_text(text, str(p), json_doc=p.suffix == ".json")


def parse_rules_text(text: str, source: str, *, json_doc: bool = False) -> Rules:
    if json_doc:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RulesError(f"{source}: not valid JSON: {exc}.") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - the detect extra
            raise RulesError("YAML rules need the 'detect' extra: pip install 'vllm-audit[detect]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{source}: not valid YAML: {exc}".rstrip() + ".") from None
    return parse_rules(data, source)


def parse_rules(data: Any, source: str = "<rules>") -> Rules:
    if not isinstance(data, Mapping):
        raise RulesError(f"{source}: the rules file must be a mapping with 'rules'.")
    unknown = set(data) - {"version", "defaults", "rules", "tenants"}
    if unknown:
        first = sorted(unknown)[0]
        raise RulesError(f"{source}: unknown top-level key {first!r}. Known: version, defaults, rules, tenants.")
    if data.get("version", 1) != 1:
        raise RulesError(f"{source}: version {data.get('version')!r} is not supported (1 is).")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise RulesError(f"{source}: defaults must be a mapping.")
    base = _typed(defaults, f"{source} defaults")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"{source}: 'rules' must be a non-empty list.")
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, Mapping):
            raise RulesError(f"{source} rules[{i}]: each rule is a mapping.")
        rid = raw.get("id")
        where = f"{source} rule {rid!r}" if isinstance(rid, str) else f"{source} rules[{i}]"
        for key in ("id", "kind"):
            if not isinstance(raw.get(key), str):
                raise RulesError(f"{where}: {key!r} is required (a string).")
        fields = {**base, **_typed({k: v for k, v in raw.items() if k not in ("id", "kind")}, where)}
        try:
            rules.append(Rule(id=raw["id"], kind=raw["kind"], **fields))
        except (TypeError, ValueError) as exc:
            raise RulesError(f"{where}: {exc}.") from None
    ids = [r.id for r in rules]
    dup = next((x for x in ids if ids.count(x) > 1), None)
    if dup:
        raise RulesError(f"{source}: rule id {dup!r} appears twice.")
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, Mapping):
        raise RulesError(f"{source}: tenants must be a mapping of org id to rule overrides.")
    checked: dict[str, dict[str, Mapping[str, Any]]] = {}
    for org, over in tenants.items():
        if not isinstance(over, Mapping):
            raise RulesError(f"{source} tenants.{org}: must map rule ids to overrides.")
        checked[str(org)] = {}
        for rid, changes in over.items():
            rule = next((r for r in rules if r.id == rid), None)
            if rule is None:
                raise RulesError(f"{source} tenants.{org}: unknown rule {rid!r}.")
            if not isinstance(changes, Mapping):
                raise RulesError(f"{source} tenants.{org}.{rid}: overrides are a mapping.")
            typed = _typed(changes, f"{source} tenants.{org}.{rid}")
            try:
                dataclasses.replace(rule, **typed)
            except (TypeError, ValueError) as exc:
                raise RulesError(f"{source} tenants.{org}.{rid}: {exc}.") from None
            checked[str(org)][str(rid)] = typed
    return Rules(tuple(rules), checked, source)


def _typed(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``raw`` checked key by key against :class:`Rule`'s fields (lists become tuples)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _OVERRIDABLE:
            raise RulesError(f"{where}: unknown key {key!r}. Known keys: {', '.join(sorted(_OVERRIDABLE))}.")
        default = _FIELDS[key].default
        if key == "where":
            out[key] = _where(value, where)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise RulesError(f"{where}: {key} must be true or false, not {value!r}.")
            out[key] = value
        elif isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RulesError(f"{where}: {key} must be a number, not {value!r}.")
            out[key] = int(value) if isinstance(default, int) and not isinstance(default, float) else float(value)
            if isinstance(default, int) and not isinstance(default, float) and value != int(value):
                raise RulesError(f"{where}: {key} must be a whole number, not {value!r}.")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise RulesError(f"{where}: {key} must be a string, not {value!r}.")
            out[key] = value
        else:  # tuples of strings
            if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
                raise RulesError(f"{where}: {key} must be a list of strings.")
            out[key] = tuple(value)
    return out


def _where(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise RulesError(f"{where}: where must map a field to its accepted values.")
    out: dict[str, tuple[str, ...]] = {}
    for field, accepted in value.items():
        items = [accepted] if isinstance(accepted, str | int | bool) else accepted
        if not isinstance(items, Sequence) or not all(isinstance(v, str | int | bool) for v in items):
            raise RulesError(f"{where}: where.{field} must be a value or a list of values.")
        out[str(field)] = tuple(str(v) for v in items)
    return out
