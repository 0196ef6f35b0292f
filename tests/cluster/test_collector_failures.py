"""The collector itself partitioned, under load: first from PostgreSQL, then from NATS.

The collector runs inside a network namespace made by the test (root needed) with two veth links:
its NATS traffic goes over the *client* link (to the JetStream server on the host), its
PostgreSQL traffic over the *backbone* link, through a TCP forwarder on the host side of that link
(PostgreSQL itself listens on 127.0.0.1 only). A gateway replica on the host takes calls all the
time and ships through the ``nats`` sink.

* **PostgreSQL cut** (the backbone link down, packets black-holed): the collector still fetches
  from JetStream but cannot store; it must acknowledge nothing of what it fetched (JetStream
  redelivers it after ``ack_wait_s``). The central store gains nothing while the link is down.
* **NATS cut** (the client link down): batches stored just before may have lost their
  acknowledgements; they are redelivered and recognised as held already.

After both heal, every answered call is stored exactly once, the collector's chain row has taken
every entry the replica wrote, the consumer has nothing pending, and no alert was raised.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.cluster.conftest import Netns, TcpForward, stop_collector, stored, stream_pending
from tests.cluster.test_cluster import Replica, load
from tests.collect.conftest import NATS_BINARY, NatsServer, collect_toml, pg_rows, wait_until
from tests.conftest import need_service
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader

STREAM = "VAC_CPART"
SUBJ = "vaccpart"


@dataclass
class Setup:
    root: Path
    nats: NatsServer
    replica: Replica
    collector: subprocess.Popen[bytes]
    status: Path


@pytest.fixture
def setup(tmp_path: Path, netns: Netns, pg_prefix: str) -> Iterator[Setup]:
    need_service(os.access(NATS_BINARY, os.X_OK), f"nats-server binary ({NATS_BINARY})")
    root = tmp_path
    write_keypair(root / "k", "test/collector-partition")
    nats = NatsServer(root, "n1", host="0.0.0.0")
    nats.start()
    forward = TcpForward(netns.bb_host, ("127.0.0.1", 5432))
    gw = root / "gateway.toml"
    gw.write_text(
        f'[integrity]\nsigning_key = "{root / "k.key"}"\nembed_checkpoints = true\ncheckpoint_every_seconds = 0.5\n'
        "heartbeat_seconds = 0.5\ncheckpoint_every_records = 100\n"
        "[ship]\nbackoff_initial_s = 0.1\nbackoff_max_s = 1\n"
        f'[sinks.backbone]\ntype = "nats"\nservers = ["{nats.url}"]\nstream = "{STREAM}"\nsubject_prefix = "{SUBJ}"\n'
    )
    replica = Replica(root, 0, gw)
    ccfg = root / "collect.toml"
    ccfg.write_text(
        collect_toml(
            pg_prefix,
            [f"nats://{netns.client_host}:{nats.port}"],
            stream=STREAM,
            subject_prefix=SUBJ,
            keys=[root / "k.pub"],
            log_dir=root / "collector-log",
            archive=root / "archive",
            # A stalled database session or NATS connection is given up after a few seconds.
            extra="db_timeout_s = 3\nstatus_interval_s = 0.2\nbatch_max = 200\n",
            nats_extra="ack_wait_s = 2\nconnect_timeout_s = 2\n",
            dsn=f"postgresql://postgres@{netns.bb_host}:{forward.port}/postgres?connect_timeout=3",
        )
    )
    status = root / "collector-status.json"
    collector: subprocess.Popen[bytes] | None = None
    try:
        replica.start()
        clog = open(root / "collector.log", "ab")
        collector = subprocess.Popen(
            [
                *netns.wrap,
                sys.executable,
                "-m",
                "vllm_audit.cli",
                "collect",
                "--config",
                str(ccfg),
                "--status-file",
                str(status),
            ],
            stdout=clog,
            stderr=subprocess.STDOUT,
        )
        clog.close()
        yield Setup(root, nats, replica, collector, status)
    finally:
        netns.heal()
        netns.heal_client()
        replica.kill()
        stop_collector(collector)
        forward.close()
        nats.stop()


def collector_stats(path: Path) -> dict[str, int]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)}


class Load:
    """Calls to the replica in rounds of 20, from a thread, until stopped."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: dict[str, int] = {}
        self.n = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            ids = [f"cp-{self.n + i:05d}" for i in range(20)]
            self.n += 20
            got: dict[str, int] = {}
            load(self.base, ids, got)
            with self._lock:
                self.statuses.update(got)

    def answered(self) -> set[str]:
        with self._lock:
            return {r for r, st in self.statuses.items() if st == 200}

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cut(
    what: str, down: Callable[[], None], up: Callable[[], None], s: Setup, calls: Load, prefix: str
) -> tuple[int, int]:
    """Hold a cut until the collector has noticed it and 60 more calls were answered; returns
    (calls answered meanwhile, rows stored meanwhile after the collector noticed)."""
    errors0 = collector_stats(s.status).get("errors", 0)
    answered0 = len(calls.answered())
    down()
    noticed = f"the collector noticing the {what} cut"
    wait_until(lambda: collector_stats(s.status).get("errors", 0) > errors0, noticed, 60)
    rows0 = len(stored(prefix))
    wait_until(lambda: len(calls.answered()) >= answered0 + 60, f"60 calls answered during the {what} cut", 60)
    rows1 = len(stored(prefix))
    up()
    return len(calls.answered()) - answered0, rows1 - rows0


