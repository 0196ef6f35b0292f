"""Shared helpers for the sink tests: a real log written through the real Chain."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner

logging.getLogger("vllm_audit.integrity").setLevel(logging.ERROR)  # the auto-key warning


def inference(i: int, *, pad: int = 0) -> dict[str, Any]:
    """A realistic (redacted) inference record, number ``i``; ``pad`` adds that many bytes of output."""
    return {
        "record_type": "inference",
        "schema_version": 1,
        "timestamp": f"2026-07-01T12:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "request_id": f"req-{i:07d}",
        "request_id_source": "generated",
        "client_ip": "203.0.113.7",
        "peer_ip": "127.0.0.1",
        "forwarded_ignored": False,
        "user_id": f"user-{i % 7}",
        "org_id": "acme",
        "auth_status": "authenticated",
        "auth_method": "api_key",
        "key_id": "k1",
        "roles": ["caller"],
        "method": "POST",
        "route": "/v1/chat/completions",
        "model_name": "demo-model",
        "model_revision": None,
        "response_id": f"chatcmpl-req-{i:07d}",
        "stream": i % 2 == 0,
        "http_status": 200,
        "status": "ok",
        "finish_reason": "stop",
        "prompt_tokens": 50 + i % 13,
        "completion_tokens": 80 + i % 17,
        "total_tokens": 130 + i % 13 + i % 17,
        "usage_source": "response",
        "latency_ms": 12.5 + i % 10,
        "ttft_ms": None,
        "input_prompt": [{"role": "user", "content": f'Summarise ticket {i} for <EMAIL_ADDRESS> "q" ]\\ é中'}],
        "output_response": "The customer asks about an invoice." + "x" * pad,
        "prompt_sha256": None,
        "request_bytes": 300,
        "response_bytes": 900,
        "request_truncated": False,
        "response_truncated": False,
        "upstream": "demo",
        "error_type": None,
        "error_message": None,
    }


class LiveLog:
    """One writer appending records through the real Chain, signing a checkpoint after each batch
    (the reader ships only signed entries)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.chain = Chain(log_dir, IntegrityConfig(checkpoint_every_records=1_000_000, checkpoint_every_seconds=3600))
        self.writer_id = self.chain.writer_id
        self.written = 0

    def write(self, n: int, *, batch: int = 100, pad: int = 0, records: list[dict[str, Any]] | None = None) -> None:
        todo = records if records is not None else [inference(self.written + k, pad=pad) for k in range(n)]
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            self.chain.append([*self.chain.pending_events(), *chunk])
            self.chain.sync()
            self.chain.checkpoint()
            self.written += len(chunk)

    @property
    def next_seq(self) -> int:
        return self.chain.next_seq

    def close(self) -> None:
        self.chain.close()


def build_sinks(log_dir: Path, state_dir: Path, tables: dict[str, dict[str, Any]]) -> list[Any]:
    """Sinks built from ``[sinks.NAME]``-shaped tables through the real config parser and registry."""
    from vllm_audit.sinks.registry import SinkEnv, build_sink, parse_sinks

    env = SinkEnv(log_dir=log_dir, state_dir=state_dir, base_dir=log_dir.parent)
    return [build_sink(spec, env) for spec in parse_sinks(tables, "[sinks").values()]


SinkT = TypeVar("SinkT")

#: Ship settings for sink tests: quick polls and retries.
FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.5, status_interval_s=0.1)


def one_sink(tmp_path: Path, name: str, table: dict[str, Any], kind: type[SinkT], state: str = "state") -> SinkT:
    """The sink ``[sinks.NAME]`` = ``table`` builds over ``tmp_path/log`` (state in ``tmp_path/state``)."""
    sink = build_sinks(tmp_path / "log", tmp_path / state, {name: table})[0]
    assert isinstance(sink, kind)
    return sink


def drain(tmp_path: Path, sink: Any, state: str = "state", ship: ShipConfig = FAST) -> Runner:
    """Run ``sink`` over ``tmp_path/log`` until it has caught up (at most 60 s)."""
    runner = Runner(tmp_path / "log", tmp_path / state, [sink], ship)
    assert runner.run_until_caught_up(60)
    return runner


#: A shipper process for kill -9 tests: argv[1] is a JSON object {log_dir, state_dir, sinks, ship}.
SHIPPER = """
import sys, threading, orjson
from pathlib import Path
from tests.sinks.conftest import build_sinks
from vllm_audit.config import parse_section
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
a = orjson.loads(sys.argv[1])
log_dir, state_dir = Path(a["log_dir"]), Path(a["state_dir"])
runner = Runner(log_dir, state_dir, build_sinks(log_dir, state_dir, a["sinks"]),
                parse_section(ShipConfig, a.get("ship", {}), "[ship]"))
runner.start()
print("started", flush=True)
threading.Event().wait()
"""


