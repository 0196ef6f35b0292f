"""A third-party C2SP verifier accepts the bundle's signed checkpoints and proofs.

The verifier is ``aics-tlog`` 0.2.1 from PyPI (pure Python: c2sp.org/signed-note,
c2sp.org/tlog-checkpoint, RFC 9162 inclusion and consistency proofs), installed by
scripts/services.d/aics-tlog.sh into its own venv (it needs Python >= 3.12; the project runs on
3.11) and run there in isolated mode, so none of our code is on its path. It has no parser for
c2sp.org/tlog-proof texts, so the driver below splits each proof text along that spec (header
lines, hashes, a blank line, the checkpoint note) and hands the pieces to aics-tlog's
``parse_note``/``verify_checkpoint``/``verify_inclusion``/``verify_consistency``.

Leaf hashes come from our own reader of the source log (``LogReader`` entries, whose leaf rule is
the codec's), never from a hand-coded hashing rule, and each record in the bundle must be the very
line the log holds at that seq.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, TypedDict

import pytest

from tests.conftest import need_service
from tests.export.conftest import TenantLog
from vllm_audit.config import load_config
from vllm_audit.export.bundle import build_bundle
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import LogReader

VENV = Path(os.environ.get("VLLM_AUDIT_AICS_VENV", Path.home() / ".cache/vllm-audit/aics-tlog-venv"))

DRIVER = r'''
import base64, json, sys
import aics_tlog
from aics_tlog import parse_note, parse_vkey, verify_checkpoint, verify_consistency, verify_inclusion
from aics_tlog.checkpoint import parse_checkpoint

assert aics_tlog.__version__ == "0.2.1", aics_tlog.__version__
job = json.load(sys.stdin)
key = parse_vkey(job["vkey"])

def checkpoint(note_text):
    note = parse_note(note_text)
    res = verify_checkpoint(note, key)
    return res, parse_checkpoint(note.text)

def tlog_proof(text):
    """c2sp.org/tlog-proof@v1: header lines, base64 hashes, a blank line, then the checkpoint note."""
    head, sep, note = text.partition("\n\n")
    lines = head.split("\n")
    if not sep or lines[0] != "c2sp.org/tlog-proof@v1":
        raise ValueError("not a c2sp.org/tlog-proof@v1 text")
    rest = lines[1:]
    if rest and rest[0].startswith("extra "):
        rest = rest[1:]
    if not rest or not rest[0].startswith("index "):
        raise ValueError("no index line")
    return int(rest[0][6:]), [base64.b64decode(h, validate=True) for h in rest[1:]], note

out = {"inclusion": [], "consistency": []}
for item in job["inclusion"]:
    index, path, note = tlog_proof(item["proof"])
    res, cp = checkpoint(note)
    out["inclusion"].append({
        "index": index,
        "log_ok": res.log_ok,
        "error": res.error,
        "origin": cp.origin,
        "size": cp.size,
        "included": verify_inclusion(bytes.fromhex(item["leaf"]), index, cp.size, path, cp.root),
    })
for item in job["consistency"]:
    old, old_cp = checkpoint(item["old"])
    new, new_cp = checkpoint(item["new"])
    proof = [bytes.fromhex(h) for h in item["proof"]]
    out["consistency"].append({
        "old_ok": old.log_ok, "new_ok": new.log_ok, "old_size": old_cp.size, "new_size": new_cp.size,
        "consistent": verify_consistency(old_cp.size, new_cp.size, old_cp.root, new_cp.root, proof),
    })
print(json.dumps(out))
'''


class InclusionJob(TypedDict):
    writer_id: str
    leaf: str
    proof: str


class ConsistencyJob(TypedDict):
    old: str
    new: str
    proof: list[str]


def _third_party(vkey: str, inclusion: list[InclusionJob], consistency: list[ConsistencyJob]) -> dict[str, Any]:
    py = VENV / "bin" / "python"
    need_service(py.exists(), f"aics-tlog venv {VENV} (run scripts/services.d/aics-tlog.sh)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = json.dumps({"vkey": vkey, "inclusion": inclusion, "consistency": consistency})
    r = subprocess.run(
        [str(py), "-I", "-c", DRIVER], input=job, capture_output=True, text=True, env=env, timeout=120, cwd=VENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.fixture
def bundle(tenant_log: TenantLog, tmp_path: Path) -> Path:
    config = load_config(
        None, {"log": {"dir": str(tenant_log.log_dir)}, "integrity": {"signing_key": str(tenant_log.key)}}
    )
    out = tmp_path / "bundle"
    res = build_bundle(
        config,
        "acme",
        tenant_log.t_from,
        tenant_log.t_to,
        out,
        keys=load_public_keys([tenant_log.pub]),
        grace_seconds=0,
    )
    assert res.records == tenant_log.acme_in_range >= 20
    return out


def _jobs(bundle: Path, log_dir: Path) -> tuple[str, list[InclusionJob], list[ConsistencyJob]]:
    (vkey_file,) = (bundle / "keys").glob("*.pub")
    records = (bundle / "records.jsonl").read_bytes().split(b"\n")[:-1]
    proofs = [json.loads(x) for x in (bundle / "proofs.jsonl").read_bytes().split(b"\n")[:-1]]
    assert len(proofs) == len(records)
    reader = LogReader(log_dir)
    inclusion: list[InclusionJob] = []
    for line, p in zip(records, proofs, strict=True):
        entry = next(reader.entries(p["writer_id"], p["seq"]))
        assert entry.seq == p["seq"] and entry.line == line  # the bundle's record is the stored line at that seq
        inclusion.append({"writer_id": p["writer_id"], "leaf": entry.leaf_hex, "proof": p["proof"]})
    consistency: list[ConsistencyJob] = []
    for w in (bundle / "windows").glob("*.json"):
        win = json.loads(w.read_bytes())
        if win["start_checkpoint"]:
            consistency.append(
                {"old": win["start_checkpoint"], "new": win["end_checkpoint"], "proof": win["consistency_proof"]}
            )
    return vkey_file.read_text().strip(), inclusion, consistency


def test_aics_tlog_accepts_our_signed_checkpoints_inclusion_and_consistency_proofs(
    bundle: Path, tenant_log: TenantLog
) -> None:
    vkey, inclusion, consistency = _jobs(bundle, tenant_log.log_dir)
    got = _third_party(vkey, inclusion, consistency)
    assert len(got["inclusion"]) == len(inclusion) == tenant_log.acme_in_range
    for job, res in zip(inclusion, got["inclusion"], strict=True):
        assert res["log_ok"] and res["error"] is None, res  # C2SP signed-note, Ed25519, our vkey
        assert res["included"], (res, job["leaf"])  # RFC 6962 inclusion against the signed root
        assert res["origin"].endswith("/" + job["writer_id"]) and res["index"] < res["size"]
    assert consistency and all(c["old_ok"] and c["new_ok"] and c["consistent"] for c in got["consistency"])
    assert all(c["old_size"] < c["new_size"] for c in got["consistency"])


def test_aics_tlog_rejects_a_wrong_leaf_a_changed_checkpoint_and_a_foreign_key(
    bundle: Path, tenant_log: TenantLog, tmp_path: Path
) -> None:
    """The same driver says no when the guarantee is broken: the acceptance above means something."""
    vkey, inclusion, consistency = _jobs(bundle, tenant_log.log_dir)
    a, b = inclusion[0], inclusion[1]
    wrong_leaf: InclusionJob = {**a, "leaf": b["leaf"]}  # another record's leaf at a's index
    head, _, note = a["proof"].partition("\n\n")
    origin, size, rest = note.split("\n", 2)
    forged: InclusionJob = {**a, "proof": f"{head}\n\n{origin}\n{int(size) + 1}\n{rest}"}
    got = _third_party(vkey, [wrong_leaf, forged], [{**consistency[0], "proof": consistency[0]["proof"][1:]}])
    assert got["inclusion"][0]["log_ok"] and not got["inclusion"][0]["included"]
    assert not got["inclusion"][1]["log_ok"] and "failed verification" in got["inclusion"][1]["error"]
    assert not got["consistency"][0]["consistent"]
    other = write_keypair(tmp_path / "other", "vllm-audit/ops-test")  # same name, different key
    foreign = _third_party(other.verifier.vkey(), [a], [])
    assert not foreign["inclusion"][0]["log_ok"] and "no signature from log key" in foreign["inclusion"][0]["error"]
