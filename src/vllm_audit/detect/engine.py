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

from vllm_audit.detect.features import View
from vllm_audit.detect.rules import Rule, Rules
from vllm_audit.integrity.codec import Entry
from vllm_audit.privacy import recognizers

#: Most triggering records named in one alert (the count says how many there were).
MAX_TRIGGERS = 20
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

    @property
    def dedupe_key(self) -> str:
        return f"{self.rule.id}:{self.org}:{_k(self.key)}:{int(self.t // self.rule.dedupe_s)}"

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


class Engine:
    """Evaluates :class:`Rules` over batches of records (pure: no I/O besides the lookups passed in)."""

    def __init__(self, rules: Rules, *, classify: Classify | None = None) -> None:
        self.rules = rules
        self.classify = classify
        self._tenant: dict[str, tuple[Rule, ...]] = {}
        self._compiled: dict[tuple[str, str], re.Pattern[str] | None] = {}

    def rules_for(self, org: str) -> tuple[Rule, ...]:
        r = self._tenant.get(org)
        if r is None:
            r = self._tenant[org] = self.rules.for_tenant(org)
        return r

    def _pattern(self, rule: Rule, org: str) -> re.Pattern[str] | None:
        key = (rule.id, org)
        if key not in self._compiled:
            self._compiled[key] = rule.compiled()
        return self._compiled[key]

    def baseline_keys(self, recs: Iterable[Mapping[str, Any]]) -> set[str]:
        """The baselines a batch's outlier rules read (fetched by the caller before :meth:`plan`)."""
        out = set()
        for rec in recs:
            if rec.get("record_type") != "inference":
                continue
            org = _str(rec.get("org_id"))
            for rule in self.rules_for(org):
                if rule.kind == "outlier":
                    out.add(self._baseline_key(rule, org, rec))
        return out

    @staticmethod
    def _baseline_key(rule: Rule, org: str, rec: Mapping[str, Any]) -> str:
        return f"{rule.id}:{org}:{_k(_str(rec.get('model_name')) or '-')}"

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
        for entry, rec in items:
            if rec.get("record_type") != "inference":
                continue
            plan.records += 1
            view = View(rec)
            org = _str(rec.get("org_id"))
            t = event_time(rec)
            trig = Trigger(entry.writer_id, entry.seq, _opt(rec.get("record_id")), _opt(rec.get("request_id")))
            for rule in self.rules_for(org):
                if rule.where and not _where_ok(rule, rec):
                    continue
                key = view.value(rule.group_by)
                if key is None:
                    continue
                kind = rule.kind
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
                        cand = Candidate(rule, org, key, t, "")
                        plan.cands.append(cand)
                        rate[rk] = len(plan.rate)
                        plan.rate.append(
                            RateOp(
                                len(plan.cands) - 1,
                                f"r:{rule.id}:{org}:{_k(key)}",
                                bucket,
                                0.0,
                                1.0 - frac,
                                int(rule.window_s * 2) + 5,
                            )
                        )
                        i = rate[rk]
                    op = plan.rate[i]
                    op.inc += inc
                    op.prev_weight = min(op.prev_weight, 1.0 - frac)
                    c = plan.cands[op.cand]
                    c.t = max(c.t, t)
                    c.add(trig)
                elif kind == "distinct":
                    member = view.value(rule.distinct)
                    if member is None:
                        continue
                    dk = (rule.id, org, key)
                    j = distinct.get(dk)
                    if j is None:
                        plan.cands.append(Candidate(rule, org, key, t, ""))
                        distinct[dk] = len(plan.distinct)
                        dkey = f"d:{rule.id}:{org}:{_k(key)}"
                        plan.distinct.append(DistinctOp(len(plan.cands) - 1, dkey, {}, int(rule.window_s * 1000), 0))
                        j = distinct[dk]
                    dop = plan.distinct[j]
                    ms = int(t * 1000)
                    dop.members[member] = max(dop.members.get(member, 0), ms)
                    dop.now_ms = max(dop.now_ms, ms)
                    c = plan.cands[dop.cand]
                    c.t = max(c.t, t)
                    c.add(trig)
                elif kind == "classifier":
                    if self.classify is not None:
                        text = view.text("prompt")
                        if text:
                            classify.append((rule, org, key, t, trig, text))
                else:
                    reason, value = self._hit(rule, org, view, rec, baselines, plan)
                    if reason:
                        cand = Candidate(rule, org, key, t, reason, value)
                        dkey = cand.dedupe_key
                        idx = hits.get(dkey)
                        if idx is None:
                            plan.cands.append(cand)
                            idx = hits[dkey] = len(plan.cands) - 1
                            plan.hits.append(idx)
                        plan.cands[idx].add(trig)
        if classify and self.classify is not None:
            probs = self.classify([c[5] for c in classify])
            for (rule, org, key, t, trig, _text), p in zip(classify, probs, strict=True):
                if p >= rule.probability:
                    cand = Candidate(rule, org, key, t, f"classifier: attack probability {p:.2f}", round(float(p), 4))
                    idx = hits.get(cand.dedupe_key)
                    if idx is None:
                        plan.cands.append(cand)
                        idx = hits[cand.dedupe_key] = len(plan.cands) - 1
                        plan.hits.append(idx)
                    plan.cands[idx].add(trig)
        return plan

    def _hit(
        self,
        rule: Rule,
        org: str,
        view: View,
        rec: Mapping[str, Any],
        baselines: Mapping[str, Sequence[float]],
        plan: Plan,
    ) -> tuple[str, float]:
        kind = rule.kind
        if kind == "pattern":
            pat = self._pattern(rule, org)
            assert pat is not None
            texts = view.variants(rule.field) if rule.deobfuscate else [view.text(rule.field)]
            for i, text in enumerate(texts):
                m = pat.search(text)
                if m is not None:
                    how = "" if i == 0 else " (after decoding)"
                    return f"{rule.field} matches {_snippet(m.group())}{how}", 1.0
            return "", 0.0
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
            pat = self._pattern(rule, org)
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


def _where_ok(rule: Rule, rec: Mapping[str, Any]) -> bool:
    for field, accepted in rule.where.items():
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
