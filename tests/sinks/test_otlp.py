"""The otlp sink against real OTLP/HTTP receiver processes over real connections.

Receivers:

- ``oteltap`` (PyPI; a Rust OTLP/HTTP protobuf receiver, run as ``python -m oteltap --port P``,
  which prints every received log record as NDJSON): delivery, order, outage and kill -9 tests;
- ``tests/sinks/_otlp_receiver.py`` (stdlib ``http.server`` decoding with the ``opentelemetry-proto``
  classes) where the test needs the receiver to refuse: 400 for bad data, 503 with
  ``Retry-After``, ``partial_success``. oteltap accepts everything.

OTLP has no idempotency key: replays after an outage or a crash are duplicates (the tests count
them by ``vllm_audit.record_hash``); none is ever missing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ROOT, free_port
from tests.sinks.conftest import (
    LiveLog,
    drain,
    entries_by_leaf,
    gateway_outage,
    inference,
    one_sink,
    shipper_argv,
)
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import Entry, leaf_hash
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks import otel
from vllm_audit.sinks._http import TransientError
from vllm_audit.sinks.otlp import OtlpSink, partial_success, status_message
from vllm_audit.sinks.registry import SinkEnv, build_sink, parse_sinks

FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.05, backoff_max_s=2.0, status_interval_s=0.1)


class Receiver:
    """An OTLP/HTTP receiver process on its own port: ``oteltap`` or the stdlib one (``args`` given)."""

    def __init__(self, out: Path, *args: str, oteltap: bool = True) -> None:
        self.out = out
        self.args = args
        self.oteltap = oteltap
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/logs"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.oteltap:
            cmd = [sys.executable, "-u", "-m", "oteltap", "--port", str(self.port)]
            outf = open(self.out, "ab")
            self.proc = subprocess.Popen(cmd, stdout=outf, stderr=subprocess.DEVNULL)
            outf.close()
        else:
            cmd = [sys.executable, str(ROOT / "tests/sinks/_otlp_receiver.py"), str(self.port), str(self.out)]
            self.proc = subprocess.Popen([*cmd, *self.args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the OTLP receiver exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("the OTLP receiver did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            # Killed mid-print, oteltap leaves a torn line: end it, so the next receiver's first
            # record starts a line of its own (``torn()`` reports what the torn line shows).
            if self.oteltap and self.out.exists():
                with open(self.out, "rb+") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell():
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
        self.proc = None

    def records(self) -> list[dict[str, Any]]:
        """Received log records as ``{"body", "attrs"}`` dicts, in arrival order."""
        out: list[dict[str, Any]] = []
        if not self.out.exists():
            return out
        for line in self.out.read_bytes().splitlines():
            if not line.startswith(b"{"):
                continue  # oteltap's "Listening ..." banner
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                if self.oteltap:
                    continue  # a record whose printing a kill cut short: see torn()
                raise
            if self.oteltap:
                attrs = {a["key"]: _json_value(a["value"]) for a in obj["attributes"]}
                out.append({"body": obj["body"]["stringValue"], "attrs": attrs, "obj": obj})
            else:
                out += obj["records"]
        return out

    def torn(self) -> tuple[set[str], int]:
        """Records a killed oteltap was printing: the record hashes their torn lines show, and how
        many torn lines show none. The receiver had each of them (it prints what it received)."""
        hashes: set[str] = set()
        unknown = 0
        if not self.oteltap or not self.out.exists():
            return hashes, unknown
        for line in self.out.read_bytes().splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                m = _TORN_HASH.search(line)
                if m:
                    hashes.add(m.group(1).decode())
                else:
                    unknown += 1
        return hashes, unknown

    def printed(self) -> int:
        """How many records oteltap has printed so far (a line each), without parsing them."""
        if not self.oteltap:
            return len(self.records())
        if not self.out.exists():
            return 0
        data = self.out.read_bytes()
        return data.count(b"\n{") + data.startswith(b"{")

    def requests(self) -> list[dict[str, Any]]:
        assert not self.oteltap
        return [orjson.loads(x) for x in self.out.read_bytes().splitlines()]


#: The record hash attribute in a (possibly torn) oteltap line.
_TORN_HASH = re.compile(rb'"key":\s*"vllm_audit\.record_hash",\s*"value":\s*\{\s*"stringValue":\s*"([0-9a-f]{64})"')


def _json_value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_json_value(x) for x in v["arrayValue"].get("values", [])]
    return None


@pytest.fixture
def tap(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "oteltap.ndjson")
    r.start()
    try:
        yield r
    finally:
        r.stop()


def _table(r: Receiver, **options: Any) -> dict[str, Any]:
    return {"type": "otlp", "endpoint": r.endpoint, **options}


def _sink(tmp_path: Path, r: Receiver, **options: Any) -> OtlpSink:
    return one_sink(tmp_path, "o", _table(r, **options), OtlpSink)


def _entries(tmp_path: Path) -> dict[str, Entry]:
    return entries_by_leaf(tmp_path / "log")


def _check(records: list[dict[str, Any]], tmp_path: Path, missing: frozenset[int] = frozenset()) -> int:
    """Every entry (but ``missing`` seqs) arrived, body = stored line, first arrivals in per-writer
    order; returns the number of duplicates."""
    entries = _entries(tmp_path)
    seen: set[str] = set()
    last: dict[str, int] = {}
    dups = 0
    for r in records:
        h = r["attrs"]["vllm_audit.record_hash"]
        e = entries[h]
        assert leaf_hash(r["body"].encode()).hex() == h  # the body is the stored line, byte for byte
        assert r["attrs"]["vllm_audit.seq"] == e.seq and r["attrs"]["vllm_audit.writer_id"] == e.writer_id
        if h in seen:
            dups += 1
            continue
        seen.add(h)
        assert e.seq > last.get(e.writer_id, -1), f"{e.key} arrived out of order"
        last[e.writer_id] = e.seq
    assert seen == {h for h, e in entries.items() if e.seq not in missing}
    return dups


def test_records_arrive_complete_and_in_per_writer_order(tmp_path: Path, tap: Receiver) -> None:
    a, b = LiveLog(tmp_path / "log"), LiveLog(tmp_path / "log")
    a.write(700, batch=70)
    b.write(400, batch=30)
    runner = drain(tmp_path, _sink(tmp_path, tap, batch_max=200), ship=FAST)
    assert runner.statuses["o"].delivered == a.next_seq + b.next_seq
    deadline = time.monotonic() + 20
    while len(tap.records()) < a.next_seq + b.next_seq and time.monotonic() < deadline:
        time.sleep(0.02)  # oteltap prints asynchronously after answering
    records = tap.records()
    assert _check(records, tmp_path) == 0
    r = next(r for r in records if r["attrs"]["vllm_audit.record_type"] == "inference")
    rec = orjson.loads(r["body"])
    assert r["attrs"]["gen_ai.request.model"] == "demo-model"
    assert r["attrs"]["gen_ai.operation.name"] == "chat"
    assert r["attrs"]["gen_ai.usage.input_tokens"] == rec["prompt_tokens"]
    assert r["attrs"]["gen_ai.response.finish_reasons"] == ["stop"]
    assert r["attrs"]["http.response.status_code"] == 200
    assert r["obj"]["severityNumber"] == 9 and r["obj"]["severityText"] == "INFO"
    assert int(r["obj"]["timeUnixNano"]) == otel.time_unix_nano(rec["timestamp"])
    assert r["obj"]["eventName"] == "vllm_audit.inference"


def test_encoding_is_what_opentelemetry_proto_writes(tmp_path: Path) -> None:
    """The hand-written protobuf encoder produces the bytes the official classes produce."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    log = LiveLog(tmp_path / "log")
    recs = [inference(i) for i in range(5)]
    recs[1].update(status="timeout", http_status=504, error_type=None, finish_reason=["stop", "length"])
    recs[2].update(upstream="https://vllm.internal:8443/v1", prompt_tokens=-1, latency_ms=0.0, stream=False)
    log.write(0, records=recs)
    log.close()
    sink = build_sink(
        parse_sinks({"o": {"type": "otlp"}}, "[sinks")["o"], SinkEnv(tmp_path / "log", tmp_path / "st", tmp_path)
    )
    assert isinstance(sink, OtlpSink)
    entries = list(_entries(tmp_path).values())
    body = sink.request_body(entries[0].writer_id, [sink.encode_record(e, 1_700_000_000_000_000_000) for e in entries])
    msg = ExportLogsServiceRequest.FromString(body)
    assert msg.SerializeToString() == body
    lrs = msg.resource_logs[0].scope_logs[0].log_records
    assert [lr.body.string_value.encode() for lr in lrs] == [e.line for e in entries]
    res = {kv.key: kv.value.string_value for kv in msg.resource_logs[0].resource.attributes}
    assert res["service.name"] == "vllm-audit" and res["vllm_audit.writer_id"] == entries[0].writer_id
    by_seq = {lr.attributes[-3].value.int_value: lr for lr in lrs}
    t = by_seq[2]  # recs[1]
    attrs = {kv.key: kv.value for kv in t.attributes}
    assert t.severity_text == "ERROR" and attrs["error.type"].string_value == "timeout"
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == ["stop", "length"]
    u = {kv.key: kv.value for kv in by_seq[3].attributes}
    assert u["server.address"].string_value == "vllm.internal" and u["server.port"].int_value == 8443
    assert u["gen_ai.usage.input_tokens"].int_value == -1  # int64 two's complement round-trips
    assert by_seq[3].observed_time_unix_nano == 1_700_000_000_000_000_000


