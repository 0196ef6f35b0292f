"""What the console reads from the log itself: per-writer integrity, alerts and acknowledgements.

* Integrity: each writer's last signed checkpoint (signature checked with the trusted keys), its
  size and age, pruned ranges (``pruned.jsonl``), legal holds (when the archive area is
  installed) and the last ``verify`` run started from the console.
* Alerts are log entries with ``record_type: "alert"`` (the detection area writes them); an
  acknowledgement is an ``alert_acknowledged`` event the console appends. :class:`AlertIndex`
  follows every writer with the one :class:`~vllm_audit.integrity.reader.LogReader` (link-checked
  entries) and keeps only those two kinds in memory, so a page view reads just what is new.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.access.store import Viewer
from vllm_audit.config import Config
from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, Checkpoint, open_checkpoint, parse_note_line
from vllm_audit.integrity.keys import VerifierKey, load_public_keys, load_signing_key
from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader, read_pruned

ACK_EVENT = "alert_acknowledged"
VERIFY_FILE = "console-verify.json"


def trusted_keys(config: Config) -> list[VerifierKey]:
    """The public key(s) checkpoints are checked against: the configured signing key's ``.pub``
    beside it (or the key itself), else the auto-generated ``<log dir>/keys/signing.pub``."""
    sk = config.integrity.signing_key
    try:
        if sk:
            pub = Path(sk[:-4] + ".pub" if sk.endswith(".key") else sk + ".pub")
            if pub.is_file():
                return load_public_keys([pub])
            return [load_signing_key(sk).verifier]
        auto = Path(config.log.dir) / "keys" / "signing.pub"
        if auto.is_file():
            return load_public_keys([auto])
    except Exception:  # unreadable key files: checkpoints then show as unverified
        return []
    return []


@dataclasses.dataclass(frozen=True, slots=True)
class WriterState:
    writer_id: str
    signed_size: int
    checkpoint: Checkpoint | None
    note: str
    signature_ok: bool
    signature_error: str
    age_s: float | None
    pruned: list[dict[str, Any]]


def last_note(writer_dir: Path) -> str:
    """The writer's last complete checkpoint note ('' when none)."""
    try:
        with open(writer_dir / CHECKPOINTS_FILE, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read()
    except FileNotFoundError:
        return ""
    for line in reversed(data.split(b"\n")[:-1]):
        try:
            return parse_note_line(line)
        except (ValueError, orjson.JSONDecodeError):
            continue
    return ""


def writer_states(log_dir: Path, keys: list[VerifierKey], *, now: dt.datetime | None = None) -> list[WriterState]:
    reader = LogReader(log_dir)
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for wid in reader.writer_ids():
        d = reader.writer_dir(wid)
        note = last_note(d)
        cp: Checkpoint | None = None
        ok, err = False, ""
        if note:
            try:
                cp = open_checkpoint(note, keys)
                ok = True
            except Exception as exc:
                err = str(exc)
                try:
                    from vllm_audit.integrity.checkpoint import parse_body, split_note

                    cp = parse_body(split_note(note)[0])
                except Exception:
                    cp = None
        age = None
        if cp is not None and cp.timestamp_ms is not None:
            age = max(0.0, now.timestamp() - cp.timestamp_ms / 1000)
        try:
            pruned = [r.to_json() for r in read_pruned(d)]
        except Exception:
            pruned = []
        out.append(WriterState(wid, cp.size if cp else 0, cp, note, ok, err, age, pruned))
    return out


def holds(config: Config) -> list[dict[str, Any]] | None:
    """Active legal holds (None when the archive area is not installed)."""
    try:
        from vllm_audit.archive.holds import HoldStore, holds_path
    except Exception:
        return None
    try:
        return [h.to_json() for h in HoldStore(holds_path(config)).active()]
    except Exception:
        return []


def read_verify(state: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads((state / VERIFY_FILE).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


def run_verify_summary(config: Config, state: Path, keys: list[VerifierKey], by: str = "") -> dict[str, Any]:
    """Run the offline verifier over the log; keep a summary as the "last verify run"."""
    from vllm_audit.integrity.verify import verify_log

    started = dt.datetime.now(dt.UTC)
    report = verify_log(config.log.dir, keys, list(config.integrity.anchors))
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "intact": bool(report.intact),
        "writers": len(report.writers),
        "entries": int(report.entries),
        "problems": [str(p) for p in report.problems[:20]],
        "problem_count": len(report.problems),
        "by": by,
    }
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / (VERIFY_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(summary))
    tmp.replace(state / VERIFY_FILE)
    return summary


@dataclasses.dataclass(slots=True)
class Alert:
    alert_id: str
    entry: dict[str, Any]
    writer_id: str
    seq: int
    acked_by: str | None = None
    acked_at: str | None = None

    @property
    def org_id(self) -> str | None:
        v = self.entry.get("org_id")
        return v if isinstance(v, str) else None


def visible(alert: Alert, viewer: Viewer) -> bool:
    """Platform admins see every alert, tenant auditors their org's; users see none."""
    if viewer.role == "platform_admin":
        return True
    return viewer.role == "org_auditor" and alert.org_id == viewer.org_id


class AlertIndex:
    """Alerts and their acknowledgements, read incrementally from every writer of the log."""

    def __init__(self, log_dir: Path) -> None:
        self.reader = LogReader(log_dir, limit="all")
        self.cursors: dict[str, Cursor] = {}
        self.alerts: dict[str, Alert] = {}
        self._acks: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def refresh(self, max_entries: int = 200_000) -> None:
        with self._lock:
            budget = max_entries
            for wid in self.reader.writer_ids():
                cur = self.cursors.get(wid) or Cursor(wid, 0, codec.ZERO_HASH)
                while budget > 0:
                    try:
                        got = self.reader.read(cur, min(4096, budget))
                    except ChainBreak:
                        break  # the verifier reports it; the console shows what chains
                    if not got:
                        break
                    for e in got:
                        self._take(e)
                    budget -= len(got)
                    cur = cur.after(got[-1])
                self.cursors[wid] = cur

    def _take(self, e: codec.Entry) -> None:
        if e.record_type == "alert":
            rec = e.record()
            aid = rec.get("alert_id")
            if isinstance(aid, str) and aid not in self.alerts:
                a = Alert(aid, rec, e.writer_id, e.seq)
                if aid in self._acks:
                    a.acked_by, a.acked_at = self._acks[aid]
                self.alerts[aid] = a
        elif e.record_type == "event" and ACK_EVENT.encode() in e.line:
            rec = e.record()
            aid = rec.get("alert_id")
            if rec.get("event") == ACK_EVENT and isinstance(aid, str) and rec.get("outcome") == "ok":
                actor = rec.get("actor")
                actor = actor if isinstance(actor, dict) else {}
                self.note_ack(aid, str(actor.get("user_id", "")), str(rec.get("timestamp", "")))

    def note_ack(self, alert_id: str, by: str, at: str) -> None:
        self._acks.setdefault(alert_id, (by, at))
        a = self.alerts.get(alert_id)
        if a is not None and a.acked_by is None:
            a.acked_by, a.acked_at = by, at

    def ack(self, alert_id: str, by: str, at: str) -> None:
        """Note an acknowledgement whose event was just made durable (the log read confirms it later)."""
        with self._lock:
            self.note_ack(alert_id, by, at)

    def for_viewer(self, viewer: Viewer) -> list[Alert]:
        with self._lock:
            items = [a for a in self.alerts.values() if visible(a, viewer)]
        return sorted(items, key=lambda a: (str(a.entry.get("timestamp", "")), a.alert_id), reverse=True)
