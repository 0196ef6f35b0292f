"""Every manifest field that anything trusts is verified (issue 15 item 16).

The verifier checks each field of a sealed segment's manifest against the segment, and the
``segment_sealed`` event's sha256 against the file; a restarted writer checks the manifest it
resumes from before growing its tree from the recorded compact range.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from vllm_audit.integrity import verify as verify_mod
from vllm_audit.integrity.chain import Chain, manifest_name
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair

from ._logtools import record, segments, writable, write_log, writer_dir


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "k", "test/operator")
    write_log(tmp_path / "log", str(tmp_path / "k.key"), 600)
    return tmp_path / "log"


def _report(log: Path) -> verify_mod.Report:
    return verify_mod.verify_log(log, load_public_keys([str(log.parent / "k.pub")]), workers=1)


def _edit_manifest(log: Path, change: dict[str, Any]) -> Path:
    seg = segments(log)[0]
    m = seg.with_name(manifest_name(seg.name))
    man = orjson.loads(m.read_bytes())
    man.update(change)
    writable(m)
    m.write_bytes(orjson.dumps(man))
    return seg


def test_pristine_log_verifies(log: Path) -> None:
    assert _report(log).intact


@pytest.mark.parametrize(
    "field, value",
    [
        ("sha256", "0" * 64),
        ("tree_size", 7),
        ("first_seq", 1),
        ("last_seq", 3),
        ("torn_bytes", 5),
        ("compact_range", ["11" * 32]),
        ("writer_id", "someone-else"),
    ],
)
def test_edited_manifest_field_is_named(log: Path, field: str, value: Any) -> None:
    seg = _edit_manifest(log, {field: value})
    rep = _report(log)
    assert not rep.intact
    assert any(p.segment == seg.name and p.kind == "modified" for p in rep.problems), rep.problems


def test_segment_sealed_event_sha_is_compared_with_the_file(log: Path) -> None:
    """Changing a sealed segment *and* its manifest consistently still contradicts the signed event."""
    import hashlib

    seg = segments(log)[0]
    data = seg.read_bytes()
    writable(seg)
    seg.write_bytes(data + b"")  # same bytes: intact
    assert _report(log).intact
    # Forge the manifest's sha256/bytes for appended junk: the event in the chain still disagrees.
    junk = data + b"\n"
    seg.write_bytes(junk)
    _edit_manifest(log, {"sha256": hashlib.sha256(junk).hexdigest(), "bytes": len(junk)})
    rep = _report(log)
    assert not rep.intact


def test_writer_does_not_resume_from_an_edited_compact_range(log: Path) -> None:
    """A restarted writer checks the manifest it resumes from; honest new entries still verify."""
    segs = segments(log)
    last_sealed = [s for s in segs if s.with_name(manifest_name(s.name)).exists()][-1]
    m = last_sealed.with_name(manifest_name(last_sealed.name))
    man = orjson.loads(m.read_bytes())
    man["compact_range"] = ["22" * 32 for _ in man["compact_range"]]
    writable(m)
    m.write_bytes(orjson.dumps(man))
    os.chmod(m, 0o444)
    chain = Chain(log, IntegrityConfig(signing_key=str(log.parent / "k.key")))
    events = chain.pending_events()
    chain.append(events + [record(9000 + i) for i in range(5)])
    chain.sync()
    chain.close()
    recovery = [e for e in events if e.get("event") == "recovery"]
    assert recovery and last_sealed.name in recovery[0]["detail"]["manifests_distrusted"]
    rep = _report(log)
    # The edited manifest is reported; nothing else (the new entries chain and their roots are right).
    assert [p.segment for p in rep.problems] == [last_sealed.name], rep.problems
    assert writer_dir(log).name == chain.writer_id