def test_receiver_down_under_load_then_back_loses_nothing(tmp_path: Path, tap: Receiver) -> None:
    """The receiver is killed while the log keeps growing and comes back on the same port; the sink
    catches up from its cursor. Duplicates (a request the receiver took but never answered) are
    counted; nothing is missing."""
    log = LiveLog(tmp_path / "log")
    log.write(200)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and log.next_seq < 4000:
            log.write(20, batch=20)
            time.sleep(0.002)

    writer = threading.Thread(target=load)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, tap, batch_max=100, timeout_s=5)], FAST)
    status = runner.statuses["o"]
    writer.start()
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while status.delivered < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status.delivered >= 500
        tap.stop()
        down_at = log.next_seq
        deadline = time.monotonic() + 30
        while (status.retried < 2 or log.next_seq < down_at + 800) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status.retried >= 2 and status.state == "retrying", status
        assert log.next_seq - status.delivered > 500
        tap.start()
    finally:
        stop.set()
        writer.join()
    deadline = time.monotonic() + 60
    while (status.lag_records or status.delivered < log.next_seq) and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.stop()
    # oteltap prints what it acknowledged at its own pace; count its lines (cheap) before parsing
    # them all, so the wait does not take the CPU oteltap needs on a 2-core machine.
    printed_by = time.monotonic() + 180
    def all_printed() -> bool:
        if tap.printed() < log.next_seq:
            return False
        torn, unknown = tap.torn()
        return len({r["attrs"]["vllm_audit.record_hash"] for r in tap.records()} | torn) + unknown >= log.next_seq

    while not all_printed():
        assert time.monotonic() < printed_by, (tap.printed(), log.next_seq)
        time.sleep(0.1)
    # A record the killed receiver took but printed only in part is not missing: the sink delivered
    # it. Only those may lack a whole printed line; every other entry must have one.
    torn, unknown = tap.torn()
    whole = {r["attrs"]["vllm_audit.record_hash"] for r in tap.records()}
    entries = _entries(tmp_path)
    missing = {h for h in entries if h not in whole}
    assert len(missing - torn) <= unknown, (len(missing), len(torn), unknown)
    dups = _check(tap.records(), tmp_path, frozenset(entries[h].seq for h in missing))
    print(f"otlp outage: {log.next_seq} entries, {dups} duplicates")
    assert dups <= 2 * 100


