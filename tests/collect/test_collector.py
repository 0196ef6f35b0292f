"""The collector against a real nats-server (JetStream) and a real PostgreSQL.

Logs are written through the real Chain (``embed_checkpoints`` on) and shipped by the real
``nats`` sink; failures (a fork, a gap) are hand-published with the sink's headers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.collect.conftest import PG_DSN, NatsServer, collect_toml, pg_rows, publish, wait_until
from tests.sinks.conftest import inference
from vllm_audit.collect.collector import Collector, report
from vllm_audit.collect.source import Message
from vllm_audit.config import load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import LogReader
from vllm_audit.integrity.verify import verify_log
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.registry import SinkEnv, build_sink, parse_sinks

logging.getLogger("vllm_audit").setLevel(logging.CRITICAL)
STREAM = "VAC"
SUBJ = "vac"


def write_log(log_dir: Path, key: Path, n: int) -> str:
    """``n`` inference records through the real Chain: checkpoints embedded, several segments."""
    cfg = IntegrityConfig(
        signing_key=str(key), embed_checkpoints=True, checkpoint_every_records=40, segment_max_bytes=64 * 1024
    )
    chain = Chain(log_dir, cfg)
    for start in range(0, n, 25):
        chain.append([*chain.pending_events(), *(inference(i) for i in range(start, min(n, start + 25)))])
        chain.sync()
        chain.after_commit()
    wid = chain.writer_id
    chain.close()
    return wid


def ship(log_dir: Path, server: NatsServer) -> None:
    """Ship the whole log to JetStream with the real nats sink, through the real runner."""
    table = {"n": {"type": "nats", "servers": [server.url], "stream": STREAM, "subject_prefix": SUBJ}}
    env = SinkEnv(log_dir=log_dir, state_dir=log_dir / "ship", base_dir=log_dir.parent)
    sinks = [build_sink(spec, env) for spec in parse_sinks(table, "[sinks").values()]
    runner = Runner(log_dir, log_dir / "ship", sinks, ShipConfig())
    assert runner.run_until_caught_up(60)


def entries(log_dir: Path, wid: str) -> list[tuple[int, bytes]]:
    return [(e.seq, e.line) for e in LogReader(log_dir, limit="all").entries(wid)]


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    write_keypair(tmp_path / "k", "test/collect")
    return tmp_path / "k.key", tmp_path / "k.pub"


def make_collector(tmp_path: Path, pg_prefix: str, server: NatsServer, pub: Path, name: str, **kw: Any) -> Collector:
    extra = "".join(f"{k} = {v}\n" for k, v in kw.pop("collect", {}).items())
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        collect_toml(
            pg_prefix,
            [server.url],
            stream=STREAM,
            subject_prefix=SUBJ,
            keys=[pub],
            log_dir=tmp_path / f"{name}-log",
            archive=kw.pop("archive", tmp_path / "archive"),
            durable=kw.pop("durable", "collect"),
            extra=extra,
        )
    )
    return Collector(load_config(cfg))


def run_until(collectors: list[Collector], cond: Any, what: str, timeout: float = 60.0) -> None:
    for c in collectors:
        c.open()
    wait_until(lambda: (sum(c.step(0.2) for c in collectors), cond())[1], what, timeout, interval=0)


def test_records_arrive_once_verified_and_the_archive_verifies(
    tmp_path: Path, nats_server: NatsServer, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Two writers shipped through JetStream: every record stored once, chains verified through
    their signed checkpoints, the archive copy verifies with `verify`, no alerts."""
    key, pub = keypair
    logs = [tmp_path / "r1", tmp_path / "r2"]
    wids = [write_log(d, key, n) for d, n in zip(logs, (230, 170), strict=True)]
    for d in logs:
        ship(d, nats_server)
    totals = {w: len(entries(d, w)) for d, w in zip(logs, wids, strict=True)}
    c = make_collector(tmp_path, pg_prefix, nats_server, pub, "c1")
    try:
        run_until(
            [c],
            lambda: all(
                c.store.states().get(w, (None,))[0] and c.store.states()[w][0].next_seq == n for w, n in totals.items()
            ),
            "both chains collected",
        )
        rows = pg_rows(pg_prefix, "SELECT writer_id, seq, request_id FROM {p}_records")
        assert 400 == len(rows) == len({(w, s) for w, s, _ in rows})
        assert {f"req-{i:07d}" for i in range(230)} == {r for w, _, r in rows if w == wids[0]}
        states = c.store.states()
        for w in wids:
            st, hole = states[w]
            assert st.stopped and not st.broken and hole is None
            assert st.signed_size > 0.9 * totals[w]  # the last embedded checkpoint was verified
        assert [] == c.store.alert_rows()
        rep = verify_log(tmp_path / "archive", load_public_keys([pub]))
        assert rep.intact, rep.problems
        assert {w.writer_id: w.entries for w in rep.writers} == totals
        assert all(w.sealed_segments >= 1 and w.checkpoints >= 3 for w in rep.writers)
    finally:
        c.close()


