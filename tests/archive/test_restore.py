"""Restore from the WORM archive (real LocalStack S3 with Object Lock): export of a pruned range.

archive -> prune past retention -> ``vllm-audit export`` of a range whose local segments are gone
restores them from the archive and the bundle verifies offline; ``vllm-audit archive restore``
lays a log directory out that ``LogReader`` reads; an archived object that is not what was
recorded is refused and named.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.archive.test_archive import _config, _state
from tests.archive.test_prune import _cli, _toml
from tests.export.conftest import TenantLog, rec, write_phases
from vllm_audit.archive.projection import ArchiveIndex, SegmentArchiver, index_path
from vllm_audit.archive.prune import execute, plan
from vllm_audit.archive.restore import RestoreError, restore
from vllm_audit.archive.s3 import ObjectStore
from vllm_audit.config import Config
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import LogReader, list_segments, read_pruned


def _pruned_log(tmp_path: Path, archive: dict[str, Any]) -> tuple[Config, TenantLog, str]:
    """Three phases (the export range is phase 2), all sealed segments archived, then pruned."""
    write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    log = TenantLog(tmp_path / "log", tmp_path / "ops.pub", tmp_path / "ops.key")
    phases = [
        [rec(i, "acme" if i % 3 else "globex") for i in range(60)],
        [rec(i, "acme" if i % 3 else "globex") for i in range(60, 150)],
        [rec(i, "acme" if i % 3 else "globex") for i in range(150, 260)],
    ]
    write_phases(log, phases, segment_max_bytes=8000)
    config = _config(tmp_path, archive, retention={"days": 0})
    store = ObjectStore(config.archive)
    store.ensure_bucket()
    (wid,) = LogReader(config.log.dir).writer_ids()
    SegmentArchiver(config, _state(config), store).archive_until(wid, 1 << 40)
    execute(config, plan(config), reason="retention test")
    (pr,) = read_pruned(Path(config.log.dir) / "writers" / wid)
    assert pr.end > 150  # phase 2 (entries 60..149) is no longer on the local disk
    return config, log, wid


def test_export_of_a_pruned_range_restores_it_from_the_archive_and_verifies_offline(
    tmp_path: Path, archive_table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, log, wid = _pruned_log(tmp_path, archive_table)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the export restores to (the CLI runs as a subprocess)
    cfg = _toml(tmp_path, archive_table)
    out = tmp_path / "bundle"
    args = ["export", "--config", str(cfg), "--org", "acme", "--from", log.t_from, "--to", log.t_to]
    refused = _cli(*args, "--out", str(tmp_path / "refused"), "--grace-seconds", "0", "--no-archive")
    assert refused.returncode == 2 and "restore the segments from the archive first" in refused.stderr
    r = _cli(*args, "--out", str(out), "--grace-seconds", "0")
    assert r.returncode == 0, r.stderr
    assert f"pruned segment(s) of {wid}" in r.stdout and "from the archive, each verified" in r.stdout
    assert f"exported {log.acme_in_range} record(s)" in r.stdout
    v = _cli("verify-bundle", str(out), "--public-key", str(log.pub))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "INTACT and complete: tenant acme" in v.stdout and f"{log.acme_in_range} record(s)" in v.stdout
    assert scratch.is_dir() and not any(scratch.iterdir())  # the restored copy was removed


def test_an_append_after_prune_continues_the_chain(tmp_path: Path, archive_table: dict[str, Any]) -> None:
    from vllm_audit.writer import append_events

    config, log, wid = _pruned_log(tmp_path, archive_table)
    last = list(LogReader(config.log.dir).entries_all(wid))[-1].seq
    append_events(config, [{"record_type": "event", "event": "export.created", "detail": {}}])
    after = [e for e in LogReader(config.log.dir).entries_all(wid) if e.seq > last]
    assert after and after[0].seq == last + 1 and not any(e.record().get("event") == "recovery" for e in after)
    v = _cli("verify", str(config.log.dir), "--public-key", str(log.pub))
    assert v.returncode == 0, v.stdout


def test_archive_restore_lays_out_a_log_the_reader_reads_and_checks_signatures(
    tmp_path: Path, archive_table: dict[str, Any]
) -> None:
    config, log, wid = _pruned_log(tmp_path, archive_table)
    cfg = _toml(tmp_path, archive_table)
    into = tmp_path / "restored"
    t0 = time.perf_counter()
    r = _cli("archive", "restore", "--config", str(cfg), "--writer", wid, "--from-seq", "70", "--to-seq", "140",
             "--into", str(into), "--public-key", str(log.pub))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "signatures verified" in r.stdout, r.stdout
    print(f"archive restore CLI: {time.perf_counter() - t0:.2f} s wall; {r.stdout.strip()}")
    index = ArchiveIndex(index_path(_state(config))).load()
    restored = list_segments(into / "writers" / wid)
    assert restored and restored[0][0] <= 70
    for first, path in restored:  # byte for byte what was archived
        item = next(i for i in index.all() if i.segment == path.name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == item.sha256 and item.first_seq == first
    reader = LogReader(into, limit="all")
    got = list(reader.entries(wid, 70))
    assert got[0].seq == 70 and got[-1].seq >= 139
    assert all(b.seq == a.seq + 1 and b.prev == a.leaf_hex for a, b in zip(got, got[1:], strict=False))
    # Segments still on the local disk are not in the archive-only restore unless archived: asking
    # for entries that were never sealed is refused with the reason.
    bad = _cli("archive", "restore", "--config", str(cfg), "--writer", wid, "--from-seq", "0",
               "--to-seq", str(1 << 30), "--into", str(tmp_path / "x"))  # fmt: skip
    assert bad.returncode == 2 and "is not sealed yet" in bad.stderr
    busy = _cli("archive", "restore", "--config", str(cfg), "--writer", wid, "--from-seq", "0", "--into", str(into))
    assert busy.returncode == 2 and "not an empty directory" in busy.stderr


def _forge(config: Config, store: ObjectStore, wid: str, *, consistent_index: bool) -> str:
    """Add a changed version of a pruned segment object and point the index at it; returns its key."""
    path = index_path(_state(config))
    raw = orjson.loads(path.read_bytes())
    # The pruned segment holding entry 100: inside the export range (phase 2) and not the first one.
    seg = next(s for s, v in raw[wid].items() if v["first_seq"] <= 100 <= v["last_seq"])
    assert seg in read_pruned(Path(config.log.dir) / "writers" / wid)[0].segments
    item = raw[wid][seg]["segment_object"]
    body = store.get(item["key"], item["version_id"]).replace(b"ticket", b"TICKET", 1)
    put = store.client.put_object(
        Bucket=store.bucket, Key=item["key"], Body=body
    )  # a new version; the locked one stays
    item["version_id"] = put["VersionId"]
    if consistent_index:
        item["sha256"] = raw[wid][seg]["sha256"] = hashlib.sha256(body).hexdigest()
    path.write_bytes(orjson.dumps(raw))
    return str(item["key"])


@pytest.mark.parametrize("consistent_index", [False, True])
def test_a_tampered_archived_object_is_refused_and_named(
    tmp_path: Path, archive_table: dict[str, Any], consistent_index: bool
) -> None:
    config, log, wid = _pruned_log(tmp_path, archive_table)
    store = ObjectStore(config.archive)
    key = _forge(config, store, wid, consistent_index=consistent_index)
    with pytest.raises(RestoreError) as exc:
        restore(config, wid, 0, None, tmp_path / "restored", keys=load_public_keys([log.pub]))
    msg = str(exc.value)
    assert key in msg and "refused" in msg
    assert ("manifest's sha256" if consistent_index else "recorded") in msg
    # The export that needs it fails with the same named reason (and writes no bundle).
    cfg = _toml(tmp_path, archive_table)
    r = _cli("export", "--config", str(cfg), "--org", "acme", "--from", log.t_from, "--to", log.t_to,
             "--out", str(tmp_path / "bundle"), "--grace-seconds", "0")  # fmt: skip
    assert r.returncode == 2 and key in r.stderr
    assert not (tmp_path / "bundle").exists()
    assert (
        store.verify_stored(
            ArchiveIndex(index_path(_state(config))).load().all()[0].segment_object, now=dt.datetime.now(dt.UTC)
        )
        == ""
    )


def test_a_consistent_forgery_of_segment_manifest_and_index_fails_against_what_follows(
    tmp_path: Path, archive_table: dict[str, Any]
) -> None:
    """The segment re-chained after a changed record, its manifest recomputed and the index pointed at
    both: every hash agrees, so only the signed checkpoint / the next entry's link can refuse it."""
    from vllm_audit.integrity import codec
    from vllm_audit.integrity.merkle import CompactRange

    config, log, wid = _pruned_log(tmp_path, archive_table)
    store = ObjectStore(config.archive)
    path = index_path(_state(config))
    raw = orjson.loads(path.read_bytes())
    items = sorted(raw[wid].values(), key=lambda v: v["first_seq"])
    k = next(n for n, v in enumerate(items) if v["first_seq"] <= 100 <= v["last_seq"])
    item, prev_item = items[k], items[k - 1]
    data = store.get(item["segment_object"]["key"], item["segment_object"]["version_id"])
    tail = codec.writer_tail(wid)
    entries = [codec.decode(line, tail, wid) for line in codec.split_lines(data)]
    # Each entry's body as the JSON object the writer encoded (the codec says where the header ends).
    bodies: list[bytes] = []
    for e in entries:
        h = codec.parse_header(e.line, tail)
        assert h is not None
        bodies.append(b"{" + e.line[h[2] :])
    first = entries[0].seq
    same, _ = codec.encode_entries(bodies, wid, first, entries[0].prev.encode())
    assert bytes(same) == data  # re-encoding reproduces the sealed bytes: the forgery is exact
    j = next(n for n, b in enumerate(bodies) if b'"org_id":"acme"' in b and b"ticket" in b)
    bodies[j] = bodies[j].replace(b"ticket", b"TICKET", 1)
    forged, leaves = codec.encode_entries(bodies, wid, first, entries[0].prev.encode())
    prev_m = orjson.loads(store.get(prev_item["manifest_object"]["key"], prev_item["manifest_object"]["version_id"]))
    tree = CompactRange(first, [bytes.fromhex(h) for h in prev_m["compact_range"]])
    tree.extend(leaves)
    m = orjson.loads(store.get(item["manifest_object"]["key"], item["manifest_object"]["version_id"]))
    m.update(
        sha256=hashlib.sha256(forged).hexdigest(),
        bytes=len(forged),
        last_leaf=leaves[-1].hex(),
        compact_range=[h.hex() for h in tree.hashes],
        merkle_root=tree.root().hex(),
    )
    man = codec.encode_manifest(m)
    for obj, body in ((item["segment_object"], bytes(forged)), (item["manifest_object"], man)):
        put = store.client.put_object(Bucket=store.bucket, Key=obj["key"], Body=body)
        obj.update(version_id=put["VersionId"], sha256=hashlib.sha256(body).hexdigest())
    item["sha256"] = m["sha256"]
    raw[wid][item["segment"]] = item
    path.write_bytes(orjson.dumps(raw))
    # Restoring exactly that segment: its own hashes all agree; what follows it does not.
    with pytest.raises(RestoreError, match="refused") as exc:
        restore(config, wid, first, item["last_seq"] + 1, tmp_path / "restored", keys=load_public_keys([log.pub]))
    assert wid in str(exc.value)
