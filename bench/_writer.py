"""Writer bench (helper of bench/run.py): records/s made durable by ``AuditWriter``.

Real :class:`vllm_audit.capture.Exchange` objects for realistic chat requests (half streamed with
20 tokens + usage chunk, half not; one in ten prompts carries an e-mail and a phone number so the
redactor has something to do) go through the real writer thread: finalize (JSON + SSE parsing),
redaction (default ``[privacy]`` policy), hash chain, group commit (one fdatasync per batch).
Timed from the first submit to the last record on disk (``writer.stop()`` drains and joins).

``python bench/_writer.py N [BATCH_MAX]`` prints one JSON object.
``python bench/_writer.py --profile N`` prints a cProfile of the same per-record work, in-thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _upstream  # noqa: E402
import orjson  # noqa: E402

from vllm_audit import hooks  # noqa: E402
from vllm_audit.capture import Exchange  # noqa: E402
from vllm_audit.config import load_config  # noqa: E402
from vllm_audit.demo import DemoEngine  # noqa: E402
from vllm_audit.ids import accept_request_id  # noqa: E402
from vllm_audit.writer import AuditWriter  # noqa: E402


def _bodies() -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        app = DemoEngine()
        out: dict[str, Any] = {}
        for pii in (False, True):
            msgs = list(_upstream.MESSAGES)
            if pii:
                msgs = msgs[:-1] + [
                    {"role": "user", "content": "Mail jane.doe@example.com or call +1 415 555 0134 about ticket 4711."}
                ]
            for stream in (False, True):
                req: dict[str, Any] = {"model": "demo-model", "messages": msgs, "max_tokens": 20}
                if stream:
                    req["stream"] = True
                    req["stream_options"] = {"include_usage": True}
                body = orjson.dumps(req)
                status, headers, chunks = await _upstream.capture(app, body)
                ctype = dict(headers).get(b"content-type", b"")
                out[(pii, stream)] = (body, req if stream else None, ctype, chunks)
        return out

    return asyncio.run(go())


def make_exchanges(n: int) -> list[Exchange]:
    variants = _bodies()
    anon = hooks.anonymous()
    out = []
    for i in range(n):
        pii = i % 10 == 0
        stream = i % 2 == 1
        body, req_json, ctype, chunks = variants[(pii, stream)]
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


def run(n: int, batch_max: int, procs: int = 0) -> dict[str, Any]:
    exchanges = make_exchanges(n)
    with tempfile.TemporaryDirectory(prefix="vllm-audit-bench-writer-") as tmp:
        log_cfg = {"dir": tmp, "batch_max": batch_max, "queue_size": n + 10, "prepare_processes": procs}
        cfg = load_config(None, {"log": log_cfg, "ship": {"in_process": False}})
        w = AuditWriter(cfg)
        w.start()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for ex in exchanges:
            w.submit(ex)
        w.stop(timeout=600)
        t1 = time.perf_counter()
        c1 = time.process_time()
        lines = count_lines(tmp)
        m = w.metrics
        return {
            "n": n,
            "batch_max": batch_max,
            "prepare_processes": procs,
            "seconds": round(t1 - t0, 3),
            "records_per_s": round(n / (t1 - t0)),
            "cpu_us_per_record": round((c1 - c0) / n * 1e6, 1),
            "fsyncs": m.batches_total,
            "mean_batch": round(m.records_written_total / max(1, m.batches_total), 1),
            "lines_inference": lines["inference"],
            "lines_other": lines["other"],
            "failure": w.failure,
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
