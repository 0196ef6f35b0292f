"""The rules engine: turns a batch of parsed records into a :class:`Plan` of window updates and
alert candidates; a :class:`~vllm_audit.detect.state.State` applies the plan atomically with the
cursor and says which candidates win their dedupe key.

Rules never look at the wall clock: windows, dedupe and rate limits are in *event time* (the
record's ``timestamp``), so replaying a log — after a crash, or offline with ``rules test`` —
gives the same decisions.

- ``rate``: a sliding window over two tumbling buckets (count = current + previous x the part of
  the previous bucket still inside the window), per (rule, tenant, key value);
- ``distinct``: a sorted set of distinct values per key, trimmed to the window (exact);
- ``pattern`` / ``pii`` / ``canary`` / ``outlier`` / ``classifier``: a hit per record; the
  dedupe key (rule, tenant, key value, dedupe window) makes it one alert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from vllm_audit.detect.features import View
from vllm_audit.detect.prefilter import Prefilter
from vllm_audit.detect.prefilter import prefilter as make_prefilter
from vllm_audit.detect.rules import Rule, Rules
from vllm_audit.integrity.codec import Entry
from vllm_audit.privacy import recognizers

#: Most triggering records named in one alert (the count says how many there were).
MAX_TRIGGERS = 20
#: The fields of an alert entry that depend on the rule only (``reason`` too for rate / distinct).
_STATIC = ("record_type", "schema_version", "rule", "severity", "group_by", "window_s", "detector")
_MISSING: Any = object()
_TAG = re.compile(r"<([A-Z_]{2,20})(?::ps_[0-9a-f]{6,64})?>")

Classify = Callable[[Sequence[str]], Sequence[float]]
"""Return, for each text, the probability that it is an attack (the local classifier)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Trigger:
    """A record that contributed to an alert."""

    writer_id: str
    seq: int
    record_id: str | None
    request_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "seq": self.seq,
            "record_id": self.record_id,
            "request_id": self.request_id,
        }


@dataclasses.dataclass(slots=True)
class Candidate:
    """A possible alert: it becomes one when its dedupe key is free and the rule's rate allows."""

    rule: Rule
    org: str
    key: str
    t: float
    reason: str
    value: float = 0.0
    triggers: list[Trigger] = dataclasses.field(default_factory=list)
    count: int = 0
    #: The dedupe key, fixed once the batch is planned (rate and distinct candidates move ``t``).
    dk: str = ""

    @property
    def dedupe_key(self) -> str:
        return self.dk or f"{self.rule.id}:{self.org}:{_k(self.key)}:{int(self.t // self.rule.dedupe_s)}"

    @property
    def alert_id(self) -> str:
        return hashlib.sha256(self.dedupe_key.encode()).hexdigest()[:32]

    def add(self, trig: Trigger) -> None:
        self.count += 1
        if len(self.triggers) < MAX_TRIGGERS:
            self.triggers.append(trig)


@dataclasses.dataclass(slots=True)
class RateOp:
    cand: int
    key: str
    bucket: int
    inc: float
    #: The part of the previous bucket still inside the window at the op's time.
    prev_weight: float
    ttl: int


@dataclasses.dataclass(slots=True)
class DistinctOp:
    cand: int
    key: str
    #: ``{member: event time in ms}``
    members: dict[str, int]
    window_ms: int
    now_ms: int


@dataclasses.dataclass(slots=True)
class Plan:
    """What one batch changes in the shared state, and the candidates it may raise."""

    cands: list[Candidate] = dataclasses.field(default_factory=list)
    rate: list[RateOp] = dataclasses.field(default_factory=list)
    distinct: list[DistinctOp] = dataclasses.field(default_factory=list)
    #: Candidates raised by one record (no window): only their dedupe key decides.
    hits: list[int] = dataclasses.field(default_factory=list)
    #: ``{baseline key: (values to append, size kept)}``
    baseline: dict[str, tuple[list[float], int]] = dataclasses.field(default_factory=dict)
    #: ``{baseline key: (values it was computed over, median, MAD, limit)}`` (a cache)
    limits: dict[str, tuple[int, float, float, float]] = dataclasses.field(default_factory=dict)
    records: int = 0


