"""Shared test helpers: reading the log, starting a real gateway, free ports."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]


def read_entries(log_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every entry of every writer's segments (complete lines only), in file order."""
    out: list[dict[str, Any]] = []
    for seg in sorted(Path(log_dir).glob("writers/*/seg-*.jsonl")):
        for line in seg.read_bytes().splitlines():
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    pass
    return out


def read_records(log_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [e for e in read_entries(log_dir) if e.get("record_type") == "inference"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except Exception:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def gateway(
    tmp_path: Path,
    *args: str,
    config: str | None = None,
    port: int | None = None,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Any = None,
) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """Run ``vllm-audit serve`` as a real subprocess; yields (base_url, log_dir, process)."""
    port = port or free_port()
    log_dir = log_dir or tmp_path / "log"
    cmd = [sys.executable, "-m", "vllm_audit.cli", "serve", "--port", str(port), "--log-dir", str(log_dir), *args]
    if config is not None:
        cfg = tmp_path / f"gw-{port}.toml"
        cfg.write_text(config)
        cmd += ["--config", str(cfg)]
    logf = open(tmp_path / f"gw-{port}.log", "wb")
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec_fn)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(base + "/healthz", proc=proc)
        except Exception:
            logf.flush()
            print((tmp_path / f"gw-{port}.log").read_text(errors="replace")[-4000:])
            raise
        yield base, log_dir, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.close()


def log_text(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("gw-*.log"))


def verify_log(log_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``vllm-audit verify`` on a gateway's log with its generated public key."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_audit.cli",
            "verify",
            str(log_dir),
            "--public-key",
            str(log_dir / "keys" / "signing.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