def test_kill_9_of_the_shipper_mid_batch_resumes_from_the_cursor(tmp_path: Path, tap: Receiver) -> None:
    """Duplicates here are the batch in flight at each kill (acknowledged, cursor not committed)."""
    log = LiveLog(tmp_path / "log")
    log.write(8000, batch=500)
    table = _table(tap, batch_max=200)

    def received() -> int:  # cheap: lines printed so far
        return tap.out.read_bytes().count(b"\n") if tap.out.exists() else 0

    for _ in range(2):
        start = received()
        proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", {"o": table}), cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while received() < start + 1500 and time.monotonic() < deadline:
                assert proc.poll() is None
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert len({r["attrs"]["vllm_audit.record_hash"] for r in tap.records()}) < log.next_seq  # killed mid-way
    drain(tmp_path, _sink(tmp_path, tap), ship=FAST)
    deadline = time.monotonic() + 20
    while len({r["attrs"]["vllm_audit.record_hash"] for r in tap.records()}) < log.next_seq:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    dups = _check(tap.records(), tmp_path)
    print(f"otlp kill -9: {log.next_seq} entries, {dups} duplicates")
    assert dups <= 2 * 200


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "received.jsonl", "--max-body", "20000", oteltap=False)
    r.start()
    try:
        yield r
    finally:
        r.stop()


