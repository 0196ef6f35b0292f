"""`vllm-audit collect`: every replica's entries into one verified, central audit trail.

Each replica writes its own chains (invariant 5) and ships every entry — records, events and
the signed checkpoints its chain carries as ``checkpoint`` events — through NATS JetStream or
Kafka. The collector, for each fetched batch:

1. groups the messages by writer and, in one PostgreSQL transaction, locks those writers' chain
   rows (:mod:`vllm_audit.collect.store`);
2. per writer: entries it holds already (a redelivery, a sink's replay, another collector's
   work) are acknowledged and counted as duplicates; the consecutive run from the next expected
   seq is verified (:func:`vllm_audit.collect.verifier.advance`: links, signed checkpoints
   against the compact range, segment seals); entries after a hole wait (they are offered again
   after ``redeliver_delay_s``) until the hole fills or ``gap_timeout_s`` passes — then a ``gap``
   alert names the missing range and the chain goes on after it (links still checked, Merkle
   roots no longer checkable);
3. writes the verified lines into the archive (when configured), inserts the inference rows,
   saves the chain rows and the alerts, commits — and only then acknowledges the messages;
4. appends each new alert as an ``alert`` record to its own chain (``[log] dir``).

A fork (an entry whose ``prev`` is not the leaf of the entry received before), a malformed entry
or a signed root that does not match mark the writer broken: nothing more of it is stored, and
the alert says where. A checkpoint whose signature does not verify raises an alert and the
chain goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from vllm_audit._fs import replace_file
from vllm_audit.access.store import row_from_entry
from vllm_audit.collect.archive import Archive
from vllm_audit.collect.source import KafkaSource, Message, NatsSource, Source
from vllm_audit.collect.store import Alert, CentralStore, Hole
from vllm_audit.collect.verifier import advance
from vllm_audit.integrity import codec
from vllm_audit.integrity.keys import VerifierKey, load_public_keys

if TYPE_CHECKING:
    from vllm_audit.config import Config
    from vllm_audit.integrity.chain import Chain

log = logging.getLogger("vllm_audit.collect")


@dataclasses.dataclass(slots=True)
class Stats:
    """Counts since start (``vllm-audit collect --status`` shows them with the chain rows)."""

    received: int = 0
    stored_entries: int = 0
    rows_inserted: int = 0
    duplicates: int = 0
    deferred: int = 0
    dropped: int = 0
    alerts: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str = ""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def build_source(config: Config) -> Source:
    cc = config.collect
    if cc.source == "kafka":
        return KafkaSource(cc.kafka)
    return NatsSource(cc.nats)


class Collector:
    """Consumes one source into the central store (single-threaded; run several for availability)."""

    def __init__(
        self,
        config: Config,
        source: Source | None = None,
        *,
        keys: list[VerifierKey] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        cc = config.collect
        self.cc = cc
        base = Path(config.source).resolve().parent if config.source else Path.cwd()
        self.keys = keys if keys is not None else load_public_keys([_rel(base, k) for k in cc.public_keys])
        self.source = source or build_source(config)
        self.store = CentralStore(config.access.store, timeout_s=cc.db_timeout_s)
        self.archive = Archive(_rel(base, cc.archive_dir)) if cc.archive_dir else None
        self.clock = clock
        self.stats = Stats()
        self._chain: Chain | None = None
        self._ready = False

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if not self._ready:
            self.store.init()
            self._ready = True
        self.source.open()

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            self.store.close()
            if self._chain is not None:
                self._chain.close()
                self._chain = None

    # -- one step -------------------------------------------------------------------------------

    def step(self, timeout: float = 1.0) -> int:
        """Fetch one batch and take it in; returns how many messages were fetched."""
        msgs = self.source.fetch(self.cc.batch_max, timeout)
        if msgs:
            self.process(msgs)
        return len(msgs)

    def process(self, msgs: list[Message]) -> None:
        """Verify and store one batch, then acknowledge it (see the module docstring)."""
        self.stats.received += len(msgs)
        by_writer: dict[str, dict[int, Message]] = {}
        ack: list[Message] = []
        # The same entry twice in one batch (a redelivery while the first delivery was still
        # waiting in the buffer). A copy shares the fate of the first: acknowledging one delivery
        # acknowledges the message, so acknowledging the copy of an entry that is offered again
        # (ahead of a hole) would lose it.
        copies: dict[tuple[str, int], list[Message]] = {}
        for m in msgs:
            w = by_writer.setdefault(m.writer_id, {})
            if m.seq in w:
                copies.setdefault((m.writer_id, m.seq), []).append(m)
                self.stats.duplicates += 1
            else:
                w[m.seq] = m
        later: list[Message] = []
        alerts: list[Alert] = []
        new_alerts: list[Alert] = []
        now = self.clock()
        with self.store.transaction() as tx:
            locked = tx.lock(list(by_writer))
            rows: list[tuple[Any, ...]] = []
            for wid, got in by_writer.items():
                state, hole = locked[wid]
                seqs = sorted(got)
                old = [s for s in seqs if s < state.next_seq]
                ack += [got[s] for s in old]
                self.stats.duplicates += len(old)
                zero = got.get(0)
                if (
                    zero is not None
                    and state.next_seq > 0
                    and state.first_leaf
                    and codec.leaf_hash(zero.line).hex() != state.first_leaf
                ):
                    alerts.append(
                        Alert(
                            wid,
                            "fork",
                            0,
                            0,
                            f"writer {wid} entry 0 received again with different bytes: a new chain under a "
                            "writer id already used (its entries below the ones held are not taken), or an "
                            "altered entry",
                        )
                    )
                prev = got.get(state.next_seq - 1)
                if prev is not None and state.last_leaf and codec.leaf_hash(prev.line).hex() != state.last_leaf:
                    alerts.append(
                        Alert(
                            wid,
                            "fork",
                            prev.seq,
                            prev.seq,
                            f"writer {wid} entry {prev.seq} received again with different bytes (a fork)",
                        )
                    )
                rest = [s for s in seqs if s >= state.next_seq]
                if state.broken:
                    ack += [got[s] for s in rest]
                    self.stats.dropped += len(rest)
                    continue
                since = hole.since if hole is not None else now
                # The lowest entry ever seen ahead of the hole (this batch may hold only later ones:
                # the earlier ones are on their way back after their delay).
                seen = hole.ahead if hole is not None and hole.ahead > state.next_seq else None
                if rest and rest[0] > state.next_seq:
                    if now - since >= self.cc.gap_timeout_s:
                        end = rest[0] if seen is None else min(seen, rest[0])
                        alerts.append(
                            Alert(
                                wid,
                                "gap",
                                state.next_seq,
                                end - 1,
                                f"writer {wid} entries {state.next_seq}..{end - 1} never arrived "
                                f"(waited {now - since:.0f} s); the chain continues after them unverified "
                                "against its Merkle roots",
                            )
                        )
                        state.next_seq, state.last_leaf, state.tree = end, "", None
                        since, seen = now, None  # waiting for entries end.. (if not here) starts now
                run: list[int] = []
                for s in rest:
                    if s != state.next_seq + len(run):
                        break
                    run.append(s)
                ahead = rest[len(run) :]
                if run:
                    out = advance(state, [(s, got[s].line) for s in run], self.keys)
                    good = run[: out.taken]
                    for p in out.warnings:
                        alerts.append(Alert(wid, p.kind, p.seq, p.seq, f"writer {wid}: {p.message}"))
                    if out.problem is not None:
                        p = out.problem
                        state.broken = f"{p.kind} at seq {p.seq}: {p.message}"
                        alerts.append(Alert(wid, p.kind, p.seq, p.seq, f"writer {wid}: {p.message}"))
                        bad = run[out.taken :] + ahead
                        ack += [got[s] for s in bad]
                        self.stats.dropped += len(bad)
                        ahead = []
                    for s in good:
                        line = got[s].line
                        ack.append(got[s])
                        if b'"record_type":"inference"' in line:
                            rec = orjson.loads(line)
                            state.last_time = str(rec.get("timestamp") or state.last_time)
                            rows.append(row_from_entry(rec, line))
                    self.stats.stored_entries += len(good)
                    if self.archive is not None and good:
                        self.archive.write(wid, [(s, got[s].line) for s in good], out.checkpoints, out.sealed)
                if seen is not None and seen <= state.next_seq:
                    seen = None  # the run reached it
                if state.broken:
                    hole = None
                elif ahead or seen is not None:
                    # Waiting for the hole before the lowest entry seen ahead of it; progress
                    # restarts the clock.
                    first = min(x for x in (seen, ahead[0] if ahead else None) if x is not None)
                    hole = Hole(first, now if run else since)
                    later += [got[s] for s in ahead]
                    self.stats.deferred += len(ahead)
                elif run:
                    hole = None
                tx.save(state, hole)
            if self.archive is not None:
                self.archive.sync_dirs()
            self.stats.rows_inserted += tx.insert_rows(rows)
            for a in alerts:
                if tx.add_alert(a):
                    new_alerts.append(a)
        self.stats.batches += 1
        if copies:
            ack += [c for m in ack for c in copies.get((m.writer_id, m.seq), ())]
            later += [c for m in later for c in copies.get((m.writer_id, m.seq), ())]
        self.source.ack(ack)
        if later:
            self.source.retry(later, self.cc.redeliver_delay_s)
        if new_alerts:
            self._raise(new_alerts)

    def _raise(self, alerts: list[Alert]) -> None:
        """Append alerts to the collector's own chain (``[log] dir``) and log them."""
        from vllm_audit.integrity.chain import Chain, now_iso

        self.stats.alerts += len(alerts)
        for a in alerts:
            log.error("collect alert: %s %s..%s: %s", a.kind, a.first_seq, a.last_seq, a.message)
        if self._chain is None:
            self._chain = Chain(self.config.log.dir, self.config.integrity)
        chain = self._chain
        entries = [*chain.pending_events(), *({**a.record(), "timestamp": now_iso()} for a in alerts)]
        chain.append(entries)
        chain.sync()
        chain.after_commit()

    def heartbeat(self) -> None:
        if self._chain is not None:
            self._chain.heartbeat()

    # -- running --------------------------------------------------------------------------------

    def run(self, stop: Callable[[], bool], *, status_path: Path | None = None) -> None:
        """Collect until ``stop()``; reconnect with capped backoff after errors."""
        delay = 0.2
        last_status = 0.0
        while not stop():
            try:
                self.open()
                n = self.step(1.0)
                delay = 0.2
                if not n:
                    self.heartbeat()
            except Exception as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("collect: %s (retrying in %.1fs)", self.stats.last_error, delay)
                try:
                    self.source.close()
                except Exception:
                    pass
                self.store.close()
                end = time.monotonic() + delay
                while time.monotonic() < end and not stop():
                    time.sleep(0.05)
                delay = min(delay * 2, 10.0)
            if status_path is not None and time.monotonic() - last_status >= self.cc.status_interval_s:
                last_status = time.monotonic()
                self.write_status(status_path)

    def write_status(self, path: Path) -> None:
        data = orjson.dumps({**self.stats.to_json(), "pid": os.getpid(), "updated_at": time.time()})
        replace_file(path, data, durable=False)


