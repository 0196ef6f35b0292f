"""The webhook sink against a real HTTPS receiver process (stdlib http.server + ssl, a test CA).

The receiver checks the HMAC signature (401 when wrong or older than 5 minutes), dedupes batches
by ``Idempotency-Key`` (remembered on disk across its restarts), refuses (422) any batch holding a
record marked ``POISON``, and answers 503 to the next N requests when told to.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ROOT, free_port
from tests.sinks.conftest import LiveLog, build_sinks, gateway_outage, inference, make_tls_files, one_sink, shipper_argv
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.registry import parse_sinks
from vllm_audit.sinks.webhook import WebhookSink, signature

FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.02, backoff_max_s=0.2, status_interval_s=0.1)
SECRET = "s3cret-hmac-key"

RECEIVER = r"""
import hashlib, hmac, http.server, os, ssl, sys, time, orjson
port, cert, key, secret, state = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].encode(), sys.argv[5]
out_path, fail_path = state + "/accepted.jsonl", state + "/fail_next"
seen = set()
if os.path.exists(out_path):  # one line per accepted batch; a torn last line was never acknowledged
    data = open(out_path, "rb").read()
    good = data[: data.rfind(b"\n") + 1]
    os.truncate(out_path, len(good))
    seen = {orjson.loads(line)["key"] for line in good.splitlines()}
