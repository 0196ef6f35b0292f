"""A real S3 server that enforces Object Lock like AWS: LocalStack-core (host mode, S3 only).

Installed by scripts/services.d/localstack.sh into its own Python 3.13 venv; started once per test
session on a free port with a temporary data directory, stopped at the end. moto is not used: it
lets COMPLIANCE retention be shortened, so it cannot show WORM behaviour.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_service

VENV = Path(os.environ.get("VLLM_AUDIT_LOCALSTACK_VENV", Path.home() / ".cache/vllm-audit/localstack-venv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def localstack(data: Path) -> Iterator[str]:
    """A LocalStack-core S3 on a free port with its data in ``data``; yields its URL (also for bench/)."""
    py = VENV / "bin" / "python"
    need_service(py.exists(), f"LocalStack venv {VENV} (run scripts/services.d/localstack.sh)")
    port = _free_port()
    env = dict(
        os.environ,
        SERVICES="s3",
        GATEWAY_LISTEN=f"127.0.0.1:{port}",
        LOCALSTACK_VOLUME_DIR=str(data),
        FILESYSTEM_ROOT=str(data / "fs"),
        DISABLE_EVENTS="1",
        SKIP_SSL_CERT_DOWNLOAD="1",
        DNS_ADDRESS="0",
    )
    env.pop("PYTHONPATH", None)
    log = open(data / "localstack.log", "wb")
    proc = subprocess.Popen([str(py), "-m", "localstack.runtime.main"], env=env, stdout=log, stderr=log, cwd=data)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_localstack/health", timeout=1) as r:
                body = r.read()
            ready = b'"s3": "available"' in body or b'"s3": "running"' in body
        except OSError:
            pass
        if ready:
            break
        time.sleep(0.2)  # polling the server's health endpoint with a deadline
    try:
        if not ready:
            proc.kill()
            need_service(False, f"LocalStack did not start: {(data / 'localstack.log').read_text()[-500:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with localstack(tmp_path_factory.mktemp("localstack")) as url:
        yield url


@pytest.fixture
def archive_table(s3_endpoint: str) -> dict[str, object]:
    """An ``[archive]`` table for a fresh bucket with Object Lock."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    return {
        "bucket": f"audit-{secrets.token_hex(4)}",
        "endpoint_url": s3_endpoint,
        "addressing_style": "path",
        "create_bucket": True,
        "retain_days": 1,
    }
