"""A replica that shuts down cleanly ships everything it wrote, its last entries included.

On SIGTERM the gateway's writer writes its final entries (the ``writer_stopped`` event and the
final checkpoint) after the last request; the projections must still ship them before the
process exits, whether they run on threads of the serving process or in its shipper child.
Then the collector holds the chain up to its last entry and sees the writer as stopped cleanly
(nothing to report missing if its disk goes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster.test_cluster import Replica, load
from tests.collect.conftest import NATS_BINARY, NatsServer, collect_toml, wait_until
from tests.conftest import need_service
from vllm_audit.collect.collector import Collector, report
from vllm_audit.collect.natsclient import NatsError
from vllm_audit.config import load_config
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader

STREAM = "VAC_STOP"
SUBJ = "vacstop"


def opened(c: Collector) -> bool:
    try:
        c.open()
    except NatsError:
        return False
    return True


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_clean_shutdown_ships_the_last_entries(tmp_path: Path, pg_prefix: str, isolation: str) -> None:
    need_service(os.access(NATS_BINARY, os.X_OK), f"nats-server binary ({NATS_BINARY})")
    write_keypair(tmp_path / "k", "test/shutdown")
    nats = NatsServer(tmp_path, "n1")
    nats.start()
    gw = tmp_path / "gateway.toml"
    gw.write_text(
        f'[integrity]\nsigning_key = "{tmp_path / "k.key"}"\nembed_checkpoints = true\n'
        "checkpoint_every_records = 1000\ncheckpoint_every_seconds = 3600\n"
        f'[ship]\nisolation = "{isolation}"\n'
        f'[sinks.backbone]\ntype = "nats"\nservers = ["{nats.url}"]\nstream = "{STREAM}"\nsubject_prefix = "{SUBJ}"\n'
    )
    replica = Replica(tmp_path, 0, gw)
    cfg = tmp_path / "collect.toml"
    cfg.write_text(
        collect_toml(
            pg_prefix, [nats.url], stream=STREAM, subject_prefix=SUBJ, keys=[tmp_path / "k.pub"], log_dir=tmp_path / "c"
        )
    )
    c = Collector(load_config(cfg))
    try:
        replica.start()
        statuses: dict[str, int] = {}
        load(replica.base, [f"st-{i:03d}" for i in range(30)], statuses)
        assert sum(1 for v in statuses.values() if v == 200) == 30
        wait_until(lambda: opened(c), "the stream created by the replica's sink", 60, 0.1)
        wait_until(lambda: (c.step(0.2), c.stats.rows_inserted == 30)[1], "the 30 calls collected", 60, 0)
        replica.stop()  # SIGTERM: a clean shutdown
        assert replica.proc is None or replica.proc.returncode is not None
        reader = LogReader(replica.log_dir, limit="all")
        [wid] = reader.writer_ids()
        local = list(reader.entries(wid))
        last = local[-1].seq
        tail = [e.record_type for e in local[-3:]]
        # Everything the stream holds, taken (the stream holds only what the replica shipped).
        wait_until(lambda: (c.step(0.2), c.source.pending() == 0)[1], "the collector drained the stream", 60, 0)  # type: ignore[attr-defined]
        st, _ = c.store.states()[wid]
        [row] = [r for r in report(c.store) if r["writer_id"] == wid]
        print(
            f"shutdown ({isolation}): the log ends at seq {last} ({tail}); the collector holds through "
            f"{st.next_seq - 1}, stopped={st.stopped}, missing_if_gone={row['missing_if_gone']}"
        )
        assert st.next_seq == last + 1 and st.stopped and row["missing_if_gone"] is None
        assert st.signed_size == last  # the final checkpoint (the last entry) was verified
    finally:
        replica.kill()
        c.close()
        nats.stop()