def test_two_collectors_at_once_store_each_row_once(
    tmp_path: Path, nats_server: NatsServer, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Two collectors sharing a consumer (the work split between them, out of order) and a third
    on its own consumer (a hot standby seeing everything), at once: no duplicate rows."""
    key, pub = keypair
    wid = write_log(tmp_path / "r1", key, 600)
    ship(tmp_path / "r1", nats_server)
    total = len(entries(tmp_path / "r1", wid))
    cs = [
        make_collector(
            tmp_path, pg_prefix, nats_server, pub, "a", collect={"batch_max": 37, "redeliver_delay_s": 0.05}
        ),
        make_collector(
            tmp_path, pg_prefix, nats_server, pub, "b", collect={"batch_max": 53, "redeliver_delay_s": 0.05}
        ),
        make_collector(tmp_path, pg_prefix, nats_server, pub, "c", durable="standby", collect={"batch_max": 101}),
    ]
    for c in cs:
        c.open()
    done = threading.Event()
    errors: list[BaseException] = []

    def loop(c: Collector) -> None:
        try:
            while not done.is_set():
                c.step(0.2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(c,)) for c in cs[:2]]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: (
                cs[0].store.states().get(wid, (None,))[0] is not None and cs[0].store.states()[wid][0].next_seq == total
            ),
            "the chain collected",
            90,
        )
        # The standby (own consumer) sees every entry again, while the other two still run.
        threads.append(threading.Thread(target=loop, args=(cs[2],)))
        threads[-1].start()
        wait_until(lambda: cs[2].stats.duplicates >= total, "the standby saw all", 60)
    finally:
        done.set()
        for t in threads:
            t.join()
        for c in cs:
            c.close()
    assert not errors, errors
    rows = pg_rows(pg_prefix, "SELECT count(*), count(DISTINCT seq) FROM {p}_records")
    assert [(600, 600)] == rows
    assert total == cs[0].stats.stored_entries + cs[1].stats.stored_entries  # each entry stored by one of them
    assert 0 == cs[2].stats.stored_entries
    print(
        f"two collectors: stored a={cs[0].stats.stored_entries} b={cs[1].stats.stored_entries} "
        f"standby={cs[2].stats.stored_entries}; duplicates seen {sum(c.stats.duplicates for c in cs)}; "
        f"deferred {sum(c.stats.deferred for c in cs)}; rows {rows[0][0]}"
    )
    assert [] == cs[0].store.alert_rows()
    assert verify_log(tmp_path / "archive", load_public_keys([pub])).intact


def _alerts_in_own_log(log_dir: Path) -> list[dict[str, Any]]:
    r = LogReader(log_dir, limit="all")
    out = []
    for w in r.writer_ids():
        out += [orjson.loads(e.line) for e in r.entries(w) if e.record_type == "alert"]
    return out


def test_fork_gap_and_bad_signature_raise_alerts(
    tmp_path: Path, nats_server: NatsServer, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """An altered entry (its successor's prev no longer matches: a fork), a hole that never
    fills (a gap, reported by range after gap_timeout_s) and checkpoints signed by an unknown key
    each raise an alert row and an alert record in the collector's own chain."""
    key, pub = keypair
    wid = write_log(tmp_path / "r1", key, 120)
    lines = entries(tmp_path / "r1", wid)
    forked = [(wid, s, ln.replace(b"invoice", b"INVOICE") if s == 10 else ln) for s, ln in lines[:20]]
    publish(nats_server.url, STREAM, SUBJ, forked)
    c = make_collector(tmp_path, pg_prefix, nats_server, pub, "c1")
    try:
        run_until([c], lambda: any(a.kind == "fork" for a in c.store.alert_rows()), "a fork alert")
        st, _ = c.store.states()[wid]
        assert st.next_seq == 11 and st.broken.startswith("fork at seq 11")
        assert 10 == pg_rows(pg_prefix, "SELECT count(*) FROM {p}_records WHERE writer_id = %s", (wid,))[0][0] - 0
    finally:
        c.close()
    # A gap: a second writer's entries 0..29 and 40.. (30..39 never shipped).
    wid2 = write_log(tmp_path / "r2", key, 120)
    lines2 = entries(tmp_path / "r2", wid2)
    publish(nats_server.url, STREAM, SUBJ, [(wid2, s, ln) for s, ln in lines2 if not 30 <= s < 40])
    c = make_collector(
        tmp_path, pg_prefix, nats_server, pub, "c1", collect={"gap_timeout_s": 1, "redeliver_delay_s": 0.1}
    )
    try:
        run_until(
            [c],
            lambda: (
                c.store.states().get(wid2, (None,))[0] is not None and c.store.states()[wid2][0].next_seq == len(lines2)
            ),
            "the chain past the gap",
        )
        [gap] = [a for a in c.store.alert_rows() if a.kind == "gap"]
        assert (wid2, 30, 39) == (gap.writer_id, gap.first_seq, gap.last_seq)
        assert [[30, 39]] == [list(g) for r in report(c.store) if r["writer_id"] == wid2 for g in r["gaps"]]
    finally:
        c.close()
    # Bad signatures: a collector that trusts another key.
    write_keypair(tmp_path / "other", "test/other")
    wid3 = write_log(tmp_path / "r3", key, 60)
    publish(nats_server.url, STREAM, SUBJ, [(wid3, s, ln) for s, ln in entries(tmp_path / "r3", wid3)])
    c = make_collector(tmp_path, pg_prefix, nats_server, tmp_path / "other.pub", "c2", durable="other")
    try:
        run_until(
            [c],
            lambda: any(a.kind == "bad_signature" and a.writer_id == wid3 for a in c.store.alert_rows()),
            "a bad_signature alert",
        )
    finally:
        c.close()
    kinds = {(a["rule"], a["target_writer_id"]) for a in _alerts_in_own_log(tmp_path / "c1-log")}
    assert {("collect.fork", wid), ("collect.gap", wid2)} <= kinds
    assert ("collect.bad_signature", wid3) in {
        (a["rule"], a["target_writer_id"]) for a in _alerts_in_own_log(tmp_path / "c2-log")
    }
    _ = PG_DSN


class ListSource:
    """Hands out the batches the test gives it; records what the collector acknowledged and retried."""

    def __init__(self) -> None:
        self.batches: list[list[Message]] = []
        self.acked: list[int] = []
        self.retried: list[int] = []

    def open(self) -> None: ...

    def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        return self.batches.pop(0) if self.batches else []

    def ack(self, messages: Sequence[Message]) -> None:
        self.acked += [m.seq for m in messages]

    def retry(self, messages: Sequence[Message], delay: float) -> None:
        self.retried += [m.seq for m in messages]

    def close(self) -> None: ...


def test_a_gap_ends_at_the_lowest_entry_seen_ahead_of_it(
    tmp_path: Path, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Entries 40..49 arrive ahead of a hole at 30; when the gap timeout passes, the batch at hand
    holds only 70..79 (40..69 are on their way back after their delay). The gap is 30..39 — the
    entries that never arrived — and 40..69, when they come back, are stored, not dropped as old."""
    key, pub = keypair
    wid = write_log(tmp_path / "r1", key, 120)
    lines = dict(entries(tmp_path / "r1", wid))
    src = ListSource()
    now = [1000.0]
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        collect_toml(
            pg_prefix,
            ["nats://127.0.0.1:1"],
            stream=STREAM,
            subject_prefix=SUBJ,
            keys=[pub],
            log_dir=tmp_path / "own",
            extra="gap_timeout_s = 5\n",
        )
    )
    c = Collector(load_config(cfg), src, clock=lambda: now[0])

    def batch(seqs: range | list[int]) -> list[Message]:
        return [Message(wid, s, lines[s]) for s in seqs]

    try:
        c.open()
        src.batches = [batch([*range(30), *range(40, 50)])]
        c.step()
        now[0] += 6  # past gap_timeout_s
        src.batches = [batch(range(70, 80)), batch(range(40, 70)), batch(range(70, len(lines)))]
        for _ in range(3):
            c.step()
        [gap] = [a for a in c.store.alert_rows() if a.kind == "gap"]
        st, hole = c.store.states()[wid]
        stored_seqs = {s for (s,) in pg_rows(pg_prefix, "SELECT seq FROM {p}_records")}
        print(f"gap alert {gap.first_seq}..{gap.last_seq}; stored through {st.next_seq - 1}; rows {len(stored_seqs)}")
        assert (gap.first_seq, gap.last_seq) == (30, 39)
        assert st.next_seq == len(lines) and hole is None and not st.broken
        inference = {s for s, ln in lines.items() if b'"record_type":"inference"' in ln}
        assert stored_seqs == inference - set(range(30, 40))
        assert set(range(40, 50)) | set(range(70, 80)) <= set(src.retried)
        assert set(src.acked) == set(lines) - set(range(30, 40))  # nothing acknowledged that is not stored
    finally:
        c.close()


def test_a_new_chain_under_a_used_writer_id_raises_a_fork_at_entry_0(
    tmp_path: Path, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """A replica whose (emptied) log directory got an old writer's directory back starts a new
    chain from seq 0 under that id. Its entries below what the collector holds look like ones it
    holds already; entry 0's leaf differs from the one stored, and that raises a fork alert."""
    key, pub = keypair
    wid = write_log(tmp_path / "r1", key, 60)
    (tmp_path / "r2" / "writers" / wid).mkdir(parents=True)
    assert write_log(tmp_path / "r2", key, 30) == wid  # the Chain adopts the existing directory
    first, again = entries(tmp_path / "r1", wid), entries(tmp_path / "r2", wid)
    assert first[0][1] != again[0][1]
    src = ListSource()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        collect_toml(
            pg_prefix, ["nats://127.0.0.1:1"], stream=STREAM, subject_prefix=SUBJ, keys=[pub], log_dir=tmp_path / "own"
        )
    )
    c = Collector(load_config(cfg), src)
    try:
        c.open()
        src.batches = [[Message(wid, s, ln) for s, ln in first], [Message(wid, s, ln) for s, ln in again[:10]]]
        c.step()
        assert [] == c.store.alert_rows()
        c.step()
        alerts = [(a.kind, a.first_seq) for a in c.store.alert_rows()]
        print(f"reused writer id: alerts {alerts}")
        assert ("fork", 0) in alerts
    finally:
        c.close()


def test_a_copy_of_an_entry_offered_again_is_not_acknowledged(
    tmp_path: Path, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Two deliveries of entry 12 in one batch (JetStream redelivered it while the first waited in
    the buffer), both ahead of a hole at 10: both are offered again. Acknowledging the copy would
    acknowledge the message, and the entry would never come back (a gap that was not one)."""
    key, pub = keypair
    wid = write_log(tmp_path / "r1", key, 30)
    lines = dict(entries(tmp_path / "r1", wid))
    src = ListSource()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        collect_toml(
            pg_prefix, ["nats://127.0.0.1:1"], stream=STREAM, subject_prefix=SUBJ, keys=[pub], log_dir=tmp_path / "own"
        )
    )
    c = Collector(load_config(cfg), src)
    try:
        c.open()
        src.batches = [[Message(wid, s, lines[s]) for s in [*range(10), 12, 12]]]
        c.step()
        print(f"acknowledged {sorted(src.acked)}, offered again {src.retried}")
        assert 12 not in src.acked and src.retried == [12, 12]
        src.batches = [[Message(wid, s, lines[s]) for s in range(10, len(lines))]]
        c.step()
        assert c.store.states()[wid][0].next_seq == len(lines) and [] == c.store.alert_rows()
    finally:
        c.close()
