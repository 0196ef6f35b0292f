"""Writer bench (helper of bench/run.py): records/s made durable by ``AuditWriter``.

Real :class:`vllm_audit.capture.Exchange` objects for realistic chat requests (a ~1 KB user
prompt of prose, code and log lines from ``bench/redaction/realistic.py``, a different one per
exchange; half streamed with 20 tokens + usage chunk, half not; one in ten prompts also carries an
e-mail and a phone number so the redactor has something to do; every exchange holds bytes objects
of its own, as the edge's would) go through the real writer thread: finalize (JSON + SSE parsing),
redaction (default ``[privacy]`` policy), hash chain, group commit (one fdatasync per batch).
Timed from the first submit to the last record on disk (``writer.drain()``), after the writer
started and, with prepare processes, after 256 untimed records warmed them. CPU time is reported for this process
and, separately, for the prepare processes (``/proc/PID/stat`` of each, read before they stop).

The exchanges are all built before the clock starts and then frozen out of the collector's way
(``gc.freeze()``: they are still freed by reference counting): otherwise every full collection walks
all N of them, which no writer behind a live edge ever holds (it cost ~20 % of the CPU per record).

``python bench/_writer.py N [BATCH_MAX] [PREPARE_PROCESSES]`` prints one JSON object.
``python bench/_writer.py --profile N`` prints a cProfile of the same per-record work, in-thread.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "redaction"))

import _upstream
import orjson
from realistic import prompts

from vllm_audit import hooks
from vllm_audit.capture import Exchange
from vllm_audit.config import load_config
from vllm_audit.demo import DemoEngine
from vllm_audit.ids import accept_request_id
from vllm_audit.writer import AuditWriter

PROMPT_CHARS = 1000


def _bodies(n: int) -> list[tuple[bytes, Any, bytes, list[bytes]]]:
    """``n`` distinct (request body, parsed request for streams, content type, response chunks)."""
    texts = prompts(seed=20261202, n=max(1, n))

    async def go() -> list[tuple[bytes, Any, bytes, list[bytes]]]:
        app = DemoEngine()
        out = []
        for i in range(n):
            pii, stream = i % 10 == 0, i % 2 == 1
            text = texts[i][:PROMPT_CHARS]
            if pii:
                text += " Mail jane.doe@example.com or call +1 415 555 0134 about ticket 4711."
            msgs = [_upstream.MESSAGES[0], {"role": "user", "content": text}]
            req: dict[str, Any] = {"model": "demo-model", "messages": msgs, "max_tokens": 20}
            if stream:
                req["stream"] = True
                req["stream_options"] = {"include_usage": True}
            body = orjson.dumps(req)
            _status, headers, chunks = await _upstream.capture(app, body)
            ctype = dict(headers).get(b"content-type", b"")
            out.append((body, req if stream else None, ctype, chunks))
        return out

    return asyncio.run(go())


def make_exchanges(n: int) -> list[Exchange]:
    anon = hooks.anonymous()
    out = []
    for i, (body, req_json, ctype, chunks) in enumerate(_bodies(n)):
        stream = i % 2 == 1
        rid, _ = accept_request_id(None, 128)
        ex = Exchange(rid, "POST", "/v1/chat/completions")
        ex.client_ip = ex.peer_ip = "127.0.0.1"
        ex.identity = anon
        ex.upstream = "http://127.0.0.1:8011"
        ex.request_body = body
        ex.request_bytes = len(body)
        ex.http_status = 200
        ex.content_type = ctype
        if stream:
            ex.request_json = req_json
            ex.stream = True
            ex.usage_injected = True
            ex.chunks = list(chunks[:-2]) + [chunks[-1]]  # the middleware strips the usage chunk
            ex.usage_chunk = chunks[-2].rstrip(b"\n")
        else:
            ex.chunks = list(chunks)
        ex.response_bytes = sum(len(c) for c in chunks)
        ex.t_first = ex.t0 + 0.0002
        ex.t_end = ex.t0 + 0.0005
        ex.completed = True
        out.append(ex)
    return out


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def count_lines(log_dir: str) -> dict[str, int]:
    inference = events = 0
    for seg in Path(log_dir).glob("writers/*/seg-*.jsonl"):
        with open(seg, "rb") as f:
            for line in f:
                if b'"record_type":"inference"' in line[:200]:
                    inference += 1
                else:
                    events += 1
    return {"inference": inference, "other": events}


def _wait_drained(w: AuditWriter, timeout: float) -> None:
    """Until everything submitted is written (``drain``; an older writer without it: poll its depth)."""
    if hasattr(w, "drain"):
        w.drain(timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while w.depth() > 0 and time.monotonic() < deadline:
        time.sleep(0.005)


def _pool_pids(w: AuditWriter) -> list[int]:
    pool = getattr(w, "_prepare_procs", None)
    return sorted(getattr(pool, "_processes", None) or {})


def run(n: int, batch_max: int, procs: int = 0) -> dict[str, Any]:
    warm = 256 if procs else 0  # an older writer starts its pool on the first batch: warm it untimed
    exchanges = make_exchanges(n + warm)
    # The bench's input (every exchange built up front) is not the writer's state: keep the
    # collector from walking it on every full collection (a gateway never holds 20,000 at once).
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="vllm-audit-bench-writer-") as tmp:
        log_cfg = {"dir": tmp, "batch_max": batch_max, "queue_size": n + warm + 10, "prepare_processes": procs}
        cfg = load_config(None, {"log": log_cfg, "ship": {"in_process": False}})
        w = AuditWriter(cfg)
        w.start()
        for ex in exchanges[:warm]:
            w.submit(ex)
        _wait_drained(w, 600)
        pids = _pool_pids(w)
        c0, p0 = time.process_time(), _proc_cpu(pids)
        t0 = time.perf_counter()
        for ex in exchanges[warm:]:
            w.submit(ex)
        _wait_drained(w, 600)
        t1 = time.perf_counter()
        c1, p1 = time.process_time(), _proc_cpu(pids)
        w.stop(timeout=600)
        lines = count_lines(tmp)
        m = w.metrics
        main_us = (c1 - c0) / n * 1e6
        prep_us = (p1 - p0) / n * 1e6
        return {
            "n": n,
            "batch_max": batch_max,
            "prepare_processes": procs,
            "seconds": round(t1 - t0, 3),
            "records_per_s": round(n / (t1 - t0)),
            "cpu_us_per_record": round(main_us, 1),
            "prepare_cpu_us_per_record": round(prep_us, 1),
            "total_cpu_us_per_record": round(main_us + prep_us, 1),
            "prepared_in_processes": m.prepared_in_processes_total,
            "fsyncs": m.batches_total,
            "mean_batch": round(m.records_written_total / max(1, m.batches_total), 1),
            "lines_inference": lines["inference"] - warm,
            "lines_other": lines["other"],
            "failure": w.failure,
            "load_avg": round(os.getloadavg()[0], 2),
        }


def profile(n: int) -> None:
    import cProfile
    import pstats

    from vllm_audit.integrity.chain import Chain

    exchanges = make_exchanges(n)
    with tempfile.TemporaryDirectory(prefix="vllm-audit-bench-writer-") as tmp:
        cfg = load_config(None, {"log": {"dir": tmp}})
        w = AuditWriter(cfg)  # not started: its per-record steps are driven here, in-thread
        chain = Chain(cfg.log.dir, cfg.integrity)
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for i in range(0, n, 256):
            entries = [w._prepare(ex) for ex in exchanges[i : i + 256]]
            chain.append(entries)
            chain.sync()
        pr.disable()
        dt = time.perf_counter() - t0
        chain.close()
        print(f"profiled {n} records in {dt:.2f}s under cProfile ({n / dt:,.0f}/s with profiling overhead)")
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(18)
        st.sort_stats("cumulative").print_stats(22)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        profile(int(sys.argv[2]) if len(sys.argv) > 2 else 20000)
    else:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
        bm = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
        procs = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        print(json.dumps(run(n, bm, procs)))
