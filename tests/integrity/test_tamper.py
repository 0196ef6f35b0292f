"""Tamper suite: every attack on a real log is caught by `vllm-audit verify`, named, and exits 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from vllm_audit.integrity import verify as verify_mod
from vllm_audit.integrity.codec import leaf_hash
from vllm_audit.integrity.keys import load_public_keys, write_keypair

from ._logtools import (
    all_lines,
    cli,
    copy_log,
    load_key,
    read_lines,
    rechain,
    segments,
    writable,
    write_lines,
    write_log,
    writer_dir,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pristine")
    write_keypair(base / "k", "test/operator")
    (base / "anchor").mkdir()
    write_log(base / "log", str(base / "k.key"), 2000, anchors=(str(base / "anchor"),))
    return base, base / "log"


@pytest.fixture()
def log(pristine: tuple[Path, Path], tmp_path: Path) -> Path:
    base, src = pristine
    for name in ("k.key", "k.pub"):
        (tmp_path / name).write_bytes((base / name).read_bytes())
    os.chmod(tmp_path / "k.key", 0o600)
    copy_log(base / "anchor", tmp_path / "anchor")
    return copy_log(src, tmp_path / "log")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_mod, "_CHUNK_BYTES", 16 * 1024)


def verify(log: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run the CLI, and check that the parallel chunked scan reports exactly the same problems."""
    r = cli("verify", str(log), "--public-key", str(log.parent / "k.pub"), "--json", *extra)
    assert r.returncode in (0, 1), r.stderr
    rep = json.loads(r.stdout)
    anchors = [extra[i + 1] for i, a in enumerate(extra) if a == "--anchor"]
    par = verify_mod.verify_log(log, load_public_keys([log.parent / "k.pub"]), anchors, workers=2)
    assert [p.to_dict() for p in par.problems] == rep["problems"]
    return r.returncode, rep


def kinds(report: dict[str, Any]) -> list[str]:
    return [p["kind"] for p in report["problems"]]


def middle(log: Path) -> Path:
    segs = segments(log)
    return segs[len(segs) // 2]


def test_untouched(log: Path) -> None:
    """An untouched log verifies (exit 0) and the human summary names writers, records, checkpoints."""
    code, rep = verify(log)
    assert code == 0, rep["problems"]
    assert rep["summary"]["records"] == 2000 and rep["summary"]["checkpoints"] > 10
    r = cli("verify", str(log), "--public-key", str(log.parent / "k.pub"))
    assert r.returncode == 0 and "INTACT" in r.stdout and "records: 2000" in r.stdout


def test_flip_one_byte(log: Path) -> None:
    """Flipping one byte inside a record is reported as modified at that record."""
    seg = middle(log)
    lines = read_lines(seg)
    line = bytearray(lines[5])
    pos = line.index(b"lorem")
    line[pos] ^= 0x01
    lines[5] = bytes(line)
    write_lines(seg, lines)
    seq = orjson.loads(lines[5])["seq"]
    code, rep = verify(log)
    assert code == 1
    first = rep["problems"][0]
    assert first["kind"] == "modified" and first["seq"] == seq


@pytest.mark.parametrize(("tag", "why"), [(b"0" * 32, "was altered"), (b"G" * 32, "malformed header")])
def test_changed_org_tag(log: Path, tag: bytes, why: str) -> None:
    """The tenant tag is in the hashed header: another valid tag (passing the entry off as another
    tenant's) is reported as modified at that entry; a tag that is not 32 lowercase hex is a
    malformed header at that entry."""
    seg = middle(log)
    lines = read_lines(seg)
    at = lines[5].index(b'"org_tag":"') + 11
    lines[5] = lines[5][:at] + tag + lines[5][at + 32 :]
    write_lines(seg, lines)
    seq = orjson.loads(lines[5])["seq"]
    code, rep = verify(log)
    assert code == 1
    first = rep["problems"][0]
    assert first["kind"] == "modified" and first["seq"] == seq and why in first["message"]


def test_delete_record(log: Path) -> None:
    """Deleting one record is reported as missing (a gap) at its sequence number."""
    seg = middle(log)
    lines = read_lines(seg)
    seq = orjson.loads(lines[7])["seq"]
    del lines[7]
    write_lines(seg, lines)
    code, rep = verify(log)
    assert code == 1
    assert rep["problems"][0]["kind"] == "missing" and rep["problems"][0]["seq"] == seq


def test_insert_forged_record(log: Path) -> None:
    """A forged record with a valid-looking seq and prev is reported as inserted."""
    seg = middle(log)
    lines = read_lines(seg)
    prev_obj = orjson.loads(lines[9])
    forged = orjson.loads(lines[10])
    forged["request_id"] = "forged-1"
    forged["prev"] = leaf_hash(lines[9]).hex()
    assert forged["seq"] == prev_obj["seq"] + 1
    lines.insert(10, orjson.dumps(forged))
    write_lines(seg, lines)
    code, rep = verify(log)
    assert code == 1
    assert rep["problems"][0]["kind"] == "inserted" and rep["problems"][0]["seq"] == forged["seq"]


def test_swap_two_records(log: Path) -> None:
    """Swapping two adjacent records is reported as reordered."""
    seg = middle(log)
    lines = read_lines(seg)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(seg, lines)
    code, rep = verify(log)
    assert code == 1
    assert kinds(rep) == ["reordered"], rep["problems"]


def test_truncate_tail(log: Path) -> None:
    """Cutting whole records off the end is reported as truncated against the last signed checkpoint."""
    seg = segments(log)[-1]
    lines = read_lines(seg)
    write_lines(seg, lines[:-10])
    code, rep = verify(log)
    assert code == 1
    assert "truncated" in kinds(rep)


def test_truncate_mid_record(log: Path) -> None:
    """Cutting the file in the middle of a record is reported as torn and truncated."""
    seg = segments(log)[-1]
    writable(seg)
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 4000])
    code, rep = verify(log)
    assert code == 1
    assert {"torn", "truncated"} <= set(kinds(rep))


