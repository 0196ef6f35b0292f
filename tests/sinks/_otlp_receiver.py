"""A stdlib OTLP/HTTP logs receiver (``http.server`` + the ``opentelemetry-proto`` classes), run as a process.

    python tests/sinks/_otlp_receiver.py PORT OUT.jsonl [--max-body N] [--unavailable K] [--reject-every M]

It decodes ``POST /v1/logs`` (protobuf, gzip or not) with opentelemetry-proto and appends one JSON
line per request to OUT: ``{"t": arrival, "status": answer, "records": [{"body", "attrs",
"severity", "time", "event"}], "resource": {...}}``. It answers as the OTLP/HTTP specification
says, with behaviours the tests switch on:

- ``--max-body N``: a request holding a record whose body is longer than N bytes is refused whole
  with 400 and a ``google.rpc.Status`` message (what a backend's per-record limit looks like);
- ``--unavailable K``: the first K requests answer 503 with ``Retry-After: 1``;
- ``--reject-every M``: every M-th record (by ``vllm_audit.seq``) is dropped and reported in an
  ``ExportLogsServiceResponse.partial_success``.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import threading
import time
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--max-body", type=int, default=0)
    ap.add_argument("--unavailable", type=int, default=0)
    ap.add_argument("--reject-every", type=int, default=0)
    args = ap.parse_args()
    lock = threading.Lock()
    state = {"requests": 0}
    out = open(args.out, "a", encoding="utf-8")  # lives as long as the process

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/logs":
                self._answer(404, b"")
                return
            if self.headers.get("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            with lock:
                state["requests"] += 1
                n = state["requests"]
            if n <= args.unavailable:
                self._log({"t": time.time(), "status": 503, "records": []})
                self._answer(503, b"", {"Retry-After": "1"})
                return
            req = ExportLogsServiceRequest.FromString(data)
            records = []
            resource: dict[str, Any] = {}
            for rl in req.resource_logs:
                resource = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for lr in sl.log_records:
                        records.append(
                            {
                                "body": lr.body.string_value,
                                "attrs": {kv.key: _value(kv.value) for kv in lr.attributes},
                                "severity": [lr.severity_number, lr.severity_text],
                                "time": lr.time_unix_nano,
                                "event": lr.event_name,
                                "scope": [sl.scope.name, sl.scope.version],
                            }
                        )
            if args.max_body and any(len(r["body"].encode()) > args.max_body for r in records):
                self._log({"t": time.time(), "status": 400, "records": [], "size": len(records)})
                msg = f"log record body over {args.max_body} bytes"
                status = b"\x08\x03\x12" + bytes((len(msg),)) + msg.encode()  # google.rpc.Status{code, message}
                self._answer(400, status)
                return
            answer = ExportLogsServiceResponse()
            if args.reject_every:
                kept = [r for r in records if r["attrs"]["vllm_audit.seq"] % args.reject_every]
                if len(kept) < len(records):
                    answer.partial_success.CopyFrom(
                        ExportLogsPartialSuccess(
                            rejected_log_records=len(records) - len(kept), error_message="seq divisible, refused"
                        )
                    )
                records = kept
            self._log({"t": time.time(), "status": 200, "records": records, "resource": resource})
            self._answer(200, answer.SerializeToString())

        def _log(self, obj: dict[str, Any]) -> None:
            with lock:
                out.write(json.dumps(obj) + "\n")
                out.flush()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
