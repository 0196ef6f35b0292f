"""Helpers for the real-vLLM integration tests: configs, log reading, SSE parsing, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "vllm-cpu"))

import vllm_cpu_harness  # noqa: E402

harness = vllm_cpu_harness  # re-exported: the tests import the harness from here (after the path is set)

MODEL = "tiny-llama"
API_KEY = "sk-itest-key"


def require_services() -> bool:
    return os.environ.get("VLLM_AUDIT_REQUIRE_SERVICES") == "1"


# ---------------------------------------------------------------- config and keys


def write_config(path: Path, log_dir: Path, extra: str = "") -> Path:
    """A minimal audit config: the log directory plus whatever ``extra`` TOML adds."""
    text = f'[log]\ndir = "{log_dir}"\n'
    if extra:
        text += "\n" + extra.strip() + "\n"
    path.write_text(text)
    return path


def cli(setup: harness.Setup, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``vllm-audit ARGS`` from the vLLM venv (where setup.sh installed this repo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(setup.vllm_audit), *args], capture_output=True, text=True, timeout=timeout, env=env)


def cli_has(setup: harness.Setup, command: str) -> bool:
    """Whether ``vllm-audit COMMAND --help`` works (sub-commands land as the areas finish)."""
    try:
        r = cli(setup, command, "--help", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# ---------------------------------------------------------------- reading the log


def log_entries(log_dir: Path) -> list[dict[str, Any]]:
    """Every entry of every writer's segments, in (writer, segment, line) order."""
    out: list[dict[str, Any]] = []
    for seg in sorted(log_dir.glob("writers/*/seg-*.jsonl")):
        with open(seg, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line being written right now
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def records(log_dir: Path) -> list[dict[str, Any]]:
    return [e for e in log_entries(log_dir) if e.get("record_type") == "inference"]


SCHEMA_PATH = REPO / "src" / "vllm_audit" / "schema" / "audit-record-v1.json"


def assert_schema_valid(rec: dict[str, Any]) -> None:
    """The record validates against the published schema (when jsonschema and the schema exist)."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a test dependency
        return
    if not SCHEMA_PATH.exists():
        return
    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(rec), key=str)
    assert not errors, f"record does not match {SCHEMA_PATH.name}: {[e.message for e in errors[:5]]}; record: {rec}"


def wait_records(
    log_dir: Path,
    pred: Callable[[dict[str, Any]], bool],
    count: int = 1,
    timeout: float = 15.0,
) -> list[dict[str, Any]]:
    """Records matching ``pred``; waits until at least ``count`` exist (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(log_dir) if pred(r)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def record_for(log_dir: Path, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    found = wait_records(log_dir, lambda r: r.get("request_id") == request_id, timeout=timeout)
    assert found, (
        f"no audit record with request_id={request_id!r} in {log_dir}; "
        f"ids present: {[r.get('request_id') for r in records(log_dir)][-20:]}"
    )
    assert len(found) == 1, f"{len(found)} records for request_id={request_id!r}: {found}"
    assert_schema_valid(found[0])
    return found[0]


def record_for_response_id(log_dir: Path, response_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The record whose request_id R gives vLLM's response id ``chatcmpl-R`` / ``cmpl-R``."""
    prefix, _, rid = response_id.partition("-")
    assert prefix in ("chatcmpl", "cmpl") and rid, response_id
    rec = record_for(log_dir, rid, timeout=timeout)
    assert rec.get("response_id", response_id) == response_id, rec
    return rec


# ---------------------------------------------------------------- SSE


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data).decode())
    return events


def sse_json(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    """(JSON chunks, whether the stream ended with [DONE])."""
    ev = sse_events(raw)
    done = bool(ev) and ev[-1] == "[DONE]"
    return [json.loads(e) for e in ev if e != "[DONE]"], done


def stream_text(chunks: Iterable[dict[str, Any]]) -> str:
    parts = []
    for c in chunks:
        for ch in c.get("choices") or []:
            if "delta" in ch:
                parts.append(ch["delta"].get("content") or "")
            else:
                parts.append(ch.get("text") or "")
    return "".join(parts)


def stream_usage(chunks: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    usage = None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
    return usage


def stream_finish_reason(chunks: Iterable[dict[str, Any]]) -> str | None:
    fr = None
    for c in chunks:
        for ch in c.get("choices") or []:
            if ch.get("finish_reason"):
                fr = ch["finish_reason"]
    return fr


def normalize_chunk(c: dict[str, Any], *also: str) -> dict[str, Any]:
    """A chunk without the fields that differ between two identical requests (id, created)."""
    drop = ("id", "created", *also)
    return {k: v for k, v in c.items() if k not in drop}


# ---------------------------------------------------------------- request bodies


def chat_body(content: str = "Hello there, tiny model!", max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1234,
        "ignore_eos": True,
    }
    body.update(kw)
    return body


def completion_body(prompt: str = "def hello(", max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1234,
        "ignore_eos": True,
    }
    body.update(kw)
    return body


def assert_usage_matches(rec: dict[str, Any], usage: dict[str, Any]) -> None:
    got = {k: rec.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    want = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert got == want, f"record usage {got} != vLLM usage {want}; record: {rec}"


# ---------------------------------------------------------------- integrity: keys and verify


@dataclasses.dataclass(frozen=True)
class Integrity:
    """How the servers under test sign their logs, and how to verify them."""

    #: TOML added to every server config (e.g. the [integrity] signing key); "" when unsigned.
    config_toml: str = ""
    public_key: Path | None = None
    #: Why there is no key (keygen not available); "" when there is one.
    reason: str = ""


def make_integrity(setup: harness.Setup, key_dir: Path) -> Integrity:
    """Generate a signing key with ``vllm-audit keygen`` when the CLI has it."""
    if not cli_has(setup, "keygen"):
        return Integrity(reason="`vllm-audit keygen` is not available (yet)")
    key_dir.mkdir(parents=True, exist_ok=True)
    prefix = key_dir / "audit-signing"
    r = cli(setup, "keygen", "--out", str(prefix))
    if r.returncode != 0:
        return Integrity(reason=f"`vllm-audit keygen --out {prefix}` failed: {r.stderr.strip()[-500:]}")
    priv = next(iter(sorted(key_dir.glob("*.key"))), None)
    pub = next(iter(sorted(key_dir.glob("*.pub"))), None)
    if priv is None or pub is None:
        return Integrity(reason=f"keygen wrote no .key/.pub in {key_dir}: {sorted(os.listdir(key_dir))}")
    return Integrity(config_toml=f'[integrity]\nsigning_key = "{priv}"\n', public_key=pub)


def verify_log(setup: harness.Setup, integ: Integrity, log_dir: Path) -> str:
    """``vllm-audit verify LOGDIR --public-key K``; skips (with the reason) while it does not exist."""
    import pytest

    if not cli_has(setup, "verify"):
        pytest.skip("`vllm-audit verify` is not available yet (integrity area); log not verified")
    if integ.public_key is None:
        pytest.skip(f"no signing key: {integ.reason}; log not verified")
    r = cli(setup, "verify", str(log_dir), "--public-key", str(integ.public_key), timeout=300)
    assert r.returncode == 0, (
        f"verify failed ({r.returncode}):\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    )
    return r.stdout
