"""When the verifier may skip hashing a sealed segment file a second time, and when it may not.

A segment the fast path took whole is not hashed again when a signed ``segment_sealed`` event
records the same fields as its manifest (``verify._WriterVerifier._settle_hashes``): its bytes are
then exactly the ones the writer hashed. An event that no checkpoint signs yet proves nothing, so
an attacker who rewrites the unsigned tail must still be caught by hashing the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from vllm_audit.integrity import verify as verify_mod
from vllm_audit.integrity.chain import manifest_name
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, parse_body, parse_note_line, split_note
from vllm_audit.integrity.keys import load_public_keys, write_keypair

from ._logtools import read_lines, segments, writable, write_lines, write_log, writer_dir


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "k", "test/operator")
    write_log(tmp_path / "log", str(tmp_path / "k.key"), 600)
    return tmp_path / "log"


def _report(log: Path) -> verify_mod.Report:
    """One process, so that the spy below sees every file read."""
    return verify_mod.verify_log(log, load_public_keys([str(log.parent / "k.pub")]), workers=1)


def _hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The segment files the verifier reads for their SHA-256."""
    seen: list[str] = []
    real = verify_mod._file_sha256

    def spy(path: str) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verify_mod, "_file_sha256", spy)
    return seen


def _cut_after_sealed_event(log: Path) -> tuple[Path, Path, int]:
    """Truncate the log right after the ``segment_sealed`` event of its last sealed segment, and drop
    the checkpoints past it, as a writer that died there would leave it (the event unsigned).
    Returns (that sealed segment, the segment holding the event, the event's seq)."""
    segs = segments(log)
    sealed, holder = segs[-2], segs[-1]
    (event,) = [line for line in read_lines(holder) if b'"event":"segment_sealed"' in line]
    write_lines(holder, [event])
    seq = orjson.loads(event)["seq"]
    cps = writer_dir(log) / CHECKPOINTS_FILE
    keep = [
        raw
        for raw in cps.read_bytes().split(b"\n")
        if raw and parse_body(split_note(parse_note_line(raw))[0]).size <= seq
    ]
    writable(cps)
    cps.write_bytes(b"".join(raw + b"\n" for raw in keep))
    return sealed, holder, seq


def test_segments_whose_sealing_is_signed_are_read_once(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pristine log: every sealed segment's sha256 is the one its signed event records."""
    seen = _hashed(monkeypatch)
    rep = _report(log)
    assert rep.intact, rep.problems
    assert seen == []


def test_a_manifest_sha_forged_with_its_unsigned_event_is_caught(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's sha256 and the not yet signed ``segment_sealed`` event agree on a forged value:
    the file is hashed, and the manifest named."""
    sealed, holder, seq = _cut_after_sealed_event(log)
    seen = _hashed(monkeypatch)
    rep = _report(log)
    assert rep.intact, rep.problems  # the cut itself is what a crash leaves: an unsigned tail
    assert seen == [sealed.name]
    forged = hashlib.sha256(b"not the segment").hexdigest()
    (event,) = read_lines(holder)
    obj = orjson.loads(event)
    obj["detail"]["sha256"] = forged
    write_lines(holder, [orjson.dumps(obj)])  # the last entry: no later prev to fix
    m = sealed.with_name(manifest_name(sealed.name))
    man = orjson.loads(m.read_bytes())
    man["sha256"] = forged
    writable(m)
    m.write_bytes(orjson.dumps(man))
    rep = _report(log)
    assert [(p.kind, p.segment) for p in rep.problems] == [("modified", sealed.name)], rep.problems
    assert "sha256" in rep.problems[0].message and rep.problems[0].seq == orjson.loads(read_lines(sealed)[0])["seq"]
    assert rep.writers[0].signed_size <= seq
