"""Failure tests of the scale-out path: a replica partitioned from the backbone, and a replica
whose disk is gone.

Each test builds its own network namespace with two veth pairs (root is needed): a *client* link
(the test's calls reach the replica over it) and a *backbone* link (the replica's ``nats`` sink
reaches the JetStream server over it). The partition takes the backbone link down on the host
side, so the replica still answers while its sink's packets go nowhere (a black hole, not a
refused connection). Everything is removed in a finalizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import ANY

import orjson
import pytest

from tests.cluster.conftest import Netns, stop_collector, stored, stream_pending
from tests.cluster.test_cluster import Replica, load
from tests.collect.conftest import NATS_BINARY, NatsServer, collect_toml, pg_rows, wait_until
from tests.conftest import need_service
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader

STREAM = "VAC_FAIL"
SUBJ = "vacfail"


@dataclass
class Setup:
    root: Path
    nats: NatsServer
    replica: Replica
    collector: subprocess.Popen[bytes]
    config: Path


@pytest.fixture
def setup(tmp_path: Path, netns: Netns, pg_prefix: str) -> Iterator[Setup]:
    """JetStream on the host (127.0.0.1 for the collector, the backbone address for the replica),
    one gateway replica inside the namespace, the collector on the host."""
    need_service(os.access(NATS_BINARY, os.X_OK), f"nats-server binary ({NATS_BINARY})")
    root = tmp_path
    write_keypair(root / "k", "test/failures")
    nats = NatsServer(root, "n1", host="0.0.0.0")
    nats.start()
    gw = root / "gateway.toml"
    gw.write_text(
        f'[integrity]\nsigning_key = "{root / "k.key"}"\nembed_checkpoints = true\ncheckpoint_every_seconds = 0.5\n'
        "heartbeat_seconds = 0.5\ncheckpoint_every_records = 100\n"
        "[ship]\nbackoff_initial_s = 0.1\nbackoff_max_s = 1\n"
        f'[sinks.backbone]\ntype = "nats"\nservers = ["nats://{netns.bb_host}:{nats.port}"]\nstream = "{STREAM}"\n'
        f'subject_prefix = "{SUBJ}"\nack_timeout_s = 2\nconnect_timeout_s = 2\n'
    )
    replica = Replica(root, 0, gw, host=netns.client_ns, wrap=netns.wrap)
    ccfg = root / "collect.toml"
    ccfg.write_text(
        collect_toml(
            pg_prefix,
            [nats.url],
            stream=STREAM,
            subject_prefix=SUBJ,
            keys=[root / "k.pub"],
            log_dir=root / "collector-log",
            archive=root / "archive",
        )
    )
    collector: subprocess.Popen[bytes] | None = None
    try:
        replica.start()
        clog = open(root / "collector.log", "ab")
        collector = subprocess.Popen(
            [sys.executable, "-m", "vllm_audit.cli", "collect", "--config", str(ccfg)],
            stdout=clog,
            stderr=subprocess.STDOUT,
        )
        clog.close()
        yield Setup(root, nats, replica, collector, ccfg)
    finally:
        replica.kill()
        stop_collector(collector)
        nats.stop()


def test_partitioned_replica_keeps_serving_and_catches_up(setup: Setup, netns: Netns, pg_prefix: str) -> None:
    """Load before, during and after a partition of the replica from the backbone: every call is
    answered (a sink being unreachable never blocks the request path), nothing of the partition
    phase reaches the central store while the link is down, and once it is up again every
    answered call is stored exactly once, with no gap alert."""
    base = setup.replica.base
    statuses: dict[str, int] = {}
    load(base, [f"pt-a-{i:04d}" for i in range(100)], statuses)
    wait_until(lambda: len(stored(pg_prefix)) >= 100, "phase 1 in the central store", 60, 0.2)
    netns.partition()
    during = [f"pt-b-{i:04d}" for i in range(150)]
    load(base, during, statuses)
    # The partition was real: the replica answered these, the central store has none of them.
    wait_until(lambda: all(statuses.get(r) == 200 for r in during), "partition-phase calls answered", 5)
    seen_during = len(set(during) & set(stored(pg_prefix)))
    netns.heal()
    load(base, [f"pt-c-{i:04d}" for i in range(100)], statuses)
    answered = {r for r, st in statuses.items() if st == 200}
    wait_until(lambda: answered <= set(stored(pg_prefix)), "every answered call stored after the heal", 120, 0.3)
    got = stored(pg_prefix)
    missing = answered - set(got)
    duplicated = {r for r, n in got.items() if n > 1}
    print(
        f"partition: answered {len(answered)} of {len(statuses)} ({len(during)} while partitioned, "
        f"{seen_during} of them stored during the partition), stored {len(got)}, missing {len(missing)}, "
        f"duplicated {len(duplicated)}"
    )
    assert len(answered) == len(statuses) == 350
    assert seen_during == 0
    assert not missing and not duplicated
    assert [] == pg_rows(pg_prefix, "SELECT kind, writer_id, message FROM {p}_collect_alerts")


def test_lost_disk_is_reported_as_a_writer_seq_range(setup: Setup, netns: Netns, pg_prefix: str) -> None:
    """The replica is cut from the backbone, answers more calls (they reach only its own disk), is
    killed (SIGKILL) and its log directory deleted. Once the collector has taken everything the
    stream holds, `vllm-audit collect --report` names the missing range: (writer, first seq never
    shipped ..) — exactly the entry after the last one that reached the stream, open-ended — and
    every answered call that is not stored lies inside that range."""
    base = setup.replica.base
    statuses: dict[str, int] = {}
    load(base, [f"dg-a-{i:04d}" for i in range(100)], statuses)
    wait_until(lambda: len(stored(pg_prefix)) >= 100, "phase 1 in the central store", 60, 0.2)
    netns.partition()
    load(base, [f"dg-b-{i:04d}" for i in range(60)], statuses)
    setup.replica.kill()
    # The truth, read from the disk before it goes: which seq held which call.
    reader = LogReader(setup.replica.log_dir, limit="all")
    [wid] = reader.writer_ids()
    local = {e.seq: e.line for e in reader.entries(wid)}
    shutil.rmtree(setup.replica.log_dir)
    # The link stays down: the dead process's unsent bytes stay in the namespace's kernel.
    wait_until(lambda: stream_pending(setup.nats.url, STREAM) == 0, "the collector took all the stream holds", 60, 0.2)
    rep = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "collect", "--config", str(setup.config), "--report", "--json"],
        capture_output=True,
        timeout=60,
    )
    assert rep.returncode == 0, rep.stderr
    [row] = [r for r in orjson.loads(rep.stdout) if r["writer_id"] == wid]
    text = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "collect", "--config", str(setup.config), "--report"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    print(text)
    got = stored(pg_prefix)
    stored_seqs = {int(s) for (s,) in pg_rows(pg_prefix, "SELECT seq FROM {p}_records WHERE writer_id = %s", (wid,))}
    lost_calls = {
        orjson.loads(line)["request_id"]
        for seq, line in local.items()
        if seq > row["stored_through"] and b'"record_type":"inference"' in line
    }
    answered = {r for r, st in statuses.items() if st == 200}
    missing = answered - set(got)
    duplicated = {r for r, n in got.items() if n > 1}
    gone = row["missing_if_gone"]
    print(
        f"disk gone: answered {len(answered)}, stored {len(got)}, missing {len(missing)} "
        f"(all in ({wid}, {gone['from_seq']}..); the lost disk held up to seq {max(local)}), "
        f"duplicated {len(duplicated)}"
    )
    assert len(answered) == 160
    assert gone == {"writer_id": wid, "from_seq": row["stored_through"] + 1, "to_seq": None, "after_time": ANY}
    # Exactly: every entry before from_seq is central, the one at from_seq existed only on the lost disk.
    assert row["stored_through"] + 1 in local and not row["gaps"] and not row["broken"]
    assert all(s <= row["stored_through"] for s in stored_seqs)
    assert missing and missing == lost_calls  # the missing calls are exactly those the range holds
    assert not duplicated
    assert f"({wid}, {gone['from_seq']}..) is missing centrally" in text


def test_replica_restarted_on_an_empty_disk_is_a_new_chain(setup: Setup, netns: Netns, pg_prefix: str) -> None:
    """The replica is cut from the backbone, answers more calls, is killed and its log directory
    deleted; it is restarted on the empty directory (a new writer id, a new chain from seq 0) and
    serves more calls. The central store reports the old writer's missing range exactly (the first
    entry never shipped ..), takes the new chain whole, raises no alert (no fork: it is another
    writer), and `vllm-audit verify` over the archive exits 0 (both chains verify)."""
    base = setup.replica.base
    statuses: dict[str, int] = {}
    load(base, [f"ed-a-{i:04d}" for i in range(100)], statuses)
    wait_until(lambda: len(stored(pg_prefix)) >= 100, "phase 1 in the central store", 60, 0.2)
    netns.partition()
    load(base, [f"ed-b-{i:04d}" for i in range(40)], statuses)
    setup.replica.kill()
    reader = LogReader(setup.replica.log_dir, limit="all")
    [old] = reader.writer_ids()
    old_local = {e.seq: e.line for e in reader.entries(old)}
    shutil.rmtree(setup.replica.log_dir)
    # The replacement runs on the host (a new pod, a new network) and the namespace's link stays
    # down: the killed process's unsent bytes stay in the namespace's kernel, so what the lost disk
    # held does not reach the stream after all.
    gw = setup.root / "gateway-host.toml"
    gw.write_text((setup.root / "gateway.toml").read_text().replace(f"nats://{netns.bb_host}:", "nats://127.0.0.1:"))
    replica = Replica(setup.root, 0, gw)
    assert replica.log_dir == setup.replica.log_dir
    replica.start()  # the same directory, now empty
    setup.replica = replica  # the fixture kills it at the end
    after = [f"ed-c-{i:04d}" for i in range(100)]
    load(replica.base, after, statuses)
    wait_until(lambda: set(after) <= set(stored(pg_prefix)), "the restarted replica's calls stored", 120, 0.3)
    replica.stop()  # cleanly: its log is final and shipped to its last entry
    reader = LogReader(replica.log_dir, limit="all")
    [new] = reader.writer_ids()
    new_last = max(e.seq for e in reader.entries(new))
    wait_until(lambda: stream_pending(setup.nats.url, STREAM) == 0, "the collector took all the stream holds", 60, 0.2)
    rep = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "collect", "--config", str(setup.config), "--report", "--json"],
        capture_output=True,
        timeout=60,
    )
    assert rep.returncode == 0, rep.stderr
    rows = {r["writer_id"]: r for r in orjson.loads(rep.stdout)}
    got = stored(pg_prefix)
    answered = {r for r, st in statuses.items() if st == 200}
    missing = answered - set(got)
    duplicated = {r for r, n in got.items() if n > 1}
    o, n = rows[old], rows[new]
    lost_calls = {
        orjson.loads(line)["request_id"]
        for seq, line in old_local.items()
        if seq > o["stored_through"] and b'"record_type":"inference"' in line
    }
    alerts = pg_rows(pg_prefix, "SELECT kind, writer_id, message FROM {p}_collect_alerts")
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_audit.cli",
            "verify",
            "--public-key",
            str(setup.root / "k.pub"),
            str(setup.root / "archive"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(
        f"empty disk: old writer {old} stored through {o['stored_through']} (its lost disk held up to seq "
        f"{max(old_local)}), reported missing ({old}, {o['missing_if_gone']['from_seq']}..); new writer {new} "
        f"stored through {n['stored_through']} of {new_last}; answered {len(answered)}, stored {len(got)}, "
        f"missing {len(missing)} (all in the old writer's range), duplicated {len(duplicated)}, alerts {len(alerts)}, "
        f"verify exit {verify.returncode}"
    )
    assert old != new and len(answered) == 240
    assert o["missing_if_gone"]["from_seq"] == o["stored_through"] + 1 and o["stored_through"] + 1 in old_local
    assert not o["gaps"] and not o["broken"] and not n["broken"] and not n["gaps"]
    assert n["stored_through"] == new_last and n["stopped"] and n["missing_if_gone"] is None
    assert missing and missing == lost_calls
    assert not duplicated and [] == alerts
    assert verify.returncode == 0, verify.stdout + verify.stderr
