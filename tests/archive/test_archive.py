"""The WORM archive against a real S3 server with Object Lock (LocalStack-core, see conftest)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.export.conftest import rec
from vllm_audit.archive.projection import ArchiveIndex, ArchiveProjection, index_path
from vllm_audit.archive.s3 import ObjectStore
from vllm_audit.config import Config, load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import list_segments, read_manifest
from vllm_audit.ship.runner import Runner


def _config(tmp_path: Path, archive: dict[str, Any], **extra: Any) -> Config:
    key = tmp_path / "ops.key"
    if not key.exists():
        write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    return load_config(
        None,
        {
            "log": {"dir": str(tmp_path / "log")},
            "integrity": {"signing_key": str(key), "segment_max_bytes": 8000},
            "archive": archive,
            **extra,
        },
    )


def write(config: Config, records: list[dict[str, Any]], *, batch: int = 20) -> None:
    """Records through the real Chain, a signed checkpoint after each batch."""
    chain = Chain(config.log.dir, IntegrityConfig(signing_key=config.integrity.signing_key, segment_max_bytes=8000))
    for k in range(0, len(records), batch):
        chain.append([*chain.pending_events(), *records[k : k + batch]])
        chain.sync()
        chain.after_commit()
        chain.checkpoint()
    chain.close()


def sealed(config: Config) -> list[tuple[str, Path]]:
    out = []
    for wdir in sorted((Path(config.log.dir) / "writers").iterdir()):
        out += [(wdir.name, p) for _f, p in list_segments(wdir) if read_manifest(p) is not None]
    return out


def _state(config: Config) -> Path:
    return Path(config.log.dir) / "ship"


def test_archive_under_load_uploads_every_sealed_segment_locked(tmp_path: Path, archive_table: dict[str, Any]) -> None:
    config = _config(tmp_path, archive_table)
    write(config, [rec(0, "acme")])
    runner = Runner(config.log.dir, _state(config), [ArchiveProjection(config, _state(config))], config.ship)
    runner.start()
    try:
        writer = threading.Thread(target=write, args=(config, [rec(i, "acme") for i in range(1, 400)]))
        writer.start()  # the log grows while the archive runs
        writer.join()
        want = sealed(config)
        assert len(want) >= 8
        deadline = dt.datetime.now() + dt.timedelta(seconds=60)
        while dt.datetime.now() < deadline and len(ArchiveIndex(index_path(_state(config))).load().all()) < len(want):
            runner.notify()
        index = ArchiveIndex(index_path(_state(config))).load()
        # The caught-up archive holds every sealed segment except possibly one whose covering entries came last.
        got = {(i.writer_id, i.segment) for i in index.all()}
        assert {(w, p.name) for w, p in want} - got <= {(w, p.name) for w, p in want[-1:]}
    finally:
        runner.stop()
    store = ObjectStore(config.archive)
    for item in index.all():
        local = Path(config.log.dir) / "writers" / item.writer_id / item.segment
        assert store.get(item.segment_object.key, item.segment_object.version_id) == local.read_bytes()
        head = store.head(item.manifest_object.key)
        assert head is not None and head.lock_mode == "COMPLIANCE" and head.retain_until > "2026"


def test_a_locked_object_cannot_be_deleted_overwritten_or_have_its_retention_shortened(
    tmp_path: Path, archive_table: dict[str, Any]
) -> None:
    from vllm_audit.archive.projection import SegmentArchiver

    config = _config(tmp_path, archive_table)
    write(config, [rec(i, "acme") for i in range(60)])
    store = ObjectStore(config.archive)
    store.ensure_bucket()
    archiver = SegmentArchiver(config, _state(config), store)
    wid, seg = sealed(config)[0]
    item = archiver.archive_segment(wid, seg, read_manifest(seg) or {})
    obj = item.segment_object
    c = store.client
    with pytest.raises(Exception, match="AccessDenied"):
        c.delete_object(Bucket=store.bucket, Key=obj.key, VersionId=obj.version_id)
    with pytest.raises(Exception, match="AccessDenied"):
        c.delete_object(Bucket=store.bucket, Key=obj.key, VersionId=obj.version_id, BypassGovernanceRetention=True)
    shorter = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    with pytest.raises(Exception, match="AccessDenied"):
        c.put_object_retention(
            Bucket=store.bucket,
            Key=obj.key,
            VersionId=obj.version_id,
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": shorter},
        )
    with pytest.raises(Exception, match="AccessDenied"):
        c.put_object_retention(
            Bucket=store.bucket,
            Key=obj.key,
            VersionId=obj.version_id,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": shorter + dt.timedelta(days=5)},
        )
    # "Overwriting" only adds a version: the locked one keeps its bytes; ours refuses to do even that.
    c.put_object(Bucket=store.bucket, Key=obj.key, Body=b"forged")
    assert store.get(obj.key, obj.version_id) == seg.read_bytes()
    with pytest.raises(Exception, match="different content"):
        store.put(obj.key, b"forged again", shorter + dt.timedelta(days=2))
    assert store.verify_stored(obj, now=dt.datetime.now(dt.UTC)) == ""


SHIPPER = """
import sys, threading
from pathlib import Path
from vllm_audit.config import load_config
from vllm_audit.archive.projection import ArchiveProjection
from vllm_audit.ship.runner import Runner
import orjson
config = load_config(None, orjson.loads(sys.argv[1]))
state = Path(config.log.dir) / "ship"
runner = Runner(config.log.dir, state, [ArchiveProjection(config, state)], config.ship)
runner.start()
print("started", flush=True)
threading.Event().wait()
"""


def test_kill_9_mid_upload_resumes_without_duplicates(tmp_path: Path, archive_table: dict[str, Any]) -> None:
    import orjson

    config = _config(tmp_path, archive_table)
    write(config, [rec(i, "acme", output_response="x" * 600) for i in range(600)])
    want = {(w, p.name) for w, p in sealed(config)}
    table = {"log": {"dir": config.log.dir}, "archive": archive_table, "ship": {"batch_max": 50}}
    argv = [sys.executable, "-c", SHIPPER, orjson.dumps(table).decode()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    idx = index_path(_state(config))
    deadline = dt.datetime.now() + dt.timedelta(seconds=60)
    while dt.datetime.now() < deadline and len(ArchiveIndex(idx).load().all()) < 3:
        proc.wait(0.05) if proc.poll() is not None else None
    proc.kill()  # kill -9 while later segments are being uploaded
    proc.wait()
    done_before = len(ArchiveIndex(idx).load().all())
    assert 3 <= done_before < len(want)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        deadline = dt.datetime.now() + dt.timedelta(seconds=90)
        while dt.datetime.now() < deadline and len(ArchiveIndex(idx).load().all()) < len(want) - 1:
            assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    index = ArchiveIndex(idx).load()
    assert want - {(i.writer_id, i.segment) for i in index.all()} <= {max(want)}
    store = ObjectStore(config.archive)
    for item in index.all():
        for obj in item.objects:  # one version per object: the resumed upload recognised what was there
            versions = store.client.list_object_versions(Bucket=store.bucket, Prefix=obj.key)["Versions"]
            assert [v["VersionId"] for v in versions if v["Key"] == obj.key] == [obj.version_id]
