"""The detector: a projection that evaluates the rules over sealed records and appends alerts.

It runs on the projection runner's thread (in the gateway, or in ``vllm-audit ship``), seconds
behind the request and never on the request path. Per batch of one writer's entries:

1. parse the inference records (alerts and events are never input: no feedback loops);
2. read the baselines the batch's outlier rules need, score prompts with the classifier;
3. plan the window updates and alert candidates (:class:`~vllm_audit.detect.engine.Engine`);
4. commit the plan, the dedupe claims and the cursor in one Redis script
   (:class:`~vllm_audit.detect.state.RedisState`); winners are queued as pending;
5. append the pending alerts to the log (durable), POST them to the webhook, count them,
   and only then take them off the queue.

A crash between 4 and 5 leaves them queued: :meth:`Detector.open` re-appends those the log does
not already hold (matched by ``alert_id``), so a restart neither loses nor doubles an alert.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.detect.alerts import Emit, Webhook, finalize
from vllm_audit.detect.engine import Classify, Engine
from vllm_audit.detect.rules import Rules
from vllm_audit.detect.state import State
from vllm_audit.integrity.codec import Entry, EntryError
from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader
from vllm_audit.ship.base import Context, Projection

log = logging.getLogger("vllm_audit.detect")


class StaleCursor(Exception):
    """The shared state's cursor is not where this batch starts (another process moved it)."""


def default_instance(log_dir: str | os.PathLike[str]) -> str:
    """``<host>-<12 hex of the log directory's absolute path>``: this log directory among detectors."""
    path = str(Path(log_dir).resolve())
    return f"{socket.gethostname()}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


