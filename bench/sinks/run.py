"""Records/s shipped per sink, one process each: ``python bench/sinks/run.py [sink ...]``.

Each function writes a log through the real Chain, starts the sink's server (or stand-in) and
times ``Runner.run_until_caught_up`` from an empty cursor to the end of the log. One function per
sink; each engineer adds theirs to ``BENCHES``.
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.sinks.conftest import LiveLog, build_sinks  # noqa: E402

from vllm_audit.ship.config import ShipConfig  # noqa: E402
from vllm_audit.ship.runner import Runner  # noqa: E402

N = 20_000


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError("server did not listen")


def _ship(work: Path, table: dict[str, object]) -> float:
    log = LiveLog(work / "log")
    log.write(N, batch=500)
    log.close()
    sinks = build_sinks(work / "log", work / "state", {"bench": table})
    runner = Runner(work / "log", work / "state", sinks, ShipConfig(batch_max=1000))
    t = time.perf_counter()
    assert runner.run_until_caught_up(600)
    dt = time.perf_counter() - t
    assert runner.statuses["bench"].delivered == log.next_seq
    return log.next_seq / dt


def bench_elasticsearch(work: Path) -> float:
    """noida-db's Elasticsearch API (scripts/services.d/elastic.sh), 1000-document _bulk requests."""
    found = glob.glob(str(Path.home() / ".cache/vllm-audit/noida-venv/lib/python3*/site-packages/noida_db/noida-db"))
    if not found:
        raise RuntimeError("run scripts/services.d/noida.sh first")
    port = _port()
    (work / "es").mkdir()
    cmd = [found[0], "start", "--only", "elasticsearch", "--elasticsearch-port", str(port)]
    cmd += ["--data-dir", str(work / "es")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        return _ship(work, {"type": "elasticsearch", "url": f"http://127.0.0.1:{port}", "batch_max": 1000})
    finally:
        proc.kill()
        proc.wait()


def bench_otlp(work: Path) -> float:
    """oteltap (a Rust OTLP/HTTP receiver) with its NDJSON printing to /dev/null, 1000 records a request."""
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oteltap", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_port(port, proc)
        return _ship(work, {"type": "otlp", "endpoint": f"http://127.0.0.1:{port}/v1/logs", "batch_max": 1000})
    finally:
        proc.kill()
        proc.wait()


def bench_kafka(work: Path) -> float:
    """noida-db's Kafka-protocol broker (scripts/services.d/kafka.sh), idempotent producer, 1000-entry batches."""
    import confluent_kafka  # noqa: F401 - a one-time process cost, not shipping

    found = glob.glob(str(Path.home() / ".cache/vllm-audit/noida-venv/lib/python3*/site-packages/noida_db/noida-db"))
    if not found:
        raise RuntimeError("run scripts/services.d/noida.sh first")
    port = _port()
    (work / "kafka").mkdir()
    cmd = [found[0], "start", "--only", "kafka", "--kafka-port", str(port), "--data-dir", str(work / "kafka")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        table = {"type": "kafka", "bootstrap_servers": f"127.0.0.1:{port}", "create_topic": True, "batch_max": 1000}
        return _ship(work, table)
    finally:
        proc.kill()
        proc.wait()


def bench_nats(work: Path) -> float:
    """A private nats-server with JetStream file storage, 1000-entry batches of async publishes.

    nats-py is imported first: its import (~0.25 s) is a one-time process cost, not shipping."""
    import nats  # noqa: F401

    port = _port()
    (work / "nats").mkdir()
    conf = work / "nats" / "nats.conf"
    conf.write_text(f'port: {port}\nhost: "127.0.0.1"\njetstream {{ store_dir: "{work / "nats" / "js"}" }}\n')
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        return _ship(work, {"type": "nats", "servers": [f"nats://127.0.0.1:{port}"], "batch_max": 1000})
    finally:
        proc.kill()
        proc.wait()


def _encode_only(work: Path, table: dict[str, object], encode: Callable[[object, object], object]) -> float:
    """Records/s of a sink's own encoding (no server): separates the client's cost from the stand-in's."""
    from vllm_audit.integrity.reader import Cursor, LogReader

    log = LiveLog(work / "log")
    log.write(N, batch=500)
    log.close()
    (sink,) = build_sinks(work / "log", work / "state", {"bench": table})
    reader = LogReader(work / "log")
    entries = reader.read(Cursor(log.writer_id), N + 10)
    t = time.perf_counter()
    for e in entries:
        encode(sink, e)
    return len(entries) / (time.perf_counter() - t)


def bench_elasticsearch_encode(work: Path) -> float:
    """The elasticsearch sink's NDJSON/ECS encoding alone."""
    return _encode_only(work, {"type": "elasticsearch"}, lambda s, e: s.encode(e))  # type: ignore[attr-defined]


def bench_otlp_encode(work: Path) -> float:
    """The otlp sink's protobuf encoding alone."""
    return _encode_only(work, {"type": "otlp"}, lambda s, e: s.encode_record(e, 1))  # type: ignore[attr-defined]


def bench_file(work: Path) -> float:
    """The file sink: ECS JSON lines, fdatasync per 1000-entry batch, size rotation at 256 MiB."""
    return _ship(work, {"type": "file", "directory": str(work / "out"), "batch_max": 1000})


def bench_file_stored(work: Path) -> float:
    """The file sink writing the stored lines as they are (no ECS view)."""
    return _ship(work, {"type": "file", "directory": str(work / "out"), "format": "stored", "batch_max": 1000})


def bench_syslog(work: Path) -> float:
    """A private rsyslogd (Debian's, scripts/services.d/rsyslog.sh) over TLS writing every message to a file;
    each 1000-message batch waits for the receiver's TCP acknowledgement."""
    from tests.sinks.test_syslog import Rsyslog

    rs = Rsyslog(work / "rsyslog")
    rs.start()
    try:
        table = {"type": "syslog", "host": "localhost", "port": rs.tls_port, "ca_file": str(rs.ca), "batch_max": 1000}
        return _ship(work, table)
    finally:
        rs.stop()


def bench_webhook(work: Path) -> float:
    """The test's HTTPS receiver (Python http.server: HMAC check, JSON parse, fsync per batch), 1000-record POSTs."""
    import os

    from tests.sinks.test_webhook import SECRET, Receiver

    os.environ["BENCH_HOOK_SECRET"] = SECRET
    rx = Receiver(work / "receiver")
    rx.start()
    try:
        table = {
            "type": "webhook",
            "url": rx.url,
            "secret": {"env": "BENCH_HOOK_SECRET"},
            "ca_file": str(rx.ca),
            "batch_max": 1000,
        }
        return _ship(work, table)
    finally:
        rx.stop()


def bench_ecs_encode(work: Path) -> float:
    """to_ecs + orjson.dumps alone (what the file sink adds over writing stored lines)."""
    import orjson

    from vllm_audit.sinks.ecs import to_ecs

    return _encode_only(work, {"type": "file", "directory": str(work / "out")}, lambda s, e: orjson.dumps(to_ecs(e)))  # type: ignore[arg-type]


BENCHES: dict[str, Callable[[Path], float]] = {
    "elasticsearch": bench_elasticsearch,
    "elasticsearch-encode": bench_elasticsearch_encode,
    "file": bench_file,
    "file-stored": bench_file_stored,
    "ecs-encode": bench_ecs_encode,
    "syslog": bench_syslog,
    "webhook": bench_webhook,
    "kafka": bench_kafka,
    "nats": bench_nats,
    "otlp": bench_otlp,
    "otlp-encode": bench_otlp_encode,
}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-sink-{name}-"))
        try:
            rate = BENCHES[name](work)
            print(f"{name:15s} {rate:10,.0f} records/s  ({N:,} records)", flush=True)
        except Exception as exc:
            print(f"{name:15s} failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
