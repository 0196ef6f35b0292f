"""Collector throughput on one core: records/s verified (links, checkpoint signatures and Merkle
roots) and stored (PostgreSQL rows, plus the archive copy when --archive).

Two figures, one run:

* ``process``: batches of messages taken straight from a real log (written through the real Chain
  with embedded checkpoints) through ``Collector.process`` — verification, archive, COPY into
  PostgreSQL, chain-state update, commit. The NATS source is replaced by a list (what is measured
  is the collector, not the broker).
* ``nats``: the same entries published to a private nats-server (JetStream, file storage) and
  consumed through the durable pull consumer (fetch, ack), end to end.

Printed beside each rate: CPU per record of the collector (this process), of its PostgreSQL
backend (/proc/<pid>/stat) and of nats-server, and the WAL PostgreSQL wrote per record. Then
`verify` (the offline verifier's library call) over the same log, CPU per entry.

Usage: .venv/bin/python bench/collect/run.py [--records 50000] [--archive] [--profile FILE]
(PostgreSQL at 127.0.0.1:5432 user postgres; nats-server on PATH or /usr/sbin.)
The collector runs pinned to one CPU (os.sched_setaffinity); PostgreSQL and nats-server run on
the others.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.collect.conftest import PG_DSN, NatsServer, collect_toml, publish
from tests.sinks.conftest import inference

from vllm_audit._gc import tune_gc_for_serving
from vllm_audit.collect.collector import Collector
from vllm_audit.collect.source import Message
from vllm_audit.config import load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import LogReader
from vllm_audit.integrity.verify import verify_log


class ListSource:
    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs

    def open(self) -> None: ...

    def fetch(self, n: int, timeout: float) -> list[Message]:
        out, self.msgs = self.msgs[:n], self.msgs[n:]
        return out

    def ack(self, m: object) -> None: ...

    def retry(self, m: object, d: float) -> None: ...

    def close(self) -> None: ...


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process (the postmaster's children: backends, WAL writer, checkpointer...)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def all_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += proc_cpu(p)
        except OSError:
            continue
    return total


def drop(prefix: str) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for t in ("records", "cursors", "viewers", "db_tenants", "collect_chains", "collect_alerts"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{t}")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_viewer()")
        conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_act_as(TEXT, TEXT, TEXT)")
        conn.execute(f"DROP ROLE IF EXISTS {prefix}_reader")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--archive", action="store_true")
    ap.add_argument("--default-gc", action="store_true", help="leave the collector settings as CPython's defaults")
    ap.add_argument("--skip-nats", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="write cProfile stats of the collector loop to FILE.<mode>")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    write_keypair(tmp / "k", "bench/collect")
    chain = Chain(tmp / "log", IntegrityConfig(signing_key=str(tmp / "k.key"), embed_checkpoints=True))
    for start in range(0, a.records, 500):
        chain.append([*chain.pending_events(), *(inference(i) for i in range(start, min(a.records, start + 500)))])
        chain.sync()
        chain.after_commit()
    wid = chain.writer_id
    chain.close()
    lines = [(e.seq, e.line) for e in LogReader(tmp / "log", limit="all").entries(wid)]
    avg = sum(len(ln) for _, ln in lines) / len(lines)
    print(f"log: {len(lines)} entries ({a.records} records), {avg:.0f} bytes/entry on average")
    cpus = sorted(os.sched_getaffinity(0))
    results = {}
    for mode in ("process",) + (() if a.skip_nats else ("nats",)):
        prefix = f"vab_{secrets.token_hex(3)}"
        server = None
        if mode == "nats":
            (tmp / "nats").mkdir(exist_ok=True)
            server = NatsServer(tmp / "nats")
            server.start()
            t0 = time.perf_counter()
            publish(server.url, "VAB", "vab", [(wid, s, ln) for s, ln in lines])
            print(f"published {len(lines)} to JetStream in {time.perf_counter() - t0:.1f}s")
        cfg = tmp / f"{mode}.toml"
        cfg.write_text(
            collect_toml(
                prefix,
                [server.url if server else "nats://127.0.0.1:1"],
                stream="VAB",
                subject_prefix="vab",
                keys=[tmp / "k.pub"],
                log_dir=tmp / f"{mode}-own",
                archive=tmp / f"archive-{mode}" if a.archive else None,
            )
        )
        config = load_config(cfg)
        src = ListSource([Message(wid, s, ln) for s, ln in lines]) if mode == "process" else None
        c = Collector(config, src)
        if not a.default_gc:
            # As `vllm-audit collect` does once its collector is built (this also keeps the
            # collector from walking the bench's own input, every entry held in `lines`).
            tune_gc_for_serving()
        try:
            c.open()
            os.sched_setaffinity(0, {cpus[0]})
            prof = cProfile.Profile() if a.profile else None
            backend = c.store.connect().info.backend_pid
            pg_all = postgres_pids()
            b0, a0 = proc_cpu(backend), all_cpu(pg_all)
            wal0 = wal_lsn(c)
            n0 = proc_cpu(server.proc.pid) if server is not None and server.proc is not None else 0.0
            t0 = time.perf_counter()
            c0 = time.process_time()
            if prof is not None:
                prof.enable()
            while c.stats.stored_entries < len(lines):
                c.step(1.0)
            if prof is not None:
                prof.disable()
                prof.dump_stats(f"{a.profile}.{mode}")
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            pg_backend = proc_cpu(backend) - b0
            pg_total = all_cpu(pg_all) - a0
            wal = wal_bytes(c, wal0)
            nats_cpu = proc_cpu(server.proc.pid) - n0 if server is not None and server.proc is not None else 0.0
        finally:
            os.sched_setaffinity(0, set(cpus))
            c.close()
            if server is not None:
                server.stop()
            drop(prefix)
        rate = a.records / wall
        results[mode] = rate
        print(
            f"{mode:>8}: {a.records} records ({len(lines)} entries) verified and stored in {wall:.2f}s: "
            f"{rate:,.0f} records/s wall, {a.records / cpu:,.0f} records per CPU-second "
            f"(archive {'on' if a.archive else 'off'})\n"
            f"{'':>10}CPU per record: collector {cpu / a.records * 1e6:.1f} us, PostgreSQL backend "
            f"{pg_backend / a.records * 1e6:.1f} us (all PostgreSQL processes {pg_total / a.records * 1e6:.1f} us, "
            f"including other clients'), nats-server {nats_cpu / a.records * 1e6:.1f} us; "
            f"WAL {wal / a.records:,.0f} bytes per record"
        )
    # One process (workers=1), so the figure is one core's.
    r0, t0 = time.process_time(), time.perf_counter()
    rep = verify_log(tmp / "log", load_public_keys([tmp / "k.pub"]), workers=1)
    cpu = time.process_time() - r0
    wall = time.perf_counter() - t0
    assert rep.intact, rep.problems
    print(
        f"  verify: {len(lines)} entries in {wall:.2f}s wall, {cpu:.2f} CPU-s (one process): "
        f"{len(lines) / cpu:,.0f} entries per CPU-second"
    )
    shutil.rmtree(tmp, ignore_errors=True)


def wal_lsn(c: Collector) -> str:
    return str(c.store.connect().execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]


def wal_bytes(c: Collector, since: str) -> int:
    """WAL PostgreSQL wrote since ``since`` (every client's: an upper bound on a shared server)."""
    row = c.store.connect().execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (since,)).fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    main()
