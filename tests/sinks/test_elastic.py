"""The elasticsearch sink against an Elasticsearch-API server over real HTTP connections.

Stand-in: the Elasticsearch service of the ``noida-db`` wheel (``noida-db start --only
elasticsearch``, installed into its own venv by scripts/services.d/noida.sh), which answers as
Elasticsearch 8.15: ``_bulk`` with the documented response (``errors`` flag, per-item ``status``,
409 ``version_conflict_engine_exception`` on ``create`` of an existing ``_id``, 400
``document_parsing_exception`` / ``strict_dynamic_mapping_exception`` from its mappings),
``_refresh``, ``_search`` (with ``_seq_no``), ``_count``, ``_doc``, and it keeps its data across
restarts. No JVM build of Elasticsearch or OpenSearch installs on these machines. Each test starts
its own server on a free port with a temporary data dir, so it can stop it for the outage tests.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import need_service
from tests.helpers import ROOT, free_port
from tests.sinks.conftest import (
    FAST,
    NOIDA_VENV,
    LiveLog,
    ServerProcess,
    drain,
    entries_by_leaf,
    gateway_outage,
    inference,
    noida_binary,
    one_sink,
    shipper_argv,
)
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks._http import TransientError
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.elastic import ElasticSink
from vllm_audit.sinks.registry import parse_sinks

pytestmark = pytest.mark.service

INDEX = "vllm-audit-2026.07.01"  # the records' day (conftest.inference); events land in today's index


class Search(ServerProcess):
    """One noida-db process serving only the Elasticsearch API, on its own port and data dir."""

    what = "the Elasticsearch-API server"

    def __init__(self, binary: str, data_dir: Path) -> None:
        super().__init__(free_port())
        self.binary = binary
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "start", "--only", "elasticsearch", "--elasticsearch-port", str(self.port),
                "--data-dir", str(self.data_dir)]  # fmt: skip

    def start(self, log: Path | None = None) -> None:
        super().start(log or self.data_dir.parent / "search.log")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return orjson.loads(resp.read())

    def docs(self, index: str = "vllm-audit-*") -> list[dict[str, Any]]:
        """Every stored document (hits with ``_index``, ``_id``, ``_seq_no``, ``_source``)."""
        self.call("POST", f"/{index}/_refresh")
        out: list[dict[str, Any]] = []
        hits = self.call("POST", f"/{index}/_search", {"size": 10_000, "seq_no_primary_term": True})["hits"]
        out += hits["hits"]
        assert hits["total"]["value"] == len(out) < 10_000  # the tests stay under one page
        return out


@pytest.fixture
def es(tmp_path: Path) -> Iterator[Search]:
    binary = noida_binary()
    need_service(binary is not None, f"noida-db (Elasticsearch API) in {NOIDA_VENV}: scripts/services.d/noida.sh")
    assert binary is not None
    data = tmp_path / "search"
    data.mkdir()
    s = Search(binary, data)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _table(es: Search, **options: Any) -> dict[str, Any]:
    return {"type": "elasticsearch", "url": es.url, **options}


def _sink(tmp_path: Path, es: Search, **options: Any) -> ElasticSink:
    return one_sink(tmp_path, "es", _table(es, **options), ElasticSink)


def _entries(tmp_path: Path) -> dict[str, Entry]:
    return entries_by_leaf(tmp_path / "log")


def _check(docs: list[dict[str, Any]], tmp_path: Path, missing: frozenset[int] = frozenset()) -> None:
    """Every entry (but the ``missing`` seqs) is stored once, as its ECS document, in per-writer order."""
    entries = _entries(tmp_path)
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids))  # _id = record hash: never twice
    want = {h for h, e in entries.items() if e.seq not in missing}
    assert set(ids) == want
    for d in docs:
        e = entries[d["_id"]]
        assert d["_source"] == orjson.loads(orjson.dumps(to_ecs(e))), e.key
        day = "2026.07.01" if e.record_type == "inference" else d["_index"][-10:]
        assert d["_index"] == f"vllm-audit-{day}"
    by_index: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_index.setdefault(d["_index"], []).append(d)
    for group in by_index.values():
        last: dict[str, int] = {}
        for d in sorted(group, key=lambda d: d["_seq_no"]):
            e = entries[d["_id"]]
            assert e.seq > last.get(e.writer_id, -1), f"{e.key} stored out of order"
            last[e.writer_id] = e.seq


def test_records_arrive_complete_and_in_per_writer_order(tmp_path: Path, es: Search) -> None:
    a, b = LiveLog(tmp_path / "log"), LiveLog(tmp_path / "log")
    a.write(700, batch=70)
    b.write(400, batch=30)
    sink = _sink(tmp_path, es, batch_max=200)
    runner = drain(tmp_path, sink)
    assert runner.statuses["es"].delivered == a.next_seq + b.next_seq
    docs = es.docs()
    assert len(docs) == a.next_seq + b.next_seq
    _check(docs, tmp_path)
    one = es.call("GET", f"/{INDEX}/_doc/{docs[0]['_id']}")
    assert one["found"] and one["_source"]["event"]["id"] == docs[0]["_id"]  # event.id = _id = record hash
    # a replay of everything (cursor lost) stores nothing twice: create answers 409 for each
    (tmp_path / "state" / "es" / "cursors.json").unlink()
    sink2 = _sink(tmp_path, es)
    drain(tmp_path, sink2)
    assert sink2.already_there == a.next_seq + b.next_seq
    assert len(es.docs()) == len(docs)


def test_index_op_type_replays_overwrite_in_place(tmp_path: Path, es: Search) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(50)
    drain(tmp_path, _sink(tmp_path, es, op_type="index"))
    (tmp_path / "state" / "es" / "cursors.json").unlink()
    sink = _sink(tmp_path, es, op_type="index")
    drain(tmp_path, sink)
    assert sink.already_there == 0
    docs = es.docs()
    _check(docs, tmp_path)
    stored = es.call("GET", f"/{INDEX}/_doc/{next(d['_id'] for d in docs if d['_index'] == INDEX)}")
    assert stored["_version"] == 2  # overwritten by the replay, still one document


def test_rejected_documents_are_quarantined_and_do_not_block(tmp_path: Path, es: Search) -> None:
    """A mapping conflict (400 from the server) and a document over max_request_bytes (refused before
    sending) are quarantined with their reasons; everything around them is stored."""
    es.call("PUT", f"/{INDEX}", {"mappings": {"properties": {"user": {"properties": {"id": {"type": "long"}}}}}})
    log = LiveLog(tmp_path / "log")
    recs = [dict(inference(i), user_id=str(100 + i)) for i in range(30)]
    recs[7]["user_id"] = "not-a-number"
    recs[21]["user_id"] = "neither"
    recs[12]["output_response"] = "x" * 40_000
    log.write(0, records=recs, batch=10)
    sink = _sink(tmp_path, es, batch_max=8, max_request_bytes=20_000)
    runner = drain(tmp_path, sink)
    seq0 = log.next_seq - 30  # the writer_started event came first
    bad = {seq0 + 7, seq0 + 21, seq0 + 12}
    assert runner.statuses["es"].quarantined == 3
    q = [orjson.loads(x) for x in (tmp_path / "state" / "es" / "quarantine.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in q] == [seq0 + 7, seq0 + 12, seq0 + 21]
    assert "document_parsing_exception" in q[0]["reason"] and "user.id" in q[0]["reason"], q[0]
    assert "exceeds max_request_bytes" in q[1]["reason"], q[1]
    assert "document_parsing_exception" in q[2]["reason"]
    _check(es.docs(), tmp_path, missing=frozenset(bad))
    assert runner.statuses["es"].lag_records == 0


def test_server_down_under_load_then_back_loses_nothing(tmp_path: Path, es: Search) -> None:
    """The server stops while the log keeps growing; when it returns the sink catches up from its
    cursor. Bulk requests replayed after the outage are deduplicated by ``_id`` (409 on create): no
    entry is stored twice and none is missing."""
    log = LiveLog(tmp_path / "log")
    log.write(200)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and log.next_seq < 4500:
            log.write(20, batch=20)
            time.sleep(0.002)

    writer = threading.Thread(target=load)
    sink = _sink(tmp_path, es, batch_max=100, timeout_s=5)
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    status = runner.statuses["es"]
    writer.start()
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while status.delivered < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status.delivered >= 500
        es.stop()
        down_at = log.next_seq
        deadline = time.monotonic() + 30
        while (status.retried < 2 or log.next_seq < down_at + 800) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status.retried >= 2 and status.state == "retrying", status
        assert "127.0.0.1" in status.last_error
        assert log.next_seq - status.delivered > 500  # the log kept growing while the sink could not deliver
        es.start()
    finally:
        stop.set()
        writer.join()
    deadline = time.monotonic() + 60
    while (status.lag_records or status.delivered < log.next_seq) and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.stop()
    assert status.delivered == log.next_seq
    docs = es.docs()
    _check(docs, tmp_path)
    print(f"elasticsearch outage: {log.next_seq} entries, {len(docs)} documents, {sink.already_there} replays deduped")


def test_kill_9_of_the_shipper_mid_batch_resumes_from_the_cursor(tmp_path: Path, es: Search) -> None:
    """A shipper process is killed twice while it ships; the restarted one resumes from the cursor.
    The batch in flight at the kill is sent again and answered 409 (deduped by ``_id``)."""
    log = LiveLog(tmp_path / "log")
    log.write(6000, batch=500)
    table = _table(es, batch_max=200)

    def stored() -> int:
        try:
            es.call("POST", "/vllm-audit-*/_refresh")
            return int(es.call("GET", "/vllm-audit-*/_count")["count"])
        except OSError:
            return 0

    for _ in range(2):  # two kills at different points
        start = stored()
        proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", {"es": table}), cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while stored() < start + 1500 and time.monotonic() < deadline:
                assert proc.poll() is None
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert stored() < log.next_seq  # killed mid-way
    sink = _sink(tmp_path, es)
    drain(tmp_path, sink)
    docs = es.docs()
    _check(docs, tmp_path)
    print(f"elasticsearch kill -9: {log.next_seq} entries, {sink.already_there} replays deduped, 0 duplicates stored")


def test_a_refused_request_is_retried_never_quarantined(tmp_path: Path, es: Search) -> None:
    """A wrong URL (the server answers 400 "no handler found" for the whole request) blames the
    setup, not the data: the batch is retried from the cursor and nothing is quarantined."""
    log = LiveLog(tmp_path / "log")
    log.write(10)
    runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, es, url=es.url + "/a/b")], FAST)
    with pytest.raises(TransientError, match="answered 400.*no handler found"):
        runner.run_until_caught_up(10)
    assert runner.statuses["es"].quarantined == 0
    assert not (tmp_path / "state" / "es" / "cursors.json").exists()
    drain(tmp_path, _sink(tmp_path, es))  # the right URL: everything arrives
    _check(es.docs(), tmp_path)


def test_config_errors_name_the_key_and_secrets_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parse(**opts: Any) -> Any:
        return parse_sinks({"es": {"type": "elasticsearch", **opts}}, "[sinks")

    with pytest.raises(ConfigError, match=r"\[sinks\.es op_type.*'upsert' is not one of"):
        parse(op_type="upsert")
    with pytest.raises(ConfigError, match="data stream takes only"):
        parse(data_stream=True, op_type="index", index="logs-vllm-default")
    with pytest.raises(ConfigError, match="username and password go together"):
        parse(username="elastic")
    with pytest.raises(ConfigError, match="lower case"):
        parse(index="Audit")
    with pytest.raises(ConfigError, match="unknown key 'urls'"):
        parse(urls=["http://x"])
    spec = parse(username="elastic", password={"env": "ES_PW"}, url="https://es.example:9243/proxy")["es"]
    from vllm_audit.sinks.registry import SinkEnv, build_sink

    env = SinkEnv(tmp_path / "log", tmp_path / "state", tmp_path)
    with pytest.raises(ConfigError, match="sinks.es password: environment variable ES_PW is not set"):
        build_sink(spec, env)
    monkeypatch.setenv("ES_PW", "s3cret")
    sink = build_sink(spec, env)
    assert isinstance(sink, ElasticSink)
    assert sink.headers["Authorization"] == "Basic ZWxhc3RpYzpzM2NyZXQ="
    spec = parse(api_key={"env": "ES_PW"}, url="ftp://x")["es"]
    with pytest.raises(ConfigError, match="sinks.es url: 'ftp://x' is not an http"):
        build_sink(spec, env)
    spec = parse(api_key={"env": "ES_PW"})["es"]
    assert build_sink(spec, env).headers["Authorization"] == "ApiKey s3cret"  # type: ignore[attr-defined]


def test_index_name_from_the_record_timestamp_in_utc(tmp_path: Path) -> None:
    spec = parse_sinks({"es": {"type": "elasticsearch", "index": "audit-%Y.%m"}}, "[sinks")["es"]
    from vllm_audit.sinks.registry import SinkEnv, build_sink

    sink = build_sink(spec, SinkEnv(tmp_path, tmp_path, tmp_path))
    assert isinstance(sink, ElasticSink)
    assert sink.index_for("2026-07-01T12:00:00.000Z") == "audit-2026.07"
    assert sink.index_for("2026-07-01T00:30:00+02:00") == "audit-2026.06"  # UTC day/month
    stream = build_sink(
        parse_sinks({"es": {"type": "elasticsearch", "index": "logs-vllm-audit", "data_stream": True}}, "[s")["es"],
        SinkEnv(tmp_path, tmp_path, tmp_path),
    )
    assert isinstance(stream, ElasticSink) and stream.index_for("2026-07-01T12:00:00Z") == "logs-vllm-audit"


def test_the_gateway_keeps_answering_while_the_search_server_is_down(tmp_path: Path, es: Search) -> None:
    """A real gateway with an elasticsearch sink (noida-db's API as the stand-in): the server goes
    away, every call is still answered, and the documents arrive once it is back, each once."""
    cfg = f'[sinks.e]\ntype = "elasticsearch"\nurl = "{es.url}"\nrecord_types = ["inference"]\n'
    sent = gateway_outage(tmp_path, cfg, "e", es.stop, es.start, n_down=100, timeout=120)
    ids = [d["_source"]["http"]["request"]["id"] for d in es.docs()]
    assert set(sent) <= set(ids)
    assert len(ids) == len(set(ids))