class Detector(Projection):
    """Rules over the record stream (see the module docstring)."""

    kind = "detector"

    def __init__(
        self,
        rules: Rules,
        log_dir: str | os.PathLike[str],
        *,
        state: Callable[[], State],
        emit: Emit,
        instance: str,
        name: str = "detector",
        classify: Classify | None = None,
        webhook: Webhook | None = None,
        batch_max: int = 2000,
    ) -> None:
        self.name = name
        self.batch_max = batch_max
        self.log_dir = Path(log_dir)
        self.engine = Engine(rules, classify=classify)
        self.instance = instance
        self._state_factory = state
        self._state: State | None = None
        self._emit = emit
        self.webhook = webhook
        self._lock = threading.Lock()
        #: ``{rule id: alerts appended}``, ``{rule id: alerts over the rate limit}``
        self.alerts: dict[str, int] = {}
        self.suppressed: dict[str, int] = {}
        self.records = 0
        self.emitted_ids: list[str] = []

    # -- projection protocol ----------------------------------------------------------------------

    def open(self) -> None:
        self._state = self._state_factory()
        self._flush_pending(recovering=True)

    def load_cursors(self) -> dict[str, Cursor]:
        return self.state.load_cursors()

    def close(self) -> None:
        st, self._state = self._state, None
        closer = getattr(st, "close", None)
        if callable(closer):
            closer()

    @property
    def state(self) -> State:
        if self._state is None:
            self._state = self._state_factory()
        return self._state

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context | None) -> None:
        first, last = entries[0], entries[-1]
        start = Cursor(writer_id, first.seq, first.prev)
        end = Cursor(writer_id, last.seq + 1, last.leaf_hex)
        items: list[tuple[Entry, Mapping[str, Any]]] = []
        for e in entries:
            if e.record_type != "inference":
                continue
            try:
                items.append((e, e.record()))
            except (orjson.JSONDecodeError, EntryError) as exc:
                if ctx is not None:
                    ctx.quarantine(e, f"not a JSON record: {exc}")
        state = self.state
        keys = self.engine.baseline_keys(rec for _, rec in items)
        baselines = state.baselines(keys) if keys else {}
        plan = self.engine.plan(items, baselines)
        templates = self.engine.templates(plan.cands, detector=self.instance)
        outcome = state.commit(plan, start, end, templates)
        if outcome.stale:
            raise StaleCursor(f"writer {writer_id}: the shared cursor is not at seq {first.seq}; reloading")
        with self._lock:
            self.records += plan.records
            for ci in outcome.suppressed:
                rid = plan.cands[ci].rule.id
                self.suppressed[rid] = self.suppressed.get(rid, 0) + 1
        if outcome.emitted:
            self._flush_pending()

    # -- alerts -----------------------------------------------------------------------------------

    def _flush_pending(self, *, recovering: bool = False) -> None:
        pending = self.state.pending()
        if not pending:
            return
        alerts = [finalize(v, tpl) for v, tpl in pending]
        if recovering:
            present = self._alert_ids_in_log({a["alert_id"] for a in alerts})
            if present:
                log.info("detector: %d pending alerts were already in the log", len(present))
            alerts = [a for a in alerts if a["alert_id"] not in present]
        self._emit(alerts)
        if self.webhook is not None:
            self.webhook.post(alerts)
        self.state.done(len(pending))
        with self._lock:
            for a in alerts:
                rid = a["rule"]["id"]
                self.alerts[rid] = self.alerts.get(rid, 0) + 1
                self.emitted_ids.append(a["alert_id"])
            del self.emitted_ids[:-1000]

    def _alert_ids_in_log(self, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` the log already holds as alert entries (a scan of alert entries only)."""
        found: set[str] = set()
        reader = LogReader(self.log_dir, limit="all")
        for wid in reader.writer_ids():
            cur = Cursor(wid)
            while True:
                try:
                    batch = reader.read(cur, 5000)
                except ChainBreak:
                    break
                if not batch:
                    break
                for e in batch:
                    if e.record_type == "alert":
                        aid = e.record().get("alert_id")
                        if aid in wanted:
                            found.add(aid)
                cur = cur.after(batch[-1])
        return found

    # -- metrics ----------------------------------------------------------------------------------

    def render_metrics(self) -> list[str]:
        """Prometheus lines: alerts appended and suppressed per rule, records evaluated, webhook."""
        with self._lock:
            alerts = dict(self.alerts)
            suppressed = dict(self.suppressed)
            records = self.records
        out = [
            "# HELP vllm_audit_alerts_total Alerts the detector appended to the log, per rule.",
            "# TYPE vllm_audit_alerts_total counter",
        ]
        out += [f'vllm_audit_alerts_total{{rule="{r}"}} {n}' for r, n in sorted(alerts.items())]
        out += [
            "# HELP vllm_audit_alerts_suppressed_total Alerts over a rule's max_alerts_per_minute (not appended).",
            "# TYPE vllm_audit_alerts_suppressed_total counter",
        ]
        out += [f'vllm_audit_alerts_suppressed_total{{rule="{r}"}} {n}' for r, n in sorted(suppressed.items())]
        out += [
            "# HELP vllm_audit_detect_records_total Inference records the detector evaluated.",
            "# TYPE vllm_audit_detect_records_total counter",
            f"vllm_audit_detect_records_total {records}",
        ]
        if self.webhook is not None:
            out += [
                "# HELP vllm_audit_alert_webhook_total Alert webhook POSTs by outcome.",
                "# TYPE vllm_audit_alert_webhook_total counter",
                f'vllm_audit_alert_webhook_total{{outcome="sent"}} {self.webhook.sent}',
                f'vllm_audit_alert_webhook_total{{outcome="failed"}} {self.webhook.failed}',
            ]
        return out


def build_detector(config: Any) -> Detector:
    """The detector a :class:`~vllm_audit.config.Config` with ``[detect] enabled`` asks for."""
    from vllm_audit.detect.alerts import log_emitter
    from vllm_audit.detect.rules import load_rules
    from vllm_audit.detect.state import RedisState

    dc = config.detect
    rules_path: str | None = None
    if dc.rules_file:
        p = Path(dc.rules_file)
        if not p.is_absolute() and config.source:
            p = Path(config.source).resolve().parent / p
        rules_path = str(p)
    rules = load_rules(rules_path)
    instance = dc.instance or default_instance(config.log.dir)
    classify: Classify | None = None
    if dc.classifier:
        from vllm_audit.detect.classifier import load_classifier

        classify = load_classifier().predict
    webhook = None
    if dc.webhook_url and dc.webhook_secret is not None:
        key = dc.webhook_secret.resolve("[detect] webhook_secret").encode()
        webhook = Webhook(dc.webhook_url, key, timeout_s=dc.webhook_timeout_s)

    def state() -> State:
        s = RedisState(dc.redis_url, instance, dc.redis_prefix)
        s.ping()
        return s

    return Detector(
        rules,
        config.log.dir,
        state=state,
        emit=log_emitter(config),
        instance=instance,
        classify=classify,
        webhook=webhook,
        batch_max=dc.batch_max,
    )
