"""The detector as a projection: two processes sharing real Redis, restarts, alerts in the log."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.detect.conftest import REDIS_URL, attack_traffic, benign_traffic, write_log
from tests.helpers import read_entries, verify_log
from vllm_audit.config import load_config
from vllm_audit.detect.projection import Detector, build_detector
from vllm_audit.ship.runner import Runner

ROOT = Path(__file__).resolve().parents[2]

#: One detector process: argv[1] = JSON {log_dir, prefix, instance}; runs until caught up.
DETECTOR = """
import sys, orjson
from pathlib import Path
from vllm_audit.config import load_config
from vllm_audit.detect.projection import build_detector
from vllm_audit.ship.runner import Runner
a = orjson.loads(sys.argv[1])
cfg = load_config(None, {"log": {"dir": a["log_dir"]}, "detect": {"enabled": True, "redis_url": a["redis"],
                  "redis_prefix": a["prefix"], "instance": a["instance"], "batch_max": 40}})
det = build_detector(cfg)
runner = Runner(a["log_dir"], Path(a["log_dir"]) / "ship", [det])
ok = runner.run_until_caught_up(120)
print(orjson.dumps({"ok": ok, "alerts": det.alerts, "records": det.records}).decode(), flush=True)
"""


def _config(log_dir: Path, prefix: str, instance: str, **detect: Any) -> Any:
    return load_config(
        None,
        {
            "log": {"dir": str(log_dir)},
            "detect": {"enabled": True, "redis_url": REDIS_URL, "redis_prefix": prefix, "instance": instance, **detect},
        },
    )


def _run_two(tmp_path: Path, prefix: str, traffic: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Write each traffic list to its own log; run one detector process per log, at the same time."""
    procs = []
    for i, records in enumerate(traffic):
        log_dir = tmp_path / f"log{i}"
        write_log(log_dir, records)
    for i in range(len(traffic)):
        arg = {"log_dir": str(tmp_path / f"log{i}"), "prefix": prefix, "instance": f"replica-{i}", "redis": REDIS_URL}
        procs.append(
            subprocess.Popen([sys.executable, "-c", DETECTOR, orjson.dumps(arg).decode()], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(orjson.loads(out.splitlines()[-1]))
    assert all(o["ok"] for o in outs)
    return outs


def _alerts(log_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_entries(log_dir) if e.get("record_type") == "alert"]


def test_two_detectors_share_windows_and_raise_each_alert_once(tmp_path: Path, prefix: str) -> None:
    """A burst and a repeated prompt split over two replicas' logs, plus a SQL injection, an abnormally
    long output and a leaked ID number: exactly one alert each, in the logs, covered by verify."""
    _run_two(tmp_path, prefix, [attack_traffic(0), attack_traffic(1)])
    alerts = _alerts(tmp_path / "log0") + _alerts(tmp_path / "log1")
    by_rule = Counter(a["rule"]["id"] for a in alerts)
    assert {
        "burst-per-user": 1,
        "repeated-prompt-many-users": 1,
        "sql-injection": 1,
        "output-length-abnormal": 1,
        "pii-in-output": 1,
    } == dict(by_rule)
    burst = next(a for a in alerts if a["rule"]["id"] == "burst-per-user")
    assert "scraper" == burst["group_value"] and burst["value"] >= 120
    assert burst["triggers"] and all(t["request_id"] for t in burst["triggers"])
    sqli = next(a for a in alerts if a["rule"]["id"] == "sql-injection")
    assert "mallory" == sqli["user_id"]
    for i in (0, 1):
        result = verify_log(tmp_path / f"log{i}")
        assert 0 == result.returncode, result.stdout + result.stderr


def test_benign_traffic_of_the_same_volume_raises_nothing(tmp_path: Path, prefix: str) -> None:
    """As many benign records (SQL questions, e-mail tags, usual lengths, many users) raise no alert."""
    volume = [len(attack_traffic(0)), len(attack_traffic(1))]
    _run_two(tmp_path, prefix, [benign_traffic(0, volume[0]), benign_traffic(1, volume[1])])
    assert [] == _alerts(tmp_path / "log0") + _alerts(tmp_path / "log1")


def test_restart_resumes_from_the_cursor_without_double_alerting(tmp_path: Path, prefix: str) -> None:
    """A detector restarted on a grown log reads only the new entries: the same attack again in the
    same window is deduped by the shared state, the earlier alerts are not raised twice."""
    from tests.sinks.conftest import LiveLog

    log_dir = tmp_path / "log"
    live = LiveLog(log_dir)
    try:
        traffic = attack_traffic(0)
        live.write(0, records=traffic, batch=50)
        det = build_detector(_config(log_dir, prefix, "one"))
        assert Runner(log_dir, log_dir / "ship", [det]).run_until_caught_up(60)
        rules = {a["rule"]["id"] for a in _alerts(log_dir)}
        assert {"sql-injection", "output-length-abnormal", "pii-in-output"} == rules
        live.write(0, records=[r | {"request_id": r["request_id"] + "-again"} for r in traffic[-3:]], batch=50)
        det2 = build_detector(_config(log_dir, prefix, "one"))
        assert Runner(log_dir, log_dir / "ship", [det2]).run_until_caught_up(60)
    finally:
        live.close()
    assert det2.records == 3  # only the new records were read
    assert 3 == len(_alerts(log_dir))
    assert 0 == sum(det2.alerts.values())


def test_alerts_pending_when_the_log_append_failed_are_appended_once_after_restart(tmp_path: Path, prefix: str) -> None:
    """The emit fails after the state committed: the alerts stay pending and the next start appends each
    once; if they had reached the log before the crash, they are not appended again."""
    log_dir = tmp_path / "log"
    write_log(log_dir, attack_traffic(0))
    cfg = _config(log_dir, prefix, "one")
    det = build_detector(cfg)

    def broken(entries: list[dict[str, Any]]) -> None:
        raise OSError("disk full")

    det._emit = broken
    runner = Runner(log_dir, log_dir / "ship", [det])
    with pytest.raises(OSError, match="disk full"):
        runner.run_until_caught_up(30)
    assert [] == _alerts(log_dir)
    pending = det.state.pending()
    assert pending
    # Simulate a crash after the append but before the queue was trimmed for the first alert.
    from vllm_audit.detect.alerts import finalize, log_emitter

    log_emitter(cfg)([finalize(*pending[0])])
    det2 = build_detector(cfg)
    assert Runner(log_dir, log_dir / "ship", [det2]).run_until_caught_up(60)
    ids = [a["alert_id"] for a in _alerts(log_dir)]
    assert len(ids) == len(set(ids)) >= 3


def test_alerts_are_not_input(tmp_path: Path, prefix: str) -> None:
    """Alert and event entries are skipped as input: rerunning over a log full of alerts adds none."""
    log_dir = tmp_path / "log"
    write_log(log_dir, attack_traffic(0))
    det = build_detector(_config(log_dir, prefix, "one"))
    assert Runner(log_dir, log_dir / "ship", [det]).run_until_caught_up(60)
    n = len(_alerts(log_dir))
    det2: Detector = build_detector(_config(log_dir, prefix + "fresh:", "two"))
    assert Runner(log_dir, log_dir / "ship2", [det2]).run_until_caught_up(60)
    assert det2.records == len(attack_traffic(0))
    # the fresh detector (no shared state) alerts again on the records, never on the alerts
    assert sum(det2.alerts.values()) == n


@pytest.mark.parametrize("metric", ["vllm_audit_alerts_total", "vllm_audit_detect_records_total"])
def test_alerts_are_counted_in_metrics(tmp_path: Path, prefix: str, metric: str) -> None:
    """The runner's /metrics lines include the detector's alert counts."""
    log_dir = tmp_path / "log"
    write_log(log_dir, attack_traffic(0))
    det = build_detector(_config(log_dir, prefix, "one"))
    runner = Runner(log_dir, log_dir / "ship", [det])
    assert runner.run_until_caught_up(60)
    lines = runner.render_metrics()
    assert any(line.startswith(metric) and not line.endswith(" 0") for line in lines)