def _k(value: str) -> str:
    return value if len(value) <= 64 and ":" not in value else hashlib.sha256(value.encode()).hexdigest()[:32]


def event_time(rec: Mapping[str, Any]) -> float:
    """The record's ``timestamp`` as epoch seconds (0 when absent or malformed)."""
    ts = rec.get("timestamp")
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def robust_threshold(values: Sequence[float], k: float) -> tuple[float, float, float]:
    """``(median, MAD, median + k * 1.4826 * MAD)`` of ``values`` (MAD floored at 1 % of the median)."""
    s = sorted(values)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    dev = sorted(abs(v - med) for v in s)
    mad = dev[n // 2] if n % 2 else (dev[n // 2 - 1] + dev[n // 2]) / 2
    mad = max(mad, 0.01 * med, 1.0)
    return med, mad, med + k * 1.4826 * mad


@dataclasses.dataclass(frozen=True, slots=True)
class _Step:
    """One rule as a tenant's program runs it: its checks resolved once, not per record."""

    rule: Rule
    kind: str
    group_by: str
    where: tuple[tuple[str, tuple[str, ...]], ...]
    #: pattern / canary: the compiled alternation of the rule's patterns.
    pattern: re.Pattern[str] | None
    #: pattern: the rule's bit in its field's :class:`~vllm_audit.detect.prefilter.Prefilter`.
    bit: int = 0
    #: pattern: the key of the field's prefilter masks in the record's view.
    masks: tuple[str, bool] = ("", False)


@dataclasses.dataclass(frozen=True, slots=True)
class _Program:
    """A tenant's enabled rules, in file order, with one prefilter per (text field, deobfuscate)."""

    rules: tuple[Rule, ...]
    steps: tuple[_Step, ...]
    outliers: tuple[Rule, ...]
    prefilters: Mapping[tuple[str, bool], Prefilter]


class Engine:
    """Evaluates :class:`Rules` over batches of records (pure: no I/O besides the lookups passed in).

    ``prefilter`` (default on) runs a pattern rule's Python regex only on texts where one
    hyperscan pass over every pattern rule says it may match (``prefilter.py``); the decisions are
    the same as with ``prefilter=False`` (``tests/detect/test_prefilter.py``).
    """

    def __init__(self, rules: Rules, *, classify: Classify | None = None, prefilter: bool = True) -> None:
        self.rules = rules
        self.classify = classify
        self.prefilter = prefilter
        self._programs: dict[str, _Program] = {}
        self._window_start: dict[tuple[float, int], str] = {}
        self._static: dict[tuple[str, str, str], tuple[Rule, bytes]] = {}
        for org in ("", *rules.tenants):  # compile the prefilters now, not on the first batch
            self._program(org)

    def rules_for(self, org: str) -> tuple[Rule, ...]:
        return self._program(org).rules

    def _program(self, org: str) -> _Program:
        prog = self._programs.get(org)
        if prog is None:
            prog = self._programs[org] = self._compile(self.rules.for_tenant(org))
        return prog

    def _compile(self, rules: tuple[Rule, ...]) -> _Program:
        groups: dict[tuple[str, bool], list[Rule]] = {}
        for r in rules:
            if r.kind == "pattern":
                groups.setdefault((r.field, r.deobfuscate), []).append(r)
        filters: dict[tuple[str, bool], Prefilter] = {}
        if self.prefilter:
            filters = {k: make_prefilter(tuple(r.patterns for r in rs)) for k, rs in groups.items()}
        steps = []
        for r in rules:
            bit, masks = 0, ("", False)
            if r.kind == "pattern":
                masks = (r.field, r.deobfuscate)
                bit = 1 << groups[masks].index(r) if self.prefilter else 0
            steps.append(_Step(r, r.kind, r.group_by, tuple(r.where.items()), r.compiled(), bit, masks))
        outliers = tuple(r for r in rules if r.kind == "outlier")
        return _Program(rules, tuple(steps), outliers, filters)

    def baseline_keys(self, recs: Iterable[Mapping[str, Any]]) -> set[str]:
        """The baselines a batch's outlier rules read (fetched by the caller before :meth:`plan`)."""
        out = set()
        for rec in recs:
            if rec.get("record_type") != "inference":
                continue
            org = _str(rec.get("org_id"))
            for rule in self._program(org).outliers:
                out.add(self._baseline_key(rule, org, rec))
        return out

    @staticmethod
    def _baseline_key(rule: Rule, org: str, rec: Mapping[str, Any]) -> str:
        return f"{rule.id}:{org}:{_k(_str(rec.get('model_name')) or '-')}"

    def window_start(self, cand: Candidate) -> str:
        """The ISO start of the candidate's dedupe window (cached: few windows per batch)."""
        d = cand.rule.dedupe_s
        w = int(cand.t // d)
        s = self._window_start.get((d, w))
        if s is None:
            if len(self._window_start) > 4096:
                self._window_start.clear()
            s = self._window_start[(d, w)] = datetime.fromtimestamp(w * d, UTC).isoformat()
        return s

    def plan(
        self, items: Sequence[tuple[Entry, Mapping[str, Any]]], baselines: Mapping[str, Sequence[float]] | None = None
    ) -> Plan:
        """The plan of one batch (``items``: entries with their parsed records, inference ones only)."""
        plan = Plan()
        baselines = baselines or {}
        rate: dict[tuple[str, str, str, int], int] = {}  # (rule, org, key, bucket) -> plan.rate index
        distinct: dict[tuple[str, str, str], int] = {}
        hits: dict[str, int] = {}  # dedupe key -> cand
        classify: list[tuple[Rule, str, str, float, Trigger, str]] = []
        cands = plan.cands
        for entry, rec in items:
            if rec.get("record_type") != "inference":
                continue
            plan.records += 1
            view = View(rec)
            values = view.values
            org = _str(rec.get("org_id"))
            prog = self._programs.get(org) or self._program(org)
            t = event_time(rec)
            trig = Trigger(entry.writer_id, entry.seq, _opt(rec.get("record_id")), _opt(rec.get("request_id")))
            for step in prog.steps:
                if step.where and not _where_ok(step.where, rec):
                    continue
                key = values.get(step.group_by, _MISSING)
                if key is _MISSING:
                    key = view.value(step.group_by)
                if key is None:
                    continue
                kind = step.kind
                rule = step.rule
                if kind == "rate":
                    inc = 1.0
                    if rule.sum:
                        n = view.number(rule.sum)
                        if not n:
                            continue
                        inc = n
                    bucket = int(t // rule.window_s)
                    frac = (t - bucket * rule.window_s) / rule.window_s
                    rk = (rule.id, org, key, bucket)
                    i = rate.get(rk)
                    if i is None:
                        cands.append(Candidate(rule, org, key, t, ""))
                        i = rate[rk] = len(plan.rate)
                        plan.rate.append(
                            RateOp(
                                len(cands) - 1,
                                f"r:{rule.id}:{org}:{_k(key)}",
                                bucket,
                                0.0,
                                1.0 - frac,
                                int(rule.window_s * 2) + 5,
                            )
                        )
                    op = plan.rate[i]
                    op.inc += inc
                    op.prev_weight = min(op.prev_weight, 1.0 - frac)
                    c = cands[op.cand]
                    if t > c.t:
                        c.t = t
                    c.count += 1
                    if len(c.triggers) < MAX_TRIGGERS:
                        c.triggers.append(trig)
                elif kind == "distinct":
                    member = view.value(rule.distinct)
                    if member is None:
                        continue
                    dk = (rule.id, org, key)
                    j = distinct.get(dk)
                    if j is None:
                        cands.append(Candidate(rule, org, key, t, ""))
                        j = distinct[dk] = len(plan.distinct)
                        dkey = f"d:{rule.id}:{org}:{_k(key)}"
                        plan.distinct.append(DistinctOp(len(cands) - 1, dkey, {}, int(rule.window_s * 1000), 0))
                    dop = plan.distinct[j]
                    ms = int(t * 1000)
                    dop.members[member] = max(dop.members.get(member, 0), ms)
                    dop.now_ms = max(dop.now_ms, ms)
                    c = cands[dop.cand]
                    if t > c.t:
                        c.t = t
                    c.count += 1
                    if len(c.triggers) < MAX_TRIGGERS:
                        c.triggers.append(trig)
                elif kind == "classifier":
                    if self.classify is not None:
                        text = view.text("prompt")
                        if text:
                            classify.append((rule, org, key, t, trig, text))
                else:
                    if kind == "pattern":
                        reason, value = self._match(step, prog, view)
                    else:
                        reason, value = self._hit(rule, org, step.pattern, view, rec, baselines, plan)
                    if reason:
                        cand = Candidate(rule, org, key, t, reason, value)
                        dkey = cand.dedupe_key
                        idx = hits.get(dkey)
                        if idx is None:
                            cands.append(cand)
                            idx = hits[dkey] = len(cands) - 1
                            plan.hits.append(idx)
                        cands[idx].add(trig)
        if classify and self.classify is not None:
            probs = self.classify([c[5] for c in classify])
            for (rule, org, key, t, trig, _text), p in zip(classify, probs, strict=True):
                if p >= rule.probability:
                    cand = Candidate(rule, org, key, t, f"classifier: attack probability {p:.2f}", round(float(p), 4))
                    idx = hits.get(cand.dedupe_key)
                    if idx is None:
                        cands.append(cand)
                        idx = hits[cand.dedupe_key] = len(cands) - 1
                        plan.hits.append(idx)
                    cands[idx].add(trig)
        for c in cands:
            c.dk = c.dedupe_key
        return plan

    def templates(self, cands: Sequence[Candidate], *, detector: str) -> list[bytes]:
        """The JSON of :func:`alert_entry` of each candidate, its rule's constant part serialised once."""
        out = []
        static = self._static
        for c in cands:
            rule = c.rule
            sk = (rule.id, c.org, detector)
            head = static.get(sk)
            if head is None or head[0] is not rule:
                whole = alert_entry(c, detector=detector)
                fixed = {k: whole[k] for k in _STATIC}
                if rule.kind in ("rate", "distinct"):
                    fixed["reason"] = whole["reason"]
                head = static[sk] = (rule, orjson.dumps(fixed)[:-1] + b",")
            dyn: dict[str, Any] = {
                "alert_id": c.alert_id,
                "org_id": c.org or None,
                "group_value": c.key,
                "value": None,
                "count": c.count,
                "window_start": self.window_start(c),
                "triggers": c.triggers,
            }
            if rule.kind not in ("rate", "distinct"):
                dyn["reason"] = c.reason
            if rule.group_by == "user_id":
                dyn["user_id"] = c.key
            out.append(head[1] + orjson.dumps(dyn)[1:])
        return out

    @staticmethod
    def _match(step: _Step, prog: _Program, view: View) -> tuple[str, float]:
        """A pattern rule on the record: the first (decoded) variant its regex matches."""
        rule = step.rule
        pat = step.pattern
        assert pat is not None
        texts = view.variants(rule.field) if rule.deobfuscate else [view.text(rule.field)]
        masks = view.masks(step.masks, prog.prefilters[step.masks], texts) if step.bit else None
        for i, text in enumerate(texts):
            if masks is not None and not masks[i] & step.bit:
                continue
            m = pat.search(text)
            if m is not None:
                how = "" if i == 0 else " (after decoding)"
                return f"{rule.field} matches {_snippet(m.group())}{how}", 1.0
        return "", 0.0

    def _hit(
        self,
        rule: Rule,
        org: str,
        pat: re.Pattern[str] | None,
        view: View,
        rec: Mapping[str, Any],
        baselines: Mapping[str, Sequence[float]],
        plan: Plan,
    ) -> tuple[str, float]:
        kind = rule.kind
        if kind == "pii":
            text = view.text("output")
            if not text:
                return "", 0.0
            want = rule.entities
            counts: dict[str, int] = {}
            if "<" in text:
                for m in _TAG.finditer(text):
                    if m.group(1) in want:
                        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
            for f in recognizers.find(text, want):
                counts[f[2]] = counts.get(f[2], 0) + 1
            total = sum(counts.values())
            if total and total >= max(rule.threshold, 1):
                kinds = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                return f"output holds {kinds}", float(total)
            return "", 0.0
        if kind == "canary":
            out = view.text("output")
            if not out:
                return "", 0.0
            for s in rule.strings:
                if s and s in out:
                    return f"output holds the canary {_mask(s)}", 1.0
            system = view.text("system")
            if pat is not None and system:
                for m in pat.finditer(system):
                    token = m.group()
                    if len(token) >= 6 and token in out:
                        return f"output holds the system prompt's canary {_mask(token)}", 1.0
            return "", 0.0
        if kind == "outlier":
            value = view.number(rule.field)
            if value is None:
                return "", 0.0
            bkey = self._baseline_key(rule, org, rec)
            vals, _size = plan.baseline.setdefault(bkey, ([], rule.baseline_size))
            # The baseline is the stored one plus this batch's values so far; its threshold is
            # recomputed only when it grew by an eighth (sorting per record would cost too much).
            n = len(baselines.get(bkey, ())) + len(vals)
            cached = plan.limits.get(bkey)
            if n >= rule.min_samples and (cached is None or n - cached[0] >= max(16, cached[0] // 8)):
                base = [*baselines.get(bkey, ()), *vals][-rule.baseline_size :]
                cached = plan.limits[bkey] = (n, *robust_threshold(base, rule.k))
            vals.append(value)
            if cached is None or value < rule.min_value:
                return "", 0.0
            _n, med, mad, limit = cached
            if value > limit:
                return f"{rule.field} {value:g} > median {med:g} + {rule.k:g}*1.4826*MAD {mad:g} = {limit:.0f}", value
            return "", 0.0
        return "", 0.0  # pragma: no cover - kinds are checked when the rules load


def alert_entry(cand: Candidate, *, detector: str) -> dict[str, Any]:
    """The template of the ``record_type: "alert"`` entry of a candidate.

    ``value`` (the window's count, sum or score) is filled in by
    :func:`~vllm_audit.detect.alerts.finalize` once the shared state decided it (``{value}`` in
    the reason).
    """
    rule = cand.rule
    reason = cand.reason
    if rule.kind == "rate":
        what = f"sum of {rule.sum}" if rule.sum else "records"
        reason = f"{{value}} {what} in {rule.window_s:g}s for one {rule.group_by} (threshold {rule.threshold:g})"
    elif rule.kind == "distinct":
        reason = f"{{value}} distinct {rule.distinct} in {rule.window_s:g}s for one {rule.group_by}"
        reason += f" (threshold {rule.threshold:g})"
    entry: dict[str, Any] = {
        "record_type": "alert",
        "schema_version": 1,
        "alert_id": cand.alert_id,
        "rule": {"id": rule.id, "name": rule.id, "kind": rule.kind, "description": rule.description},
        "severity": rule.severity,
        "reason": reason,
        "org_id": cand.org or None,
        "group_by": rule.group_by,
        "group_value": cand.key,
        "value": None,
        "count": cand.count,
        "window_start": datetime.fromtimestamp(int(cand.t // rule.dedupe_s) * rule.dedupe_s, UTC).isoformat(),
        "window_s": rule.dedupe_s,
        "triggers": [t.to_json() for t in cand.triggers],
        "detector": detector,
    }
    if rule.group_by == "user_id":
        entry["user_id"] = cand.key
    return entry


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _opt(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _where_ok(where: tuple[tuple[str, tuple[str, ...]], ...], rec: Mapping[str, Any]) -> bool:
    for field, accepted in where:
        v = rec.get(field)
        if isinstance(v, bool):
            v = "true" if v else "false"
        if v is None or str(v) not in accepted:
            return False
    return True


def _snippet(s: str) -> str:
    s = s.replace("\n", " ")
    return repr(s if len(s) <= 60 else s[:57] + "...")


def _mask(secret: str) -> str:
    """A canary named without repeating it: its first 4 characters and its length."""
    return f"{secret[:4]!r}... ({len(secret)} chars)"