def shipper_argv(log_dir: Path, state_dir: Path, sinks: dict[str, dict[str, Any]], **ship: Any) -> list[str]:
    """``python -c SHIPPER <args>``: a runner over ``log_dir`` in its own process (run from the repo root)."""
    import sys

    import orjson

    args = {"log_dir": str(log_dir), "state_dir": str(state_dir), "sinks": sinks, "ship": ship}
    return [sys.executable, "-c", SHIPPER, orjson.dumps(args).decode()]


def make_tls_files(d: Path, name: str = "localhost") -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for ``name`` / 127.0.0.1 signed by it: ``(ca, cert, key)`` PEM paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vllm-audit test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


#: ``[ship]`` for a gateway under test: quick polls and retries, status files often.
FAST_SHIP_TOML = (
    "[ship]\npoll_interval_s = 0.05\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\nstatus_interval_s = 0.1\n"
)


def post_chats(base: str, request_ids: list[str]) -> list[int]:
    """POST one chat completion per request id to a gateway (20 at a time); the HTTP statuses."""
    import asyncio

    import aiohttp

    chat = {"model": "demo-model", "messages": [{"role": "user", "content": "hello sinks"}], "max_tokens": 4}

    async def run() -> list[int]:
        sem = asyncio.Semaphore(20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

            async def one(rid: str) -> int:
                async with sem, s.post(base + "/v1/chat/completions", json=chat, headers={"x-request-id": rid}) as r:
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(one(r) for r in request_ids)))

    return asyncio.run(run())


def sink_status(log_dir: Path, name: str) -> dict[str, Any]:
    """A gateway runner's status file for sink ``name`` (default state dir; empty before the first)."""
    import orjson

    try:
        data = orjson.loads((log_dir / "ship" / f"{name}.status.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def wait_until(cond: Any, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gateway_outage(
    tmp_path: Path,
    config: str,
    sink: str,
    down: Any,
    up: Any,
    *,
    n_down: int = 200,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> list[str]:
    """A real gateway with ``config`` (one ``[sinks.<sink>]``): 20 calls delivered, then ``down()``
    takes the sink's server away, ``n_down`` more calls are answered 200 while the sink retries,
    ``up()`` brings it back and the sink catches up (lag 0). Returns every request id sent."""
    from tests.helpers import gateway

    first = [f"up-{i}" for i in range(20)]
    later = [f"down-{i}" for i in range(n_down)]
    with gateway(tmp_path, config=config + FAST_SHIP_TOML, env=env) as (base, log_dir, _):
        assert post_chats(base, first) == [200] * len(first)
        wait_until(lambda: sink_status(log_dir, sink).get("delivered", 0) >= len(first), "the first records delivered")
        down()
        try:
            assert post_chats(base, later) == [200] * n_down  # answered while the sink cannot deliver
            wait_until(lambda: sink_status(log_dir, sink).get("state") == "retrying", "the sink to notice")
        finally:
            up()
        wait_until(
            lambda: (st := sink_status(log_dir, sink)).get("state") == "running" and st.get("lag_records") == 0,
            "the sink to catch up",
            timeout,
        )
    return first + later


class ServerProcess:
    """A server the tests start and stop themselves, listening on its own port."""

    what = "the server"

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: Any = None

    def command(self) -> list[str]:  # pragma: no cover - every server names its own
        raise NotImplementedError

    def start(self, log: Path | None = None) -> None:
        import socket
        import subprocess
        import time

        logf = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT)
        finally:
            if log is not None:
                logf.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.what} exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"{self.what} did not listen")

    def stop(self) -> None:
        """Graceful stop (SIGTERM; SIGKILL after 20 s)."""
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


#: The noida-db wheel's venv (scripts/services.d/noida.sh): its static binary serves the
#: Kafka protocol and the Elasticsearch API for the tests.
NOIDA_VENV = Path(os.environ.get("VLLM_AUDIT_NOIDA_VENV", str(Path.home() / ".cache/vllm-audit/noida-venv")))


def noida_binary() -> str | None:
    import glob

    found = sorted(glob.glob(str(NOIDA_VENV / "lib/python3*/site-packages/noida_db/noida-db")))
    return found[0] if found else None


def entries_by_leaf(log_dir: Path) -> dict[str, Entry]:
    """Every entry of every writer in ``log_dir``, by leaf hash (through the one ``LogReader``)."""
    reader = LogReader(log_dir)
    out: dict[str, Entry] = {}
    for wid in reader.writer_ids():
        cur = Cursor(wid)
        while batch := reader.read(cur, 5000):
            out.update((e.leaf_hex, e) for e in batch)
            cur = cur.after(batch[-1])
    return out