def test_delete_segment(log: Path) -> None:
    """Deleting a whole segment (with or without its manifest) is reported as segment_missing."""
    seg = middle(log)
    seg.unlink()
    code, rep = verify(log)
    assert code == 1 and rep["problems"][0]["kind"] == "segment_missing"
    seg.with_name(seg.name.replace(".jsonl", ".manifest.json")).unlink()
    code, rep = verify(log)
    assert code == 1 and rep["problems"][0]["kind"] == "segment_missing"


def test_edit_and_rechain_without_key(log: Path) -> None:
    """Editing a record and recomputing the whole chain and manifests is caught by the signed roots."""
    seg = middle(log)
    lines = read_lines(seg)
    obj = orjson.loads(lines[2])
    obj["user_id"] = "someone-else"
    lines[2] = orjson.dumps(obj)
    write_lines(seg, lines)
    rechain(log)
    code, rep = verify(log)
    assert code == 1
    assert rep["problems"][0]["kind"] == "modified"
    assert "Merkle root" in rep["problems"][0]["message"]


def test_checkpoints_signed_by_another_key(log: Path, tmp_path: Path) -> None:
    """Rewritten history re-signed with the attacker's own key fails the signature check."""
    seg = middle(log)
    lines = read_lines(seg)
    del lines[4]
    write_lines(seg, lines)
    other = write_keypair(tmp_path / "evil", "test/operator")
    rechain(log, key=other)
    code, rep = verify(log)
    assert code == 1
    assert set(kinds(rep)) >= {"bad_signature"}


def test_rewrite_with_stolen_key_caught_by_anchor(log: Path) -> None:
    """With the real key stolen, a consistent rewrite passes alone but disagrees with the anchored copies."""
    seg = middle(log)
    lines = read_lines(seg)
    obj = orjson.loads(lines[1])
    obj["output_response"] = "nothing to see here"
    lines[1] = orjson.dumps(obj)
    write_lines(seg, lines)
    rechain(log, key=load_key(str(log.parent / "k.key")))
    code, _ = verify(log)
    assert code == 0  # the threat model: a stolen key defeats a log checked on its own
    code, rep = verify(log, "--anchor", str(log.parent / "anchor"))
    assert code == 1
    assert rep["problems"][0]["kind"] == "anchor_mismatch"


def test_deleted_writer_caught_by_anchor(log: Path) -> None:
    """Deleting a writer's whole directory is reported when an anchor still holds its checkpoints."""
    import shutil

    d = writer_dir(log)
    for p in d.rglob("*"):
        writable(p)
    shutil.rmtree(d)
    code, rep = verify(log, "--anchor", str(log.parent / "anchor"))
    assert code == 1 and "segment_missing" in kinds(rep)


def test_every_record_line_matters(log: Path) -> None:
    """Any single-byte change in any of several random records is caught."""
    import random

    rnd = random.Random(7)
    lines = all_lines(log)
    for _ in range(5):
        path, idx, line = rnd.choice(lines)
        pos = rnd.randrange(len(line))
        new = bytearray(line)
        new[pos] = (new[pos] + 1) % 256 or 1
        if new[pos] == 10:
            new[pos] = 11
        content = read_lines(path)
        content[idx] = bytes(new)
        write_lines(path, content)
        code, _ = verify(log)
        assert code == 1, (path.name, idx, pos)
        content[idx] = line
        write_lines(path, content)
    assert verify(log)[0] == 0