def test_collector_partitioned_from_postgresql_then_nats_under_load(setup: Setup, netns: Netns, pg_prefix: str) -> None:
    s = setup
    with Load(s.replica.base) as calls:
        wait_until(lambda: len(stored(pg_prefix)) >= 50, "the first calls in the central store", 60, 0.2)
        pg_answered, pg_rows_during = cut("PostgreSQL", netns.partition, netns.heal, s, calls, pg_prefix)
        wait_until(lambda: 0 <= stream_pending(s.nats.url, STREAM) <= 200, "the collector catching up", 120, 0.2)
        nats_answered, nats_rows_during = cut("NATS", netns.cut_client, netns.heal_client, s, calls, pg_prefix)
    answered = calls.answered()
    reader = LogReader(s.replica.log_dir, limit="all")
    [wid] = reader.writer_ids()

    def chain_at_end() -> bool:
        rows = pg_rows(pg_prefix, "SELECT next_seq FROM {p}_collect_chains WHERE writer_id = %s", (wid,))
        return int(rows[0][0]) == 1 + max(e.seq for e in LogReader(s.replica.log_dir, limit="all").entries(wid))

    # Settle (the counts below say what did not, if anything).
    for cond, what in (
        (lambda: answered <= set(stored(pg_prefix)), "every answered call stored after the heal"),
        (lambda: stream_pending(s.nats.url, STREAM) == 0, "the consumer acknowledging everything"),
        (chain_at_end, "the chain row at the replica's last entry"),
    ):
        try:
            wait_until(cond, what, 60, 0.3)
        except AssertionError:
            print(f"timed out waiting for {what}")
    got = stored(pg_prefix)
    missing = answered - set(got)
    duplicated = {r for r, n in got.items() if n > 1}
    st = collector_stats(s.status)
    alerts = pg_rows(pg_prefix, "SELECT kind, writer_id, message FROM {p}_collect_alerts")
    print(
        f"collector partition: answered {len(answered)} of {len(calls.statuses)}; PostgreSQL cut: "
        f"{pg_answered} answered meanwhile, {pg_rows_during} stored while cut; NATS cut: {nats_answered} "
        f"answered meanwhile, {nats_rows_during} stored while cut (batches fetched before the cut); "
        f"stored {len(got)}, missing {len(missing)}, duplicated {len(duplicated)}; collector errors "
        f"{st.get('errors')}, redelivered entries recognised as held {st.get('duplicates')}, alerts {len(alerts)}"
    )
    assert len(answered) == len(calls.statuses)
    assert pg_rows_during == 0
    assert not missing and not duplicated
    assert [] == alerts
    assert chain_at_end() and stream_pending(s.nats.url, STREAM) == 0
