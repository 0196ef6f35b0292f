"""The syslog sink against a real rsyslogd (Debian's rsyslog + rsyslog-gnutls) receiving over TLS.

Each test runs its own rsyslogd instance (own config, ports, work directory and pid file). The
instance writes every message's parsed RFC 5424 fields and its raw bytes as JSON
(``parser.escapeControlCharactersOnReceive="off"``), so arrival is compared byte for byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import need_service
from tests.helpers import ROOT, free_port
from tests.sinks.conftest import LiveLog, build_sinks, gateway_outage, inference, make_tls_files, one_sink, shipper_argv
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.base import CursorFile
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.registry import parse_sinks
from vllm_audit.sinks.syslog import BOM, SyslogSink, sd_escape

FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.3, status_interval_s=0.1)

_FIELDS = [
    ("pri", "pri", ""),
    ("version", "protocol-version", ""),
    ("host", "hostname", ' format="json"'),
    ("app", "app-name", ' format="json"'),
    ("procid", "procid", ' format="json"'),
    ("msgid", "msgid", ' format="json"'),
    ("sd", "structured-data", ' format="json"'),
    ("msg", "msg", ' format="json"'),
    ("raw", "rawmsg", ' format="json"'),
]
_OPEN = ["{"] + ['\\",'] * (len(_FIELDS) - 1)  # the quote closing the previous value, a comma
_TEMPLATE = "".join(
    f'constant(value="{o}\\"{key}\\":\\"") property(name="{prop}"{extra})\n'
    for o, (key, prop, extra) in zip(_OPEN, _FIELDS, strict=True)
)


class Rsyslog:
    """One rsyslogd of our own: a TLS and a plain TCP input, every message to ``out.jsonl``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_tls_files(work / "tls")
        self.tls_port, self.tcp_port = free_port(), free_port()
        self.out = work / "out.jsonl"
        self.conf = work / "rsyslog.conf"
        self.conf.write_text(
            f"""
global(workDirectory="{work}" parser.escapeControlCharactersOnReceive="off" maxMessageSize="256k"
       defaultNetstreamDriverCAFile="{self.ca}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp")
template(name="parsed" type="list") {{
{_TEMPLATE}constant(value="\\"}}\\n")
}}
ruleset(name="in") {{ action(type="omfile" file="{self.out}" template="parsed") }}
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="in"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" ruleset="in")
""",
            "utf-8",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.work / "rsyslogd.err", "ab") as err:
            self.proc = subprocess.Popen(
                ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.work / "rsyslogd.pid")],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / "rsyslogd.err").read_text()
            try:
                for port in (self.tcp_port, self.tls_port):
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("rsyslogd did not listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None

    def received(self) -> list[dict[str, Any]]:
        """The messages rsyslog wrote, in file order.

        A killed rsyslog can leave its last line half written; once restarted it appends after
        it, so that line holds a torn message and then a whole one. The whole one is taken (it
        starts with the template's first key, which cannot occur unescaped inside a value); the
        torn one is rsyslog's loss, which the sink's replay window must make good.
        """
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        rows = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                start = line.rfind(b'{"pri":"')
                if start <= 0:
                    raise
                rows.append(orjson.loads(line[start:]))
        return rows

    def wait_for(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The messages received once there are at least ``n`` (or at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.received()
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def wait_all(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The messages received once seqs ``0..n-1`` all arrived (or at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.received()
            if len(set(_seqs(rows))) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    need_service(shutil.which("rsyslogd") is not None, "rsyslogd (scripts/services.d/rsyslog.sh)")
    server = Rsyslog(tmp_path / "rsyslog")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _table(rs: Rsyslog, **options: Any) -> dict[str, Any]:
    return {"type": "syslog", "host": "localhost", "port": rs.tls_port, "ca_file": str(rs.ca), **options}


def _sink(tmp_path: Path, rs: Rsyslog, **options: Any) -> SyslogSink:
    return one_sink(tmp_path, "s", _table(rs, **options), SyslogSink)


def _entries(log_dir: Path, log: LiveLog) -> list[Entry]:
    return LogReader(log_dir).read(Cursor(log.writer_id), 100_000)


def _seqs(rows: list[dict[str, Any]]) -> list[int]:
    out = []
    for r in rows:
        sd = r["sd"]
        start = sd.index(' seq="') + 6
        out.append(int(sd[start : sd.index('"', start)]))
    return out


def test_tls_arrival_is_byte_exact_and_fields_parse(tmp_path: Path, rsyslog: Rsyslog) -> None:
    log = LiveLog(tmp_path / "log")
    odd = [inference(i) for i in range(5)]
    odd[1]["request_id"] = 'id "quoted" \\ back ] bracket'  # SD-PARAM escaping (RFC 5424 §6.3.3)
    odd[2]["status"], odd[2]["http_status"] = "upstream_error", 502
    odd[3]["output_response"] = "line one\nline two\ttab \x01 ctl \u2028 sep é中"
    log.write(0, records=odd)
    log.write(150, batch=40)
    sink = _sink(tmp_path, rsyslog, hostname="gw-1.example", facility="local3")
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    assert runner.run_until_caught_up(30)
    entries = _entries(tmp_path / "log", log)
    rows = rsyslog.wait_for(len(entries))
    assert len(rows) == len(entries)
    assert _seqs(rows) == [e.seq for e in entries]  # complete, in order
    for entry, row in zip(entries, rows, strict=True):
        msg = sink.message(entry)
        assert row["raw"].encode() == msg  # byte for byte
        assert row["msg"].encode() == BOM + entry.line
        assert (row["version"], row["host"], row["app"]) == ("1", "gw-1.example", "vllm-audit")
        assert row["procid"] == str(os.getpid())
        assert row["msgid"] == entry.record_type
        rec = entry.record()
        sev = {"ok": 6, "upstream_error": 3}.get(rec.get("status", ""), 5)  # events: notice
        assert row["pri"] == str(19 * 8 + sev)
        rid = rec.get("request_id")
        expect_sd = f'[vllm-audit@32473 writer_id="{entry.writer_id}" seq="{entry.seq}" record_hash="{entry.leaf_hex}"'
        expect_sd += f' request_id="{sd_escape(rid).decode()}"]' if isinstance(rid, str) else "]"
        assert row["sd"] == expect_sd
    assert r'request_id="id \"quoted\" \\ back \] bracket"' in rows[2]["sd"]


def test_plain_tcp_with_ecs_messages(tmp_path: Path, rsyslog: Rsyslog) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(40)
    table = {"type": "syslog", "host": "127.0.0.1", "port": rsyslog.tcp_port, "transport": "tcp"}
    sink = build_sinks(tmp_path / "log", tmp_path / "state", {"s": {**table, "message_format": "ecs"}})[0]
    assert Runner(tmp_path / "log", tmp_path / "state", [sink], FAST).run_until_caught_up(30)
    entries = _entries(tmp_path / "log", log)
    rows = rsyslog.wait_for(len(entries))
    assert [orjson.loads(r["msg"].encode()[3:]) for r in rows] == [to_ecs(e) for e in entries]


@pytest.mark.parametrize("problem", ["unknown CA", "wrong name"])
def test_tls_refuses_a_receiver_it_cannot_verify(tmp_path: Path, rsyslog: Rsyslog, problem: str) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(5)
    if problem == "unknown CA":
        other, _, _ = make_tls_files(tmp_path / "other")
        sink = _sink(tmp_path, rsyslog, ca_file=str(other))
    else:
        sink = _sink(tmp_path, rsyslog, server_name="not-the-receiver.example")
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while runner.statuses["s"].retried < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        runner.stop()
    status = runner.statuses["s"]
    assert status.retried >= 2 and status.delivered == 0
    assert "CERTIFICATE_VERIFY_FAILED" in status.last_error
    assert rsyslog.received() == []


def test_a_message_over_max_message_bytes_is_quarantined_and_does_not_block(tmp_path: Path, rsyslog: Rsyslog) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(10)
    log.write(1, pad=5000)
    log.write(10)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, rsyslog, max_message_bytes=4000)], FAST)
    assert runner.run_until_caught_up(30)
    assert runner.statuses["s"].quarantined == 1
    q = orjson.loads((tmp_path / "state" / "s" / "quarantine.jsonl").read_bytes())
    assert q["seq"] == 11 and "max_message_bytes" in q["reason"]
    rows = rsyslog.wait_for(log.next_seq - 1)
    assert _seqs(rows) == [s for s in range(log.next_seq) if s != 11]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_receiver_down_under_load_loses_nothing_and_duplicates_are_counted(
    tmp_path: Path, rsyslog: Rsyslog, how: signal.Signals
) -> None:
    """rsyslog is stopped (or killed) while records keep coming and the sink keeps sending, then
    restarted.

    Syslog has no acknowledgement and no dedupe: what the sink sent on the connection that broke
    after its last committed position may arrive twice. The test counts those duplicates and
    checks they stay within what the sink reports as unconfirmed. A killed rsyslog loses what it
    had received but not yet read (it hung first): the trailing cursor (``replay_window_s``) sends
    it again.
    """
    log = LiveLog(tmp_path / "log")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            log.write(20, batch=20)
            time.sleep(0.002)  # pacing the producer, not synchronisation

    sink = _sink(tmp_path, rsyslog, replay_window_s=0.5, batch_max=50, ack_timeout_s=2)
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    writer = threading.Thread(target=load)
    writer.start()
    runner.start()
    try:
        rsyslog.wait_for(500)
        if how == signal.SIGKILL:  # it hangs first: what it is sent is acknowledged by TCP, never read
            assert rsyslog.proc is not None
            rsyslog.proc.send_signal(signal.SIGSTOP)
            sent = runner.statuses["s"].delivered
            deadline = time.monotonic() + 10
            while runner.statuses["s"].delivered < sent + 40 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert runner.statuses["s"].delivered >= sent + 40
        rsyslog.stop(how)
        down_at = log.next_seq
        deadline = time.monotonic() + 30
        while (log.next_seq < down_at + 1000 or runner.statuses["s"].retried < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.statuses["s"].retried >= 2
        rsyslog.start()
        rsyslog.wait_for(len(rsyslog.received()) + 500)
    finally:
        stop.set()
        writer.join()
    deadline = time.monotonic() + 60
    while runner.statuses["s"].lag_records and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.stop()
    rows = rsyslog.wait_all(log.next_seq)
    seqs = _seqs(rows)
    counts = Counter(seqs)
    assert set(counts) == set(range(log.next_seq)), "lost records"
    duplicates = sum(c - 1 for c in counts.values())
    print(f"syslog receiver {how.name}: {log.next_seq} records, {duplicates} duplicates")
    assert duplicates <= sink.unconfirmed_on_break
    # per-writer order: each arrival continues the one before, or restarts a replay (never skips)
    assert all(b == a + 1 or b <= a for a, b in zip(seqs, seqs[1:], strict=False))


def test_kill_9_of_the_shipper_resumes_from_the_cursor(tmp_path: Path, rsyslog: Rsyslog) -> None:
    """A shipper killed mid-stream, after it committed a cursor: a new one resumes there. Records
    before the cursor arrive once; the replayed tail after it at most twice (syslog cannot dedupe);
    none is lost."""
    log = LiveLog(tmp_path / "log")
    log.write(2000, batch=500)
    tables = {"s": _table(rsyslog, batch_max=100, replay_window_s=0.2)}
    proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", tables, poll_interval_s=0.02), cwd=ROOT)
    cursors = CursorFile(tmp_path / "state" / "s" / "cursors.json")
    # Records keep coming (~1 s): the trailing cursor is committed as later batches are sent, once
    # a batch has stayed acknowledged for replay_window_s; the kill comes right after that.
    def keep_writing() -> None:
        for _ in range(60):
            log.write(50, batch=50)
            time.sleep(0.01)  # pacing the producer, not synchronisation

    more = threading.Thread(target=keep_writing)
    try:
        rsyslog.wait_for(1000)
        more.start()
        deadline = time.monotonic() + 30
        while not cursors.load() and time.monotonic() < deadline:
            time.sleep(0.005)  # polling the condition, not standing in for it
        assert cursors.load(), "the shipper committed no cursor"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if more.ident is not None:
            more.join()
    resume = cursors.load()[log.writer_id].next_seq
    assert 0 < resume < log.next_seq
    sink = _sink(tmp_path, rsyslog)
    assert Runner(tmp_path / "log", tmp_path / "state", [sink], FAST).run_until_caught_up(60)
    rows = rsyslog.wait_all(log.next_seq)  # one connection: replayed ones arrived before the last
    counts = Counter(_seqs(rows))
    assert set(counts) == set(range(log.next_seq)), "lost records"
    duplicates = sum(c - 1 for c in counts.values())
    print(f"syslog shipper kill -9: {log.next_seq} records, resumed at {resume}, {duplicates} duplicates")
    assert max(counts.values()) <= 2
    assert all(seq >= resume for seq, n in counts.items() if n > 1), "a record before the cursor was sent again"


def test_config_errors_name_the_key() -> None:
    def parse(**kw: Any) -> None:
        parse_sinks({"s": {"type": "syslog", "host": "h", **kw}}, "[sinks")

    with pytest.raises(ConfigError, match="host is required"):
        parse_sinks({"s": {"type": "syslog"}}, "[sinks")
    with pytest.raises(ConfigError, match="facility 'loc0'"):
        parse(facility="loc0")
    with pytest.raises(ConfigError, match="severity.event"):
        parse(severity={"event": "loud"})
    with pytest.raises(ConfigError, match="unknown key 'inference.weird'"):
        parse(severity={"inference.weird": "info"})
    with pytest.raises(ConfigError, match="transport = 'tls'"):
        parse(transport="tcp", ca_file="/x")
    with pytest.raises(ConfigError, match="TLS files"):
        build_sinks(Path("/tmp"), Path("/tmp"), {"s": {"type": "syslog", "host": "h", "ca_file": "/nonexistent"}})


def test_the_gateway_keeps_answering_while_rsyslog_is_down(tmp_path: Path, rsyslog: Rsyslog) -> None:
    cfg = (
        f'[sinks.s]\ntype = "syslog"\nhost = "localhost"\nport = {rsyslog.tls_port}\nca_file = "{rsyslog.ca}"\n'
        'record_types = ["inference"]\nreplay_window_s = 0.5\n'
    )
    sent = gateway_outage(tmp_path, cfg, "s", rsyslog.stop, rsyslog.start)
    rows = rsyslog.wait_for(len(sent))
    ids = [orjson.loads(r["msg"].encode()[3:])["request_id"] for r in rows]
    assert set(sent) <= set(ids)
    print(f"syslog behind a gateway: {len(ids) - len(set(ids))} duplicates")
