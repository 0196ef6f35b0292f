"""Collector throughput on one core: records/s verified (links, checkpoint signatures and Merkle
roots) and stored (PostgreSQL rows, plus the archive copy when --archive).

Two figures, one run:

* ``process``: batches of messages taken straight from a real log (written through the real Chain
  with embedded checkpoints) through ``Collector.process`` — verification, archive, COPY into
  PostgreSQL, chain-state update, commit. The NATS source is replaced by a list (what is measured
  is the collector, not the broker).
* ``nats``: the same entries published to a private nats-server (JetStream, file storage) and
  consumed through the durable pull consumer (fetch, ack), end to end.

Usage: .venv/bin/python bench/collect/run.py [--records 50000] [--archive]
(PostgreSQL at 127.0.0.1:5432 user postgres; nats-server on PATH or /usr/sbin.)
The collector runs pinned to one CPU (os.sched_setaffinity); PostgreSQL and nats-server run on
the others.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.collect.conftest import PG_DSN, NatsServer, collect_toml, publish
from tests.sinks.conftest import inference

from vllm_audit.collect.collector import Collector
from vllm_audit.collect.source import Message
from vllm_audit.config import load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader


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
    ap.add_argument("--skip-nats", action="store_true")
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
        try:
            c.open()
            os.sched_setaffinity(0, {cpus[0]})
            t0 = time.perf_counter()
            c0 = time.process_time()
            while c.stats.stored_entries < len(lines):
                c.step(1.0)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
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
            f"(archive {'on' if a.archive else 'off'})"
        )


if __name__ == "__main__":
    main()
