"""Retention with a legal hold: prune removes exactly what it should, and verify still exits 0."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.archive.test_archive import _config, _state, sealed, write
from tests.export.conftest import rec
from vllm_audit.archive.projection import ArchiveIndex, SegmentArchiver, index_path, scan_records
from vllm_audit.archive.s3 import ObjectStore
from vllm_audit.integrity.reader import list_segments


def _toml(tmp_path: Path, archive: dict[str, Any]) -> Path:
    lines = [
        "[log]",
        f'dir = "{tmp_path / "log"}"',
        "[integrity]",
        f'signing_key = "{tmp_path / "ops.key"}"',
        "segment_max_bytes = 8000",
        "[retention]",
        "days = 0",
        "[archive]",
    ]
    for k, v in archive.items():
        lines.append(f"{k} = {orjson.dumps(v).decode()}")
    p = tmp_path / "audit.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_audit.cli", *args], capture_output=True, text=True, timeout=120)


def test_prune_past_retention_with_a_hold_removes_exactly_the_unheld_archived_segments(
    tmp_path: Path, archive_table: dict[str, Any]
) -> None:
    config = _config(tmp_path, archive_table, retention={"days": 0})
    records = [rec(i, "globex" if 120 <= i < 150 else "acme") for i in range(300)]
    write(config, records)
    store = ObjectStore(config.archive)
    store.ensure_bucket()
    archiver = SegmentArchiver(config, _state(config), store)
    wid = sealed(config)[0][0]
    archiver.archive_until(wid, 1 << 40)
    index = ArchiveIndex(index_path(_state(config))).load()
    segs = list_segments(Path(config.log.dir) / "writers" / wid)
    archived = {i.segment for i in index.all()}
    held = {p.name for _f, p in segs if any(r.get("org_id") == "globex" for r in scan_records(p.read_bytes()))}
    expected_gone = {p.name for _f, p in segs[:-1] if p.name in archived and p.name not in held}
    assert held and expected_gone and len(expected_gone) + len(held) + 1 <= len(segs)

    cfg = _toml(tmp_path, archive_table)
    r = _cli("hold", "add", "--config", str(cfg), "--org", "globex", "--reason", "case 2026-17", "--by", "legal")
    assert r.returncode == 0, r.stderr
    assert f"legal hold set on {3 * len(held)} archive object(s)" in r.stdout
    for item in index.all():
        for obj in item.objects:
            head = store.head(obj.key, obj.version_id)
            assert head is not None and head.legal_hold == (item.segment in held)

    dry = _cli("prune", "--config", str(cfg), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "under legal hold: hold hold-" in dry.stdout and "case 2026-17" in dry.stdout
    assert all((tmp_path / "log" / "writers" / wid / s).exists() for s in expected_gone)  # a dry run changes nothing

    r = _cli("prune", "--config", str(cfg), "--reason", "retention test")
    assert r.returncode == 0, r.stderr
    left = {p.name for _f, p in list_segments(Path(config.log.dir) / "writers" / wid)}
    assert expected_gone.isdisjoint(left)
    assert {p.name for _f, p in segs} - expected_gone <= left  # held, unarchived and the newest stay
    v = _cli("verify", str(tmp_path / "log"), "--public-key", str(tmp_path / "ops.pub"))
    assert v.returncode == 0, v.stdout
    assert "INTACT" in v.stdout and "pruned: entries" in v.stdout and "removed by retention" in v.stdout
    j = orjson.loads(_cli("verify", str(tmp_path / "log"), "--public-key", str(tmp_path / "ops.pub"), "--json").stdout)
    assert j["intact"] and j["summary"]["pruned_entries"] > 0
    assert {s for r in j["pruned"] for s in r["segments"]} == expected_gone
    # The held data is still there; the pruned data still is in the archive.
    held_left = [p for _f, p in list_segments(Path(config.log.dir) / "writers" / wid) if p.name in held]
    assert sum(1 for p in held_left for x in scan_records(p.read_bytes()) if x.get("org_id") == "globex") == 30
    assert all(store.verify_stored(i.segment_object, now=dt.datetime.now(dt.UTC)) == "" for i in index.all())

    # Removing the record of a prune (the pruned-range file) makes the gap a missing segment again.
    (tmp_path / "log" / "writers" / wid / "pruned.jsonl").unlink()
    bad = _cli("verify", str(tmp_path / "log"), "--public-key", str(tmp_path / "ops.pub"))
    assert bad.returncode == 1 and "segment_missing" in bad.stdout
