#!/usr/bin/env python3
"""Offline verifier of a vllm-audit compliance export bundle (standard library + ``cryptography``).

This one file is copied into every bundle as ``verify_bundle.py`` so an outside auditor need not
install or trust the vllm-audit package::

    pip install cryptography
    python verify_bundle.py BUNDLE_DIR_OR_TAR --public-key KEY.pub [--public-key OTHER.pub] [--json]

Exit 0: intact and complete for the stated range; 1: not (every problem is named); 2: usage.
What it checks is described in docs/export.md ("What the verifier checks").
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

FORMAT = "vllm-audit-export/v2"
PROOF_HEADER = "c2sp.org/tlog-proof@v1"
EM_DASH = "\u2014"


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


# -- the entry rule (a copy of vllm_audit.integrity.codec's, so this file stands alone) --------
#
# A stored line is  header || body  where the header is
#   {"seq":N,"prev":"<64 hex>","writer_id":"<id>","org_tag":"<32 hex>",     (or ...} for no body)
# Its tlog entry is  header || SHA-256(body)  and its leaf  SHA-256(0x00 || entry)  (RFC 6962).
# org_tag = hex(SHA-256("vllm-audit/org-tag/v1" 0x00 writer_id 0x00 str(seq) 0x00 org_id)[:16]).

TAG_KEY = b'"org_tag":"'
TAG_DOMAIN = b"vllm-audit/org-tag/v1\x00"
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_HEADER = re.compile(
    rb'\{"seq":(0|[1-9][0-9]*),"prev":"([0-9a-f]{64})","writer_id":("(?:[^"\\]|\\.)*"),"org_tag":"([0-9a-f]{32})"[,}]\Z'
)


def header_end(line: bytes) -> int:
    """Offset of the body of a stored line: right after the comma (or brace) that follows org_tag."""
    at = line.find(TAG_KEY)
    return len(line) if at < 0 else min(at + len(TAG_KEY) + 34, len(line))


def entry_leaf(header: bytes, digest: bytes) -> bytes:
    return _sha(b"\x00" + header + digest)


def leaf_hash(line: bytes) -> bytes:
    cut = header_end(line)
    return entry_leaf(line[:cut], _sha(line[cut:]))


def org_tag(writer_id: str, seq: int, org_id: str) -> bytes:
    return (
        hashlib.sha256(b"%b%b\x00%d\x00%b" % (TAG_DOMAIN, writer_id.encode(), seq, org_id.encode()))
        .hexdigest()[:32]
        .encode()
    )


def org_of(rec: dict[str, Any]) -> str:
    org = rec.get("org_id")
    return org if isinstance(org, str) else ""


_WRITER_IDS: dict[bytes, str] = {}


def parse_header(header: bytes) -> tuple[int, str, str, bytes] | None:
    """``(seq, prev hex, writer_id, org_tag)`` of an exact entry header, or None."""
    m = _HEADER.match(header)
    if m is None:
        return None
    raw = m.group(3)
    wid = _WRITER_IDS.get(raw)
    if wid is None:
        try:
            wid = _WRITER_IDS[raw] = str(json.loads(raw))
        except ValueError:
            return None
    return int(m.group(1)), m.group(2).decode(), wid, m.group(4)


def node(left: bytes, right: bytes) -> bytes:
    return _sha(b"\x01" + left + right)


class CompactRange:
    """Roots of the perfect subtrees covering leaves [0, size) (RFC 6962 tree)."""

    def __init__(self, size: int, hashes: list[bytes]) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a compact range of size {size} needs {bin(size).count('1')} hashes")
        self.size, self.hashes = size, list(hashes)

    def append(self, leaf: bytes) -> None:
        n, h = self.size, leaf
        while n & 1:
            h = node(self.hashes.pop(), h)
            n >>= 1
        self.hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return _sha(b"")
        h = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            h = node(left, h)
        return h


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        raise ValueError("index beyond tree size")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ValueError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion proof too short")
    return r


def verify_consistency(m: int, n: int, old: bytes, new: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if m == n:
        return not proof and old == new
    if m == 0:
        return not proof
    if m > n or not proof:
        return False
    if m & (m - 1) == 0:
        proof = [old, *proof]
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old and sr == new


# -- signed notes ---------------------------------------------------------------------------


class Key:
    def __init__(self, line: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        parts = line.strip().split()[0].split("+", 2)
        if len(parts) != 3:
            raise ValueError(f"not a vkey: {line[:60]!r}")
        self.name, key_id, raw = parts[0], bytes.fromhex(parts[1]), base64.b64decode(parts[2], validate=True)
        if raw[:1] != b"\x01" or len(raw) != 33:
            raise ValueError("only Ed25519 vkeys are supported")
        if _sha(self.name.encode() + b"\n" + raw)[:4] != key_id:
            raise ValueError(f"vkey {self.name}: key id does not match the key")
        self.key_id = key_id
        self.public = Ed25519PublicKey.from_public_bytes(raw[1:])
        self.label = f"{self.name}+{key_id.hex()}"

    def verify(self, msg: bytes, sig: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.public.verify(sig, msg)
            return True
        except InvalidSignature:
            return False


def load_keys(paths: list[str]) -> list[Key]:
    keys = []
    for p in paths:
        for line in Path(p).read_text("utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(Key(line))
    return keys


class Checkpoint:
    def __init__(self, origin: str, size: int, root: bytes, time: str) -> None:
        self.origin, self.size, self.root, self.time = origin, size, root, time

    @property
    def writer_id(self) -> str:
        return self.origin.rsplit("/", 1)[-1]


_OPENED: dict[tuple[str, tuple[int, ...]], Checkpoint] = {}


def open_note(note: str, keys: list[Key]) -> Checkpoint:
    """Parse a C2SP checkpoint note; raise ValueError unless a trusted key signed it (cached per note)."""
    cache_key = (note, tuple(id(k) for k in keys))
    got = _OPENED.get(cache_key)
    if got is None:
        got = _OPENED[cache_key] = _open_note(note, keys)
    return got


def _open_note(note: str, keys: list[Key]) -> Checkpoint:
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise ValueError("malformed note")
    text, block = note[: cut + 1], note[cut + 2 :]
    good = False
    for line in block.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH:
            raise ValueError("malformed signature line")
        raw = base64.b64decode(parts[2], validate=True)
        for k in keys:
            if k.name == parts[1] and k.key_id == raw[:4]:
                if not k.verify(text.encode(), raw[4:]):
                    raise ValueError(f"signature by {k.label} does not verify (the checkpoint was altered)")
                good = True
    if not good:
        raise ValueError("checkpoint is not signed by a trusted key")
    lines = text.split("\n")[:-1]
    if len(lines) < 3 or not lines[1].isdigit():
        raise ValueError("malformed checkpoint body")
    ts = next((ln[len("timestamp ") :] for ln in lines[3:] if ln.startswith("timestamp ")), "")
    root = base64.b64decode(lines[2], validate=True)
    if len(root) != 32:
        raise ValueError("checkpoint root is not 32 bytes")
    return Checkpoint(lines[0], int(lines[1]), root, ts)


def parse_tlog_proof(text: str) -> tuple[int, list[bytes], str]:
    """``(index, inclusion path, checkpoint note)`` of a c2sp.org/tlog-proof@v1 text."""
    lines = text.split("\n")
    if lines[0] != PROOF_HEADER:
        raise ValueError("not a c2sp.org/tlog-proof@v1 proof")
    i = 1
    if lines[i].startswith("extra "):
        i += 1
    if not lines[i].startswith("index "):
        raise ValueError("tlog-proof lacks its index line")
    index = int(lines[i][len("index ") :])
    i += 1
    path = []
    while lines[i]:
        path.append(base64.b64decode(lines[i], validate=True))
        i += 1
    return index, path, "\n".join(lines[i + 1 :])


# -- the bundle -----------------------------------------------------------------------------


def read_bundle(path: str) -> dict[str, bytes]:
    p = Path(path)
    files: dict[str, bytes] = {}
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                files[f.relative_to(p).as_posix()] = f.read_bytes()
        return files
    with tarfile.open(p) as tar:
        for m in tar.getmembers():
            if m.isfile():
                fh = tar.extractfile(m)
                name = m.name.split("/", 1)[1] if "/" in m.name else m.name
                files[name] = fh.read() if fh is not None else b""
    return files


def _header(line: bytes) -> tuple[int, str]:
    """``(seq, writer_id)`` of a stored entry line."""
    h = parse_header(line[: header_end(line)])
    if h is None:
        raise ValueError("not a log entry")
    return h[0], h[2]


def verify(files: dict[str, bytes], keys: list[Key]) -> dict[str, Any]:
    problems: list[str] = []
    warnings: list[str] = []
    out: dict[str, Any] = {"problems": problems, "warnings": warnings}
    if "MANIFEST.json" not in files:
        problems.append("MANIFEST.json is missing: not a vllm-audit export bundle")
        return out
    manifest = json.loads(files["MANIFEST.json"])
    if manifest.get("format") != FORMAT:
        problems.append(f"MANIFEST.json is not a {FORMAT} manifest")
        return out
    listed: dict[str, str] = manifest.get("files", {})
    for name, sha in sorted(listed.items()):
        if name not in files:
            problems.append(f"file {name} is listed in MANIFEST.json but missing")
        elif hashlib.sha256(files[name]).hexdigest() != sha:
            problems.append(f"file {name} was changed (its SHA-256 differs from MANIFEST.json)")
    for name in sorted(set(files) - set(listed) - {"MANIFEST.json"}):
        problems.append(f"file {name} is not listed in MANIFEST.json (added)")
    org, t_from, t_to = manifest["org_id"], manifest["from"], manifest["to"]
    out.update(org_id=org, time_from=t_from, time_to=t_to)

    # Records and revealed events, keyed by (writer, seq).
    revealed: dict[tuple[str, int], tuple[str, bytes]] = {}
    for kind, fname in (("record", "records.jsonl"), ("context", "context.jsonl"), ("event", "events.jsonl")):
        for n, line in enumerate(files.get(fname, b"").split(b"\n")):
            if not line:
                continue
            try:
                seq, wid = _header(line)
            except ValueError:
                problems.append(f"{fname} line {n + 1} is not a log entry")
                continue
            if (wid, seq) in revealed:
                problems.append(f"writer {wid} seq {seq}: appears twice in the bundle (a copy was added)")
            revealed[(wid, seq)] = (kind, line)
    proofs: dict[tuple[str, int], str] = {}
    for line in files.get("proofs.jsonl", b"").split(b"\n"):
        if line:
            p = json.loads(line)
            proofs[(p["writer_id"], p["seq"])] = p["proof"]

    records = 0
    seen: set[tuple[str, int]] = set()
    for wid in manifest.get("writers", []):
        name = f"windows/{wid}.json"
        if name not in files:
            problems.append(f"writer {wid}: its window file {name} is missing")
            continue
        w = json.loads(files[name])
        start, end = w["start"], w["end"]
        try:
            end_cp = open_note(w["end_checkpoint"], keys)
            start_cp = open_note(w["start_checkpoint"], keys) if w.get("start_checkpoint") else None
        except ValueError as exc:
            problems.append(f"writer {wid}: {exc}")
            continue
        for cp in filter(None, (start_cp, end_cp)):
            if cp.writer_id != wid:
                problems.append(f"writer {wid}: a checkpoint of log {cp.origin} is used for it")
        if end_cp.size != end or (start_cp is not None and start_cp.size != start) or (start_cp is None and start):
            problems.append(f"writer {wid}: the window {start}..{end} does not match its checkpoints")
            continue
        if start and start_cp is not None and start_cp.time >= t_from:
            problems.append(f"writer {wid}: the window starts at a checkpoint of {start_cp.time}, not before {t_from}")
        if end_cp.time < t_to:
            warnings.append(
                f"writer {wid}: coverage ends at its checkpoint of {end_cp.time}, before {t_to}: "
                "records written after it are not covered"
            )
        cr = CompactRange(start, [bytes.fromhex(h) for h in w["prefix"]])
        if start_cp is not None and cr.root() != start_cp.root:
            problems.append(f"writer {wid}: the prefix does not reproduce the signed root at size {start}")
        expect = start
        prev_hex = "0" * 64 if start == 0 else None  # the leaf before the window is not in the bundle
        wanted: set[int] = set()
        ename = f"windows/{wid}.entries"
        rows: list[tuple[str, bytes, bytes, tuple[int, str, str, bytes]]] = []
        for n, raw in enumerate(files.get(ename, b"").split(b"\n")):
            if not raw:
                continue
            parts = raw.split(b" ", 2)
            ok = len(parts) == 3 and _HEX64.fullmatch(parts[1]) is not None
            h = parse_header(parts[2]) if ok else None
            if h is None:
                problems.append(f"writer {wid}: line {n + 1} of {ename} is not an entry header and digest (altered)")
                continue
            rows.append((parts[0].decode(), bytes.fromhex(parts[1].decode()), parts[2], h))
        for i, (flag, digest, header, (seq, prev, hwid, tag)) in enumerate(rows):
            if seq != expect and i + 1 < len(rows) and rows[i + 1][3][0] == expect + 1:
                # the next entry is where this one should be followed from: this header's seq was altered
                problems.append(f"writer {wid} seq {expect}: the entry header says seq {seq} (altered)")
                seq = expect
            if seq < expect:
                problems.append(f"writer {wid}: seq {seq} appears out of place in the window (added)")
                continue
            if seq > expect:
                what = f"seq {expect}" if seq == expect + 1 else f"seqs {expect}..{seq - 1}"
                problems.append(f"writer {wid}: {what} missing from the window (dropped)")
                expect, prev_hex = seq, None
            if hwid != wid:
                problems.append(f"writer {wid} seq {seq}: the entry header names writer {hwid!r} (altered)")
            if prev_hex is not None and prev != prev_hex:
                problems.append(
                    f"writer {wid} seq {seq - 1}: its entry does not hash to the prev that seq {seq} records "
                    f"(the header or body digest of seq {seq - 1}, or the prev of seq {seq}, was altered)"
                )
            leaf = entry_leaf(header, digest)
            cr.append(leaf)
            prev_hex = leaf.hex()
            expect = seq + 1
            key = (wid, seq)
            mine = tag == org_tag(wid, seq, org)
            if flag == "-":
                if mine:
                    problems.append(
                        f"writer {wid} seq {seq}: shown as hidden, but its org_tag is tenant {org}'s: "
                        f"seq {seq} of writer {wid} is tenant {org}'s and was withheld"
                    )
                continue
            want = {"R": "record", "C": "context", "E": "event"}.get(flag)
            got = revealed.get(key)
            if want is None or got is None or got[0] != want:
                what = {"R": "a record of the tenant", "C": "an entry of the tenant", "E": "a revealed event"}.get(
                    flag, f"an entry flagged {flag!r}"
                )
                problems.append(f"writer {wid} seq {seq}: {what} is missing from the bundle (dropped)")
                continue
            seen.add(key)
            line = got[1]
            cut = header_end(line)
            if line[:cut] != header or _sha(line[cut:]) != digest:
                problems.append(f"writer {wid} seq {seq}: the {want} was changed (its hash is not the logged one)")
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                problems.append(f"writer {wid} seq {seq}: the {want} is not a JSON object")
                continue
            if want == "event":
                if tag != org_tag(wid, seq, org_of(rec)):
                    problems.append(f"writer {wid} seq {seq}: the event's org_tag is not the tag of its org_id")
                elif org_of(rec) not in ("", org):
                    problems.append(f"writer {wid} seq {seq}: the event is of tenant {org_of(rec)!r}")
                continue
            if rec.get("org_id") != org:
                problems.append(f"writer {wid} seq {seq}: the {want} is of tenant {rec.get('org_id')!r}")
                continue
            if not mine:
                problems.append(f"writer {wid} seq {seq}: the {want}'s org_tag is not tenant {org}'s")
                continue
            ts = rec.get("timestamp")
            in_range = rec.get("record_type") in ("inference", "alert") and isinstance(ts, str) and t_from <= ts < t_to
            if want == "record":
                wanted.add(seq)
                if not in_range:
                    problems.append(f"writer {wid} seq {seq}: the record's time {ts} is outside the range")
            elif in_range:
                problems.append(f"writer {wid} seq {seq}: a record of the range is filed as context (not counted)")
        if expect != end:
            problems.append(
                f"writer {wid}: the window ends at seq {expect}, its checkpoint says {end} (dropped entries)"
            )
        if cr.size == end and cr.root() != end_cp.root:
            problems.append(
                f"writer {wid}: the window does not reproduce the signed root at size {end} "
                "(an entry was changed, dropped or added)"
            )
        proof = [bytes.fromhex(h) for h in w.get("consistency_proof", [])]
        if start_cp is not None and not verify_consistency(start, end, start_cp.root, end_cp.root, proof):
            problems.append(f"writer {wid}: the consistency proof {start} -> {end} does not verify")
        for seq in sorted(wanted):
            text = proofs.get((wid, seq))
            if text is None:
                problems.append(f"writer {wid} seq {seq}: no inclusion proof")
                continue
            try:
                index, path, note = parse_tlog_proof(text)
                cp = open_note(note, keys)
                line = revealed[(wid, seq)][1]
                if index != seq or cp.writer_id != wid:
                    raise ValueError("the proof is for another entry")
                if root_from_inclusion(index, cp.size, leaf_hash(line), path) != cp.root:
                    raise ValueError("the inclusion path does not lead to the signed root")
            except (ValueError, IndexError) as exc:
                problems.append(f"writer {wid} seq {seq}: inclusion proof does not verify: {exc}")
        records += len(wanted)
    for (wid, seq), (kind, _line) in sorted(revealed.items()):
        if (wid, seq) not in seen:
            problems.append(f"writer {wid} seq {seq}: the {kind} is not in any signed window (added)")
    out["records"] = records
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="verify_bundle.py", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="bundle directory or .tar file")
    ap.add_argument("--public-key", action="append", required=True, help="trusted checkpoint key (.pub), repeatable")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        keys = load_keys(args.public_key)
        files = read_bundle(args.bundle)
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"verify_bundle: error: {exc}", file=sys.stderr)
        return 2
    try:
        res = verify(files, keys)
    except (ValueError, KeyError, TypeError) as exc:  # a malformed bundle is a failed check, named
        res = {"problems": [f"the bundle is malformed: {type(exc).__name__}: {exc}"], "warnings": []}
    ok = not res["problems"]
    if args.json:
        print(json.dumps(dict(res, intact=ok), indent=2))
    else:
        head = "INTACT and complete" if ok else f"NOT INTACT ({len(res['problems'])} problem(s))"
        print(
            f"{args.bundle}: {head}: tenant {res.get('org_id')} {res.get('time_from')} .. {res.get('time_to')}, "
            f"{res.get('records', 0)} record(s)"
        )
        for w in res["warnings"]:
            print(f"  note: {w}")
        for p in res["problems"]:
            print(f"  PROBLEM: {p}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
