"""Detector benchmark: records/s with every rule (real Redis), with the classifier, and alert delay.

    .venv/bin/python bench/detect/run.py [N]

Rules engine: every default rule planned over N parsed records in batches of 2000, one thread,
no I/O (with the hyperscan pre-filter, and the plain engine for comparison). Detector end to end:
records are written through the real Chain first; the detector (one thread) then reads, parses,
evaluates and commits per batch of 2000 in Redis. Alert delay: a writer appends 200 benign records
plus one SQL-injection prompt every 0.1 s while the runner runs; delay = alert durable in the log
minus the attack's append (checkpoint) time; p50/p99 over the attacks.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.detect.conftest import REDIS_URL, benign_traffic, rec
from tests.sinks.conftest import LiveLog

from vllm_audit.config import load_config
from vllm_audit.detect.projection import build_detector
from vllm_audit.detect.state import RedisState
from vllm_audit.ship.runner import Runner


def engine_only(n: int, prefilter: bool) -> float:
    """Records/s of :meth:`Engine.plan` alone (baselines fetched, no Redis, no log)."""
    from vllm_audit.detect.engine import Engine
    from vllm_audit.detect.rules import load_rules
    from vllm_audit.integrity.codec import Entry

    items = []
    for i, r in enumerate(benign_traffic(0, n)):
        e = Entry("bench", i, "00" * 32, b"\0" * 32, orjson.dumps(r), "inference")
        items.append((e, e.record()))
    eng = Engine(load_rules(None), prefilter=prefilter)
    t = time.perf_counter()
    for i in range(0, n, 2000):
        batch = items[i : i + 2000]
        eng.baseline_keys(r for _, r in batch)
        plan = eng.plan(batch, {})
        eng.templates(plan.cands, detector="bench")
    return n / (time.perf_counter() - t)


def throughput(n: int, classifier: bool) -> float:
    d = Path(tempfile.mkdtemp())
    live = LiveLog(d / "log")
    live.write(0, records=benign_traffic(0, n), batch=2000)
    live.close()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    detect = {"enabled": True, "redis_url": REDIS_URL, "redis_prefix": prefix, "instance": "bench"}
    cfg = load_config(None, {"log": {"dir": str(d / "log")}, "detect": {**detect, "classifier": classifier}})
    det = build_detector(cfg)
    runner = Runner(d / "log", d / "ship", [det], load_config(None, {"ship": {"batch_max": 2000}}).ship)
    t = time.perf_counter()
    runner.run_until_caught_up(600)
    dt = time.perf_counter() - t
    RedisState(REDIS_URL, "x", prefix).reset()
    return det.records / dt


def delay(attacks: int = 30) -> tuple[float, float]:
    d = Path(tempfile.mkdtemp())
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    cfg = load_config(None, {"log": {"dir": str(d / "log")},
                             "ship": {"poll_interval_s": 0.05},
                             "detect": {"enabled": True, "redis_url": REDIS_URL, "redis_prefix": prefix,
                                        "instance": "b"}})
    live = LiveLog(d / "log")
    det = build_detector(cfg)
    runner = Runner(d / "log", d / "ship", [det], cfg.ship)
    runner.start()
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for aid in list(det.emitted_ids):
                seen.setdefault(aid, time.perf_counter())
            time.sleep(0.005)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    before: set[str] = set()
    for k in range(attacks):
        recs = benign_traffic(0, 200)
        attack = rec(k, user=f"attacker-{k}", input_prompt=[{"role": "user", "content": "x' OR '1'='1' --"}])
        live.write(0, records=[*recs, attack], batch=201)
        t = time.perf_counter()
        deadline = t + 10
        while time.perf_counter() < deadline and len(det.emitted_ids) <= len(before):
            time.sleep(0.002)
        new = set(det.emitted_ids) - before
        before |= new
        for aid in new:
            sent[aid] = t
        time.sleep(0.1)
    stop.set()
    runner.stop()
    live.close()
    RedisState(REDIS_URL, "x", prefix).reset()
    ds = sorted(seen[a] - sent[a] for a in sent if a in seen)
    if not ds:
        return float("nan"), float("nan")
    return ds[len(ds) // 2], ds[min(len(ds) - 1, int(len(ds) * 0.99))]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40000
    print(f"rules engine:      {engine_only(n, True):,.0f} records/s  ({n} records, one thread, pre-filter on)")
    print(f"rules engine:      {engine_only(n, False):,.0f} records/s  (plain: every regex on every text)")
    print(f"rules only:        {throughput(n, False):,.0f} records/s  ({n} records, one thread, real Redis)")
    print(f"rules+classifier:  {throughput(n // 4, True):,.0f} records/s")
    p50, p99 = delay()
    print(f"alert delay under load: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
