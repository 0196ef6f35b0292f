"""Compliance export: a tenant's bundle verifies offline; any change, addition or omission is named."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.export.conftest import TenantLog, rec, write_phases
from vllm_audit.config import Config, load_config
from vllm_audit.export.bundle import build_bundle
from vllm_audit.export.standalone import main as verify_main
from vllm_audit.integrity.keys import load_public_keys

_VENV: dict[str, Path] = {}


def _config(log: TenantLog) -> Config:
    return load_config(None, {"log": {"dir": str(log.log_dir)}, "integrity": {"signing_key": str(log.key)}})


def _export(log: TenantLog, out: Path) -> Path:
    res = build_bundle(
        _config(log), "acme", log.t_from, log.t_to, out, keys=load_public_keys([log.pub]), grace_seconds=0
    )
    assert res.records == log.acme_in_range
    return out


def _verify(bundle: Path, log: TenantLog, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = verify_main([str(bundle), "--public-key", str(log.pub)])
    got = capsys.readouterr()
    return code, got.out + got.err


def _reseal(bundle: Path) -> None:
    """What a forger does after editing: recompute every hash in MANIFEST.json."""
    m = json.loads((bundle / "MANIFEST.json").read_bytes())
    files = {p.relative_to(bundle).as_posix(): p for p in bundle.rglob("*") if p.is_file()}
    m["files"] = {
        n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in sorted(files.items()) if n != "MANIFEST.json"
    }
    (bundle / "MANIFEST.json").write_bytes(orjson.dumps(m))


def _edit_lines(path: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(x + b"\n" for x in edit(lines)))


def _is_seq(entry_line: bytes, seq: int) -> bool:
    """Is this line of ``windows/<writer>.entries`` (``<flag> <body sha256> <header>``) entry ``seq``?"""
    return entry_line.split(b" ", 2)[2].startswith(b'{"seq":%d,' % seq)


def _withhold(bundle: Path, wid: str, seq: int) -> None:
    """What a dishonest exporter does to leave out one of the tenant's records: drop the record and its
    proof, show its entry as hidden (its real header and body digest, so every root still matches),
    and recompute the manifest."""
    _edit_lines(bundle / "records.jsonl", lambda ls: [x for x in ls if orjson.loads(x)["seq"] != seq])
    _edit_lines(bundle / "proofs.jsonl", lambda ls: [x for x in ls if orjson.loads(x)["seq"] != seq])
    _edit_lines(bundle / f"windows/{wid}.entries", lambda ls: [b"-" + x[1:] if _is_seq(x, seq) else x for x in ls])
    _reseal(bundle)


def _only_cryptography_python(tmp_root: Path) -> Path:
    """A fresh venv holding only ``cryptography`` (pip from the configured index), once per session."""
    if "py" not in _VENV:
        d = tmp_root / "auditor-venv"
        venv.EnvBuilder(with_pip=True).create(d)
        py = d / "bin" / "python"
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "cryptography"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        _VENV["py"] = py
    return _VENV["py"]


def test_a_tenant_export_verifies_offline_with_only_cryptography(
    tenant_log: TenantLog, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The bundle's own verify_bundle.py, run in a venv holding nothing but cryptography, says intact."""
    bundle = _export(tenant_log, tmp_path_factory.mktemp("b") / "bundle")
    py = _only_cryptography_python(tmp_path_factory.getbasetemp())
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert installed <= {"cryptography", "cffi", "pycparser", "pip", "setuptools"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(py), "-I", str(bundle / "verify_bundle.py"), str(bundle), "--public-key", str(tenant_log.pub)],
        capture_output=True,
        text=True,
        cwd=bundle,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "INTACT and complete: tenant acme" in out.stdout and f"{tenant_log.acme_in_range} record(s)" in out.stdout
    # ... and the same file notices a change, in that venv too.
    _edit_lines(bundle / "records.jsonl", lambda ls: [ls[0].replace(b"ticket", b"TICKET"), *ls[1:]])
    _reseal(bundle)
    bad = subprocess.run(
        [str(py), "-I", str(bundle / "verify_bundle.py"), str(bundle), "--public-key", str(tenant_log.pub)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "was changed" in bad.stdout


def test_bundle_holds_every_record_of_the_tenant_in_range_and_nothing_else(
    tenant_log: TenantLog, tmp_path: Path
) -> None:
    bundle = _export(tenant_log, tmp_path / "b")
    recs = [orjson.loads(x) for x in (bundle / "records.jsonl").read_bytes().splitlines()]
    assert {r["org_id"] for r in recs} == {"acme"}
    assert all(tenant_log.t_from <= r["timestamp"] < tenant_log.t_to for r in recs)
    assert sorted(int(r["request_id"].rsplit("-", 1)[1]) for r in recs) == [i for i in range(60, 150) if i % 3]
    summary = json.loads((bundle / "summary.json").read_bytes())
    assert summary["records"] == len(recs) and sum(summary["by_user"].values()) == len(recs)
    assert set(summary["by_status"]) == {"ok", "upstream_error"}
    proofs = (bundle / "proofs.jsonl").read_bytes().splitlines()
    assert len(proofs) == len(recs) and json.loads(proofs[0])["proof"].startswith("c2sp.org/tlog-proof@v1\nindex ")
    assert "quorum none" in (bundle / "policy.tlog-policy").read_text()


def test_changing_deleting_or_adding_a_record_is_named(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _export(tenant_log, tmp_path / "base")
    code0, out0 = _verify(base, tenant_log, capsys)
    assert code0 == 0, out0

    def variant(name: str) -> Path:
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(base), str(d)], check=True)
        return d

    # Changed, and the manifest not updated: the file is named.
    b = variant("changed-file")
    _edit_lines(b / "records.jsonl", lambda ls: [ls[0].replace(b"done", b"DONE"), *ls[1:]])
    code, out = _verify(b, tenant_log, capsys)
    assert code == 1 and "file records.jsonl was changed" in out
    # Changed, manifest recomputed: the record is named by writer and seq.
    b = variant("changed")
    seq = orjson.loads((b / "records.jsonl").read_bytes().splitlines()[3])["seq"]
    _edit_lines(b / "records.jsonl", lambda ls: [*ls[:3], ls[3].replace(b"done", b"DONE"), *ls[4:]])
    _reseal(b)
    code, out = _verify(b, tenant_log, capsys)
    assert code == 1 and f"seq {seq}: the record was changed" in out
    # Deleted from records.jsonl: the window still marks it as the tenant's, so it is missing.
    b = variant("deleted")
    seq = orjson.loads((b / "records.jsonl").read_bytes().splitlines()[5])["seq"]
    _edit_lines(b / "records.jsonl", lambda ls: ls[:5] + ls[6:])
    _reseal(b)
    code, out = _verify(b, tenant_log, capsys)
    assert code == 1 and f"seq {seq}: a record of the tenant is missing from the bundle (dropped)" in out
    # Added: a forged record with a plausible header fits no signed window.
    b = variant("added")
    forged = orjson.loads((b / "records.jsonl").read_bytes().splitlines()[0])
    forged["seq"], forged["request_id"] = 100_000, "req-forged"
    _edit_lines(b / "records.jsonl", lambda ls: [*ls, orjson.dumps(forged)])
    _reseal(b)
    code, out = _verify(b, tenant_log, capsys)
    assert code == 1 and "seq 100000: the record is not in any signed window (added)" in out


def test_dropping_one_of_the_tenants_records_from_the_window_is_named(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Removing a record and its leaf (as if the exporter had left it out) breaks the signed root."""
    bundle = _export(tenant_log, tmp_path / "b")
    first = orjson.loads((bundle / "records.jsonl").read_bytes().splitlines()[2])
    wid, seq = first["writer_id"], first["seq"]
    _edit_lines(bundle / "records.jsonl", lambda ls: ls[:2] + ls[3:])
    _edit_lines(bundle / f"windows/{wid}.entries", lambda ls: [x for x in ls if not _is_seq(x, seq)])
    _edit_lines(bundle / "proofs.jsonl", lambda ls: [x for x in ls if orjson.loads(x)["seq"] != seq])
    _reseal(bundle)
    code, out = _verify(bundle, tenant_log, capsys)
    assert code == 1
    assert f"writer {wid}: seq {seq} missing from the window (dropped)" in out


def test_a_key_that_did_not_sign_is_refused(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vllm_audit.integrity.keys import write_keypair

    bundle = _export(tenant_log, tmp_path / "b")
    write_keypair(tmp_path / "other", "vllm-audit/ops-test")
    capsys.readouterr()
    assert verify_main([str(bundle), "--public-key", str(tmp_path / "other.pub")]) == 1
    assert "not signed by a trusted key" in capsys.readouterr().out


def test_tar_output_and_the_cli_export_is_an_audited_event(tenant_log: TenantLog, tmp_path: Path) -> None:
    out = tmp_path / "acme.tar"
    run = [sys.executable, "-m", "vllm_audit.cli"]
    base = ["--log-dir", str(tenant_log.log_dir)]
    r = subprocess.run(
        [
            *run,
            "export",
            *base,
            "--org",
            "acme",
            "--from",
            tenant_log.t_from,
            "--to",
            tenant_log.t_to,
            "--out",
            str(out),
            "--public-key",
            str(tenant_log.pub),
            "--grace-seconds",
            "0",
            "--reason",
            "case 7",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    v = subprocess.run(
        [*run, "verify-bundle", str(out), "--public-key", str(tenant_log.pub)], capture_output=True, text=True
    )
    assert v.returncode == 0, v.stdout
    lines = b"".join(p.read_bytes() for p in tenant_log.log_dir.glob("writers/*/seg-*.jsonl"))
    events = [orjson.loads(x) for x in lines.splitlines() if b'"export.created"' in x]
    assert len(events) == 1 and events[0]["detail"]["records"] == tenant_log.acme_in_range
    assert events[0]["detail"]["reason"] == "case 7"
    bad = subprocess.run(
        [*run, "verify-bundle", str(tmp_path / "nope.tar"), "--public-key", str(tenant_log.pub)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_an_erased_tenant_still_exports_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Crypto-shredded records stay ciphertext; the summary says the tenant was erased."""
    from vllm_audit.integrity.keys import write_keypair

    write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    log = TenantLog(tmp_path / "log", tmp_path / "ops.pub", tmp_path / "ops.key")
    enc = {"input_prompt": None, "input_prompt_enc": {"v": 1, "kid": "acme-1", "ct": "c2VjcmV0IGNpcGhlcnRleHQ="}}
    erase = {"record_type": "event", "event": "privacy.erase", "org_id": "acme", "detail": {"org_id": "acme"}}
    write_phases(log, [[rec(0, "acme")], [rec(i, "acme", **enc) for i in range(1, 30)] + [erase], [rec(40, "acme")]])
    bundle = build_bundle(
        _config(log), "acme", log.t_from, log.t_to, tmp_path / "b", keys=load_public_keys([log.pub]), grace_seconds=0
    ).out
    summary = json.loads((bundle / "summary.json").read_bytes())
    assert summary["erased"] and summary["encrypted_records"] == 29
    assert "erased by crypto-shredding" in (bundle / "SUMMARY.md").read_text()
    assert b"c2VjcmV0IGNpcGhlcnRleHQ=" in (bundle / "records.jsonl").read_bytes()
    assert _verify(bundle, log, capsys)[0] == 0


def test_a_withheld_record_of_the_tenant_is_named(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dishonest exporter: one of the tenant's records moved out of records.jsonl and shown as a
    hidden entry (its true header and digest: every leaf, link and signed root still holds). Its
    org_tag is the tenant's for that writer and seq, so the verifier names it as withheld."""
    bundle = _export(tenant_log, tmp_path / "b")
    victim = orjson.loads((bundle / "records.jsonl").read_bytes().splitlines()[4])
    wid, seq = victim["writer_id"], victim["seq"]
    _withhold(bundle, wid, seq)
    code, out = _verify(bundle, tenant_log, capsys)
    assert code == 1, out
    assert f"seq {seq} of writer {wid} is tenant acme's and was withheld" in out
    problems = [x for x in out.splitlines() if "PROBLEM" in x]
    assert len(problems) == 1, out  # the roots still match: the tag is what catches it
    assert f"{tenant_log.acme_in_range - 1} record(s)" in out


@pytest.mark.parametrize("part", ["org_tag", "seq", "prev"])
def test_an_altered_header_of_a_hidden_entry_is_named(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str
) -> None:
    """A hidden entry's header is what its leaf is over: changing its tag (to pass a withheld record off
    as another tenant's), its seq or its prev breaks the chain at that entry and the signed root."""
    bundle = _export(tenant_log, tmp_path / "b")
    wid = json.loads((bundle / "MANIFEST.json").read_bytes())["writers"][0]
    path = bundle / f"windows/{wid}.entries"
    lines = path.read_bytes().splitlines()
    k = next(i for i, x in enumerate(lines) if i > 3 and x.startswith(b"- ") and i + 1 < len(lines))
    flag, digest, header = lines[k].split(b" ", 2)
    seq = int(header[7 : header.index(b",")])
    if part == "org_tag":
        at = header.index(b'"org_tag":"') + 11
        new = header[:at] + b"0" * 32 + header[at + 32 :]
    elif part == "seq":
        new = header.replace(b'{"seq":%d,' % seq, b'{"seq":%d,' % (seq + 1000), 1)
    else:
        at = header.index(b'"prev":"') + 8
        new = header[:at] + b"f" * 64 + header[at + 64 :]
    assert new != header
    lines[k] = b" ".join((flag, digest, new))
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    _reseal(bundle)
    code, out = _verify(bundle, tenant_log, capsys)
    assert code == 1, out
    assert "does not reproduce the signed root" in out
    if part == "org_tag":
        assert f"writer {wid} seq {seq}: its entry does not hash to the prev that seq {seq + 1} records" in out
    elif part == "seq":
        assert f"writer {wid} seq {seq}: the entry header says seq {seq + 1000} (altered)" in out
    else:
        assert f"writer {wid} seq {seq - 1}: its entry does not hash to the prev that seq {seq} records" in out


def test_the_tenants_entries_outside_the_range_are_revealed_as_context(
    tenant_log: TenantLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A window ending at a checkpoint after the range holds later records of the tenant: their tag is the
    tenant's, so they are revealed (context.jsonl), not counted as records of the range; hiding one is named."""
    res = build_bundle(
        _config(tenant_log),
        "acme",
        tenant_log.t_from,
        tenant_log.t_to,
        tmp_path / "b",
        keys=load_public_keys([tenant_log.pub]),
        grace_seconds=3600,  # no checkpoint that late: the window runs to the newest one
    )
    assert res.records == tenant_log.acme_in_range
    ctx = [orjson.loads(x) for x in (tmp_path / "b" / "context.jsonl").read_bytes().splitlines()]
    assert sorted(int(r["request_id"].rsplit("-", 1)[1]) for r in ctx) == [i for i in range(150, 200) if i % 3]
    assert res.summary["context_entries"] == len(ctx)
    assert _verify(tmp_path / "b", tenant_log, capsys)[0] == 0
    wid, seq = ctx[0]["writer_id"], ctx[0]["seq"]
    _edit_lines(tmp_path / "b" / "context.jsonl", lambda ls: ls[1:])
    _edit_lines(
        tmp_path / "b" / f"windows/{wid}.entries", lambda ls: [b"-" + x[1:] if _is_seq(x, seq) else x for x in ls]
    )
    _reseal(tmp_path / "b")
    code, out = _verify(tmp_path / "b", tenant_log, capsys)
    assert code == 1 and f"seq {seq} of writer {wid} is tenant acme's and was withheld" in out


def test_an_entry_whose_tag_does_not_match_its_org_is_refused_by_the_exporter(tmp_path: Path) -> None:
    """A writer that sealed a tenant's record under another tenant's tag (a fault) would hide it from
    every export: the exporter checks the tag of every entry naming the tenant and refuses."""
    from vllm_audit.export.bundle import ExportError
    from vllm_audit.integrity.chain import Chain
    from vllm_audit.integrity.config import IntegrityConfig
    from vllm_audit.integrity.keys import write_keypair

    write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    log = TenantLog(tmp_path / "log", tmp_path / "ops.pub", tmp_path / "ops.key")
    write_phases(log, [[rec(0, "acme")], [rec(i, "acme") for i in range(1, 5)], [rec(9, "acme")]])
    chain = Chain(log.log_dir, IntegrityConfig(signing_key=str(log.key)))
    bad = dict(rec(7, "acme"), timestamp=log.t_from)
    chain.append([*chain.pending_events(), (orjson.dumps(bad), "globex")])  # the pair's org is wrong
    seq = chain.next_seq - 1
    chain.sync()
    chain.checkpoint()
    wid = chain.writer_id
    chain.close()
    with pytest.raises(ExportError, match=f"writer {wid} entry {seq}: its org_tag does not match its org_id"):
        build_bundle(_config(log), "acme", log.t_from, "2999-01-01T00:00:00.000Z", tmp_path / "b", keys=[])


def test_bad_arguments_are_named(tenant_log: TenantLog, tmp_path: Path) -> None:
    from vllm_audit.export.bundle import ExportError

    for org, t_from, t_to, what in (
        ("acme", tenant_log.t_from, "May 2026", "--to 'May 2026' is not an ISO 8601 time"),
        ("acme", "yesterday", tenant_log.t_to, "--from 'yesterday' is not an ISO 8601 time"),
        ("", tenant_log.t_from, tenant_log.t_to, "--org must name a tenant"),
    ):
        with pytest.raises(ExportError, match=what):
            build_bundle(_config(tenant_log), org, t_from, t_to, tmp_path / "b", keys=[])
