"""Helpers to write real logs and to tamper with them the way an attacker would."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.integrity.chain import Chain, leaf_hash, list_segments, manifest_name
from vllm_audit.integrity.checkpoint import (
    CHECKPOINTS_FILE,
    Checkpoint,
    note_line,
    parse_body,
    parse_note_line,
    sign_checkpoint,
    split_note,
)
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import SigningKey, load_signing_key
from vllm_audit.integrity.merkle import CompactRange, root_of


def record(i: int) -> dict[str, Any]:
    """A realistic (redacted) inference record."""
    return {
        "record_type": "inference",
        "schema_version": 1,
        "timestamp": f"2026-07-01T12:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
        "request_id": f"req-{i:06d}",
        "client_ip": "203.0.113.7",
        "user_id": f"user-{i % 7}",
        "org_id": "acme",
        "auth_status": "authenticated",
        "model_name": "demo-model",
        "route": "/v1/chat/completions",
        "input_prompt": f"Summarise ticket {i} for <EMAIL_ADDRESS>" + " lorem ipsum" * 20,
        "output_response": "The customer asks about an invoice." + " dolor" * 30,
        "prompt_tokens": 50 + i % 13,
        "completion_tokens": 80 + i % 17,
        "total_tokens": 130 + i % 13 + i % 17,
        "latency_ms": 12.5 + i % 10,
        "status": {"http": 200, "outcome": "ok"},
        "finish_reason": "stop",
    }


def write_log(
    log_dir: Path, key: str, n: int = 2000, *, batch: int = 37, anchors: tuple[str, ...] = (), **cfg: Any
) -> str:
    """Write ``n`` records through the real Chain in writer-thread order; returns the writer id."""
    config = IntegrityConfig(
        signing_key=key,
        anchors=anchors,
        **{"segment_max_bytes": 200_000, "checkpoint_every_records": 150, **cfg},
    )
    chain = Chain(log_dir, config)
    i = 0
    while i < n:
        k = min(batch, n - i)
        chain.append(chain.pending_events() + [record(j) for j in range(i, i + k)])
        chain.sync()
        chain.after_commit()
        i += k
    chain.close()
    return chain.writer_id


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vllm_audit.integrity.cli`` (the same handlers the vllm-audit script uses)."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_audit.integrity.cli", *args], capture_output=True, text=True, timeout=120
    )


def writer_dir(log_dir: Path) -> Path:
    (d,) = [p for p in (log_dir / "writers").iterdir() if p.is_dir()]
    return d


def writable(p: Path) -> None:
    os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)


def segments(log_dir: Path) -> list[Path]:
    return [p for _, p in list_segments(writer_dir(log_dir))]


def read_lines(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")[:-1]


def write_lines(p: Path, lines: list[bytes]) -> None:
    writable(p)
    p.write_bytes(b"".join(line + b"\n" for line in lines))


def all_lines(log_dir: Path) -> list[tuple[Path, int, bytes]]:
    return [(p, i, line) for p in segments(log_dir) for i, line in enumerate(read_lines(p))]


def rechain(log_dir: Path, key: SigningKey | None = None, anchors_too: bool = False) -> None:
    """What an attacker without the key does after editing: recompute every prev, leaf and manifest.

    With ``key`` (stolen or the attacker's own), the checkpoints are re-signed too (same sizes and
    times, new roots).
    """
    d = writer_dir(log_dir)
    prev = "0" * 64
    leaves: list[bytes] = []
    new_sha: dict[str, str] = {}
    for seg in segments(log_dir):
        out = []
        for line in read_lines(seg):
            obj = orjson.loads(line)
            obj["prev"] = prev
            detail = obj.get("detail")
            if obj.get("event") == "segment_sealed" and isinstance(detail, dict) and detail.get("segment") in new_sha:
                detail["sha256"] = new_sha[detail["segment"]]
                detail["merkle_root"] = root_of(leaves[: detail["last_seq"] + 1]).hex()
            new = orjson.dumps(obj)
            out.append(new)
            lf = leaf_hash(new)
            leaves.append(lf)
            prev = lf.hex()
        write_lines(seg, out)
        m = seg.with_name(manifest_name(seg.name))
        if m.exists():
            man = orjson.loads(m.read_bytes())
            data = seg.read_bytes()
            man["sha256"] = hashlib.sha256(data).hexdigest()
            man["bytes"] = len(data)
            man["last_leaf"] = prev
            man["merkle_root"] = root_of(leaves).hex()
            man["compact_range"] = [h.hex() for h in _compact(leaves).hashes]
            new_sha[seg.name] = man["sha256"]
            writable(m)
            m.write_bytes(orjson.dumps(man))
    if key is not None:
        resign(d / CHECKPOINTS_FILE, key, leaves)


def _compact(leaves: list[bytes]) -> CompactRange:
    tree = CompactRange()
    tree.extend(leaves)
    return tree


def resign(path: Path, key: SigningKey, leaves: list[bytes]) -> None:
    out = b""
    for raw in path.read_bytes().split(b"\n"):
        if not raw:
            continue
        text, _ = split_note(parse_note_line(raw))
        cp = parse_body(text)
        new = Checkpoint(cp.origin, cp.size, root_of(leaves[: cp.size]), cp.timestamp_ms)
        out += note_line(sign_checkpoint(new, key.signer(), key.name))
    path.write_bytes(out)


def copy_log(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load_key(path: str) -> SigningKey:
    return load_signing_key(path)