out = open(out_path, "ab")

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def answer(self, code, body=b"{}", **headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if os.path.exists(fail_path):
            n = int(open(fail_path).read() or 0)
            if n > 0:
                open(fail_path, "w").write(str(n - 1))
                with open(state + "/failed.txt", "a") as f:
                    f.write(self.headers["Idempotency-Key"] + "\n")
                return self.answer(503, b"busy", Retry_After="0")
        sig = dict(p.split("=", 1) for p in self.headers.get("X-Vllm-Audit-Signature", "").split(",") if "=" in p)
        t = int(sig.get("t", "0"))
        mac = hmac.new(secret, b"%d." % t + body, hashlib.sha256).hexdigest()
        if abs(time.time() - t) > 300 or not hmac.compare_digest(mac, sig.get("v1", "")):
            return self.answer(401, b"bad signature")
        ikey = self.headers["Idempotency-Key"]
        if ikey in seen:
            with open(state + "/duplicates.txt", "a") as f:
                f.write(ikey + "\n")
            return self.answer(200, b'{"duplicate":true}')
        if self.headers["Content-Type"] == "application/x-ndjson":
            records = [orjson.loads(x) for x in body.splitlines()]
        else:
            records = orjson.loads(body)
        if int(self.headers["X-Vllm-Audit-Count"]) != len(records):
            return self.answer(400, b"count mismatch")
        if any(b"POISON" in orjson.dumps(r) for r in records):
            return self.answer(422, b"record refused: POISON")
        out.write(orjson.dumps({"key": ikey, "records": records}) + b"\n")  # the batch in one line
        out.flush(); os.fsync(out.fileno())
        seen.add(ikey)
        self.answer(200)

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
srv = http.server.HTTPServer(("127.0.0.1", port), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"""


class Receiver:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.state = work / "state"
        self.state.mkdir(parents=True)
        self.ca, self.cert, self.key = make_tls_files(work / "tls")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/hook"

    def start(self) -> None:
        argv = [sys.executable, "-c", RECEIVER, str(self.port), str(self.cert), str(self.key), SECRET, str(self.state)]
        self.proc = subprocess.Popen(argv)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("receiver did not listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def fail_next(self, n: int) -> None:
        (self.state / "fail_next").write_text(str(n))

    def records(self) -> list[dict[str, Any]]:
        """Every record stored, in arrival order, as ``{"key": batch key, "record": ...}``."""
        path = self.state / "accepted.jsonl"
        if not path.exists():
            return []
        data = path.read_bytes()
        batches = [orjson.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]
        return [{"key": b["key"], "record": r} for b in batches for r in b["records"]]

    def wait_all(self, n: int, timeout: float = 30) -> None:
        """Until seqs ``0..n-1`` were all stored (or the deadline)."""
        deadline = time.monotonic() + timeout
        while len({r["record"]["seq"] for r in self.records()}) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def lines(self, name: str) -> list[str]:
        path = self.state / name
        return path.read_text().split() if path.exists() else []


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    r = Receiver(tmp_path / "receiver")
    r.start()
    try:
        yield r
    finally:
        r.stop()


def _table(rx: Receiver, **options: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": rx.url, "secret": {"env": "HOOK_SECRET"}, "ca_file": str(rx.ca), **options}


def _sink(tmp_path: Path, rx: Receiver, **options: Any) -> WebhookSink:
    return one_sink(tmp_path, "w", _table(rx, **options), WebhookSink)


def _seqs(rx: Receiver) -> list[int]:
    return [r["record"]["seq"] for r in rx.records()]


def test_batches_arrive_signed_complete_and_in_order(tmp_path: Path, receiver: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(250, batch=60)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, receiver, batch_max=40)], FAST)
    assert runner.run_until_caught_up(30)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id), 1000)
    got = receiver.records()
    assert [r["record"] for r in got] == [e.record() for e in entries]  # complete, in order
    keys = [r["key"] for r in got]
    assert keys[0] == f"{log.writer_id}:0..{log.writer_id}:39"
    assert receiver.lines("duplicates.txt") == []


def test_ndjson_with_ecs_records(tmp_path: Path, receiver: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(30)
    sink = _sink(tmp_path, receiver, body_format="ndjson", record_format="ecs")
    assert Runner(tmp_path / "log", tmp_path / "state", [sink], FAST).run_until_caught_up(30)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id), 1000)
    assert [r["record"] for r in receiver.records()] == [to_ecs(e) for e in entries]


def test_a_wrong_secret_is_retried_never_quarantined(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "not-the-key")
    log = LiveLog(tmp_path / "log")
    log.write(10)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, receiver)], FAST)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while runner.statuses["w"].retried < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        runner.stop()
    status = runner.statuses["w"]
    assert status.retried >= 3 and status.quarantined == 0 and status.delivered == 0
    assert "HTTP 401" in status.last_error
    assert receiver.records() == []


def test_5xx_is_retried_with_the_same_idempotency_key(tmp_path: Path, receiver: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(99)
    receiver.fail_next(3)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, receiver)], FAST)
    runner.start()
    try:
        receiver.wait_all(log.next_seq)
    finally:
        runner.stop()
    key = f"{log.writer_id}:0..{log.writer_id}:{log.next_seq - 1}"
    assert receiver.lines("failed.txt") == [key] * 3
    assert _seqs(receiver) == list(range(log.next_seq))


def test_a_refused_record_is_found_by_bisection_and_quarantined(tmp_path: Path, receiver: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    records = [inference(i) for i in range(64)]
    records[37]["output_response"] = "POISON"
    log.write(0, records=records)
    sink = _sink(tmp_path, receiver, batch_max=100)
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    assert runner.run_until_caught_up(30)
    poisoned = 38  # seq 0 is the writer_started event
    assert runner.statuses["w"].quarantined == 1
    q = orjson.loads((tmp_path / "state" / "w" / "quarantine.jsonl").read_bytes())
    assert (q["seq"], q["reason"]) == (poisoned, "HTTP 422: record refused: POISON")
    assert _seqs(receiver) == [s for s in range(log.next_seq) if s != poisoned]  # the rest, in order
    assert sink.requests <= 2 * 7 + 1  # a bisection, not one request per record


def test_receiver_down_under_load_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    """The receiver is killed while records keep coming, then restarted. It dedupes by
    Idempotency-Key; the test counts the batches it saw twice (answered 200, not stored again)."""
    log = LiveLog(tmp_path / "log")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            log.write(20, batch=20)
            time.sleep(0.002)  # pacing the producer, not synchronisation

    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, receiver, batch_max=50)], FAST)
    writer = threading.Thread(target=load)
    writer.start()
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while len(receiver.records()) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        receiver.stop()
        down_at = log.next_seq
        while (log.next_seq < down_at + 500 or runner.statuses["w"].retried < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.statuses["w"].retried >= 2
        receiver.start()
    finally:
        stop.set()
        writer.join()
    receiver.wait_all(log.next_seq)
    runner.stop()
    counts = Counter(_seqs(receiver))
    missing = sorted(set(range(log.next_seq)) - set(counts))
    assert not missing, f"lost records {missing[:5]}..{missing[-5:]} of {log.next_seq}: {runner.statuses['w']}"
    assert max(counts.values()) == 1, "stored twice"
    print(f"webhook receiver outage: {log.next_seq} records, {len(receiver.lines('duplicates.txt'))} batches deduped")


def test_kill_9_of_the_shipper_resumes_from_the_cursor(tmp_path: Path, receiver: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(3000, batch=500)
    tables = {"w": {**_table(receiver, batch_max=50)}}
    env_argv = shipper_argv(tmp_path / "log", tmp_path / "state", tables, poll_interval_s=0.02)
    proc = subprocess.Popen(env_argv, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(receiver.records()) < 800 and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(receiver.records()) < log.next_seq
    # the same config again: the batch replayed from the cursor has the same bounds, so the same key
    sink = _sink(tmp_path, receiver, batch_max=50)
    assert Runner(tmp_path / "log", tmp_path / "state", [sink], FAST).run_until_caught_up(60)
    counts = Counter(_seqs(receiver))
    assert set(counts) == set(range(log.next_seq)), "lost records"
    assert max(counts.values()) == 1, "stored twice"
    print(f"webhook shipper kill -9: {log.next_seq} records, {len(receiver.lines('duplicates.txt'))} batches deduped")


def test_signature_is_hmac_of_t_dot_body() -> None:
    import hashlib
    import hmac

    mac = hmac.new(b"k", b"1700000000.[1]", hashlib.sha256).hexdigest()
    assert signature(b"k", b"[1]", 1700000000) == f"t=1700000000,v1={mac}"


def test_config_errors_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="url must be"):
        parse_sinks({"w": {"type": "webhook", "url": "ftp://x", "secret": {"env": "X"}}}, "[sinks")
    with pytest.raises(ConfigError, match="secret is required"):
        parse_sinks({"w": {"type": "webhook", "url": "https://x"}}, "[sinks")
    with pytest.raises(ConfigError, match="set by the sink"):
        parse_sinks(
            {"w": {"type": "webhook", "url": "https://x", "secret": {"env": "X"}, "headers": {"Idempotency-Key": "1"}}},
            "[sinks",
        )
    monkeypatch.delenv("NO_SUCH_SECRET_VAR", raising=False)
    with pytest.raises(ConfigError, match="sinks.w secret: environment variable NO_SUCH_SECRET_VAR is not set"):
        build_sinks(
            Path("/tmp"),
            Path("/tmp"),
            {"w": {"type": "webhook", "url": "https://x", "secret": {"env": "NO_SUCH_SECRET_VAR"}}},
        )


def test_the_gateway_keeps_answering_while_the_receiver_is_down(tmp_path: Path, receiver: Receiver) -> None:
    cfg = (
        f'[sinks.w]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret = {{ env = "HOOK_SECRET" }}\n'
        f'ca_file = "{receiver.ca}"\nrecord_types = ["inference"]\n'
    )
    sent = gateway_outage(tmp_path, cfg, "w", receiver.stop, receiver.start, env={"HOOK_SECRET": SECRET})
    ids = [r["record"]["request_id"] for r in receiver.records()]
    assert set(sent) <= set(ids)
    assert len(ids) == len(set(ids))