def test_bad_data_is_bisected_and_only_the_refused_records_quarantined(tmp_path: Path, strict: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(30)
    log.write(1, pad=30_000)
    log.write(40)
    log.write(1, pad=30_000)
    log.write(10)
    big = {31, 72}  # seq 0 is the writer_started event
    sink = _sink(tmp_path, strict, batch_max=64)
    runner = drain(tmp_path, sink, ship=FAST)
    assert runner.statuses["o"].quarantined == 2
    q = [orjson.loads(x) for x in (tmp_path / "state" / "o" / "quarantine.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in q] == sorted(big)
    assert all("answered 400: log record body over 20000 bytes" in r["reason"] for r in q), q
    assert _check(strict.records(), tmp_path, missing=frozenset(big)) == 0
    assert sink.requests <= 2 * 2 * 7 + 2  # bisection: about log2(batch) requests per refused record


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    """503 with ``Retry-After: 1`` twice: the runner waits at least a second between those tries."""
    r = Receiver(tmp_path / "received.jsonl", "--unavailable", "2", oteltap=False)
    r.start()
    try:
        log = LiveLog(tmp_path / "log")
        log.write(20)
        runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, r)], FAST)
        status = runner.statuses["o"]
        runner.start()
        deadline = time.monotonic() + 30
        while status.delivered < log.next_seq and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.stop()
        assert status.delivered == log.next_seq and status.retried == 2
        assert "answered 503" in status.last_error
        t = [q["t"] for q in r.requests()]
        assert [q["status"] for q in r.requests()] == [503, 503, 200]
        assert t[1] - t[0] >= 0.95 and t[2] - t[1] >= 0.95  # the backoff alone would be < 0.2 s
        assert _check(r.records(), tmp_path) == 0
    finally:
        r.stop()


def test_partial_success_is_counted_not_retried(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "received.jsonl", "--reject-every", "5", oteltap=False)
    r.start()
    try:
        log = LiveLog(tmp_path / "log")
        log.write(49)
        sink = _sink(tmp_path, r, batch_max=25)
        runner = drain(tmp_path, sink, ship=FAST)
        assert sink.partial_rejected == 10  # seqs 0, 5, ..., 45
        assert runner.statuses["o"].retried == 0 and sink.requests == 2
        assert "receiver rejected" in runner.statuses["o"].last_error
        assert _check(r.records(), tmp_path, missing=frozenset(range(0, 50, 5))) == 0
    finally:
        r.stop()


def test_unexpected_answers_are_retried_never_quarantined(tmp_path: Path, tap: Receiver) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(5)
    sink = _sink(tmp_path, tap, endpoint=tap.endpoint.replace("/v1/logs", "/v1/nope"))
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    with pytest.raises(TransientError, match="answered 404"):
        runner.run_until_caught_up(10)
    assert runner.statuses["o"].quarantined == 0


def test_wire_helpers() -> None:
    assert status_message(b"\x08\x03\x12\x05hello") == "hello"
    assert status_message(b"plain text error") == "plain text error"
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

    ans = ExportLogsServiceResponse()
    ans.partial_success.rejected_log_records = 300
    ans.partial_success.error_message = "quota"
    assert partial_success(ans.SerializeToString()) == (300, "quota")
    assert partial_success(b"") == (0, "")


def test_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(**opts: Any) -> Any:
        return parse_sinks({"o": {"type": "otlp", **opts}}, "[sinks")["o"]

    env = SinkEnv(tmp_path / "log", tmp_path / "state", tmp_path)
    with pytest.raises(ConfigError, match=r"compression.*'zstd' is not one of"):
        parse(compression="zstd")
    spec = parse(endpoint="https://collector:4318", secret_headers={"Authorization": {"env": "OTLP_AUTH"}})
    with pytest.raises(ConfigError, match="sinks.o secret_headers.Authorization: environment variable OTLP_AUTH"):
        build_sink(spec, env)
    monkeypatch.setenv("OTLP_AUTH", "Bearer t0k")
    sink = build_sink(spec, env)
    assert isinstance(sink, OtlpSink)
    assert sink.endpoint == "https://collector:4318/v1/logs" and sink.headers["Authorization"] == "Bearer t0k"
    with pytest.raises(ConfigError, match="sinks.o endpoint: 'collector:4318' is not an http"):
        build_sink(parse(endpoint="collector:4318"), env)


def test_gzip_compression(tmp_path: Path) -> None:
    """gzip bodies, to the stdlib receiver (oteltap 1.0 answers 400 to any gzip body)."""
    r = Receiver(tmp_path / "received.jsonl", oteltap=False)
    r.start()
    try:
        log = LiveLog(tmp_path / "log")
        log.write(30)
        runner = drain(tmp_path, _sink(tmp_path, r, compression="gzip"), ship=FAST)
        assert runner.statuses["o"].quarantined == 0
        assert _check(r.records(), tmp_path) == 0
    finally:
        r.stop()


def test_the_gateway_keeps_answering_while_the_receiver_is_down(tmp_path: Path, tap: Receiver) -> None:
    """A real gateway with an otlp sink: the receiver goes away, every call is still answered,
    and the records arrive once it is back (oteltap is the receiver)."""
    cfg = f'[sinks.o]\ntype = "otlp"\nendpoint = "{tap.endpoint}"\nrecord_types = ["inference"]\n'
    sent = gateway_outage(tmp_path, cfg, "o", tap.stop, tap.start)
    assert set(sent) <= {orjson.loads(r["body"])["request_id"] for r in tap.records()}