def test_bad_key_file_exits_2(log: Path) -> None:
    """A missing or malformed public key file exits 2 with one line."""
    r = cli("verify", str(log), "--public-key", str(log.parent / "nope.pub"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    (log.parent / "bad.pub").write_text("garbage\n")
    r = cli("verify", str(log), "--public-key", str(log.parent / "bad.pub"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_proof_verifies_alone_and_fails_after_change(log: Path, tmp_path: Path) -> None:
    """A record's inclusion proof verifies on its own and fails after any change to it."""
    out = tmp_path / "proof.json"
    r = cli("prove", "req-001234", "--log-dir", str(log), "--out", str(out))
    assert r.returncode == 0, r.stderr
    pub = str(log.parent / "k.pub")
    assert cli("verify-proof", str(out), "--public-key", pub).returncode == 0
    proof = json.loads(out.read_text())
    variants = []
    p = dict(proof, record=proof["record"].replace("acme", "acmf"))
    variants.append(p)
    p = dict(proof, leaf_index=proof["leaf_index"] + 1)
    variants.append(p)
    hashes = list(proof["inclusion_proof"])
    hashes[0] = ("0" if hashes[0][0] != "0" else "1") + hashes[0][1:]
    variants.append(dict(proof, inclusion_proof=hashes))
    variants.append(
        dict(proof, checkpoint=proof["checkpoint"].replace("\n", "\n", 1).replace("vllm-audit/", "vllm-audiT/"))
    )
    for i, v in enumerate(variants):
        f = tmp_path / f"bad{i}.json"
        f.write_text(json.dumps(v))
        r = cli("verify-proof", str(f), "--public-key", pub)
        assert r.returncode == 1, (i, r.stdout, r.stderr)


def test_consistency_proof_cli(log: Path, tmp_path: Path) -> None:
    """prove-consistency / verify-consistency between two checkpoints of the writer."""
    from vllm_audit.integrity.proofs import _notes

    sizes = sorted({cp.size for _, cp in _notes(writer_dir(log))})
    out = tmp_path / "c.json"
    wid = writer_dir(log).name
    r = cli(
        "prove-consistency",
        "--log-dir",
        str(log),
        "--writer",
        wid,
        "--old",
        str(sizes[1]),
        "--new",
        str(sizes[-1]),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    pub = str(log.parent / "k.pub")
    assert cli("verify-consistency", str(out), "--public-key", pub).returncode == 0
    doc = json.loads(out.read_text())
    doc["consistency_proof"][0] = "00" * 32
    out.write_text(json.dumps(doc))
    assert cli("verify-consistency", str(out), "--public-key", pub).returncode == 1


_CRASHER = r"""
import sys
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
sys.path.insert(0, sys.argv[3])
from _logtools import record
c = Chain(sys.argv[1], IntegrityConfig(signing_key=sys.argv[2], segment_max_bytes=100_000, checkpoint_every_records=50))
i = 0
print("ready", flush=True)
while True:
    c.append(c.pending_events() + [record(j) for j in range(i, i + 20)])
    c.sync(); c.after_commit(); i += 20
"""


def test_kill_9_then_recovery_verifies(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-write recovers on restart; the torn tail is explained, the log verifies."""
    write_keypair(tmp_path / "k", "test/operator")
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(log), str(tmp_path / "k.key"), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while len(list(log.glob("writers/*/seg-*.jsonl"))) < 3:  # mid-write: several segments in
        assert time.monotonic() < deadline and proc.poll() is None, "the writer made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Make sure there is a torn tail to recover from, whatever instant the kill hit.
    seg = segments(log)[-1]
    manifest = seg.with_name(seg.name.replace(".jsonl", ".manifest.json"))
    if manifest.exists():  # killed right after sealing: tear the first write of the next segment
        nxt = orjson.loads(manifest.read_bytes())["last_seq"] + 1
        seg = seg.with_name(f"seg-{nxt:012d}.jsonl")
    with open(seg, "ab") as f:
        f.write(b'{"seq":999999,"prev":"00')
    write_log(log, str(tmp_path / "k.key"), 100)
    r = cli("verify", str(log), "--public-key", str(tmp_path / "k.pub"), "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 0, rep["problems"]
    assert (writer_dir(log) / "quarantine").is_dir()