def _rel(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def report(store: CentralStore) -> list[dict[str, Any]]:
    """Per writer: what the central store holds and, if the writer is gone, what is missing."""
    out = []
    alerts: dict[str, list[Alert]] = {}
    for a in store.alert_rows():
        alerts.setdefault(a.writer_id, []).append(a)
    for wid, (st, hole) in store.states().items():
        gaps = [(a.first_seq, a.last_seq) for a in alerts.get(wid, []) if a.kind == "gap"]
        row: dict[str, Any] = {
            "writer_id": wid,
            "stored_through": st.next_seq - 1,
            "last_time": st.last_time,
            "signed_size": st.signed_size,
            "signed_at": st.signed_at,
            "stopped": st.stopped,
            "broken": st.broken,
            "gaps": gaps,
            "waiting_for": [st.next_seq, hole.ahead - 1] if hole is not None else None,
            # A writer that did not stop cleanly may have written entries nobody shipped: if it is
            # gone (its disk lost), these are the entries missing from the central trail. The range
            # is open-ended ("to_seq": None): how far the writer got is known only to the lost disk
            # (its checkpoints travel in the chain, behind the entries they sign). What bounds it
            # is time: the missing entries were written after ``after_time``, the last one received.
            "missing_if_gone": None
            if st.stopped
            else {"writer_id": wid, "from_seq": st.next_seq, "to_seq": None, "after_time": st.last_time},
            "alerts": [dataclasses.asdict(a) for a in alerts.get(wid, [])],
        }
        out.append(row)
    return out
