"""Process-local counters, rendered in the Prometheus text exposition format."""

from __future__ import annotations

import threading
from collections.abc import Callable

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))


class Histogram:
    """A cumulative histogram updated from one thread (the writer)."""

    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        for i, b in enumerate(_BUCKETS):
            if seconds <= b:
                self.counts[i] += 1
                break
        self.total += seconds
        self.n += 1

    def render(self, name: str, labels: str) -> list[str]:
        out = []
        acc = 0
        for b, c in zip(_BUCKETS, self.counts, strict=True):
            acc += c
            le = "+Inf" if b == float("inf") else repr(b)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


class Metrics:
    """Counters of one process. Each counter is written by one thread only (no lost updates)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # written by the event loop
        self.requests_total: dict[tuple[str, str], int] = {}
        self.rejected_total: dict[str, int] = {}
        self.upstream_errors_total = 0
        self.submitted_total = 0
        self.edge_dropped_total = 0  # fail_open: not even handed to the writer
        # written by the writer thread
        self.records_written_total = 0
        self.batches_total = 0
        self.write_errors_total = 0
        self.dropped_total = 0
        self.write_seconds = Histogram()
        self.batch_size_last = 0
        self.heavy_records_total = 0
        self.prepared_in_processes_total = 0
        #: More Prometheus lines (the projection runner registers its per-sink figures here).
        self.extra: list[Callable[[], list[str]]] = []
        # filled in by the writer
        self.writer_id = ""
        self.queue_depth: Callable[[], int] = lambda: 0
        self.log_ok: Callable[[], bool] = lambda: True

    def count_request(self, route: str, status: str) -> None:
        key = (route, status)
        self.requests_total[key] = self.requests_total.get(key, 0) + 1

    def count_rejected(self, reason: str) -> None:
        self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1

    def render(self) -> bytes:
        w = f'writer_id="{self.writer_id}"'
        lines = [
            "# HELP vllm_audit_records_written_total Records made durable in the local log.",
            "# TYPE vllm_audit_records_written_total counter",
            f"vllm_audit_records_written_total{{{w}}} {self.records_written_total}",
            "# HELP vllm_audit_records_submitted_total Records handed to the writer by the request path.",
            "# TYPE vllm_audit_records_submitted_total counter",
            f"vllm_audit_records_submitted_total{{{w}}} {self.submitted_total}",
            "# HELP vllm_audit_records_dropped_total Records that could not be written (fail_open or disk error).",
            "# TYPE vllm_audit_records_dropped_total counter",
            f"vllm_audit_records_dropped_total{{{w}}} {self.dropped_total + self.edge_dropped_total}",
            "# HELP vllm_audit_write_errors_total Failed batch writes or fsyncs.",
            "# TYPE vllm_audit_write_errors_total counter",
            f"vllm_audit_write_errors_total{{{w}}} {self.write_errors_total}",
            "# HELP vllm_audit_batches_total Group commits (one fsync each).",
            "# TYPE vllm_audit_batches_total counter",
            f"vllm_audit_batches_total{{{w}}} {self.batches_total}",
            "# HELP vllm_audit_queue_depth Records waiting for the writer.",
            "# TYPE vllm_audit_queue_depth gauge",
            f"vllm_audit_queue_depth{{{w}}} {self.queue_depth()}",
            "# HELP vllm_audit_log_writable 1 while records can be written, else 0.",
            "# TYPE vllm_audit_log_writable gauge",
            f"vllm_audit_log_writable{{{w}}} {int(self.log_ok())}",
            "# HELP vllm_audit_upstream_errors_total Upstream failures (refused, timeout, 5xx).",
            "# TYPE vllm_audit_upstream_errors_total counter",
            f"vllm_audit_upstream_errors_total{{{w}}} {self.upstream_errors_total}",
            "# HELP vllm_audit_write_seconds Time to write and fsync one batch.",
            "# TYPE vllm_audit_write_seconds histogram",
        ]
        lines += self.write_seconds.render("vllm_audit_write_seconds", w)
        lines += [
            "# HELP vllm_audit_requests_total Audited requests by route and outcome.",
            "# TYPE vllm_audit_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests_total.items()):
            lines.append(f'vllm_audit_requests_total{{{w},route="{_esc(route)}",status="{status}"}} {n}')
        lines += [
            "# HELP vllm_audit_rejected_total Requests refused by the audited edge, by reason.",
            "# TYPE vllm_audit_rejected_total counter",
        ]
        for reason, n in sorted(self.rejected_total.items()):
            lines.append(f'vllm_audit_rejected_total{{{w},reason="{reason}"}} {n}')
        lines += [
            "# HELP vllm_audit_heavy_records_total Records finalized and redacted in the heavy-record process.",
            "# TYPE vllm_audit_heavy_records_total counter",
            f"vllm_audit_heavy_records_total{{{w}}} {self.heavy_records_total}",
            "# HELP vllm_audit_prepared_in_processes_total Records finalized and redacted in prepare processes.",
            "# TYPE vllm_audit_prepared_in_processes_total counter",
            f"vllm_audit_prepared_in_processes_total{{{w}}} {self.prepared_in_processes_total}",
        ]
        for extra in self.extra:
            try:
                lines += extra()
            except Exception:  # pragma: no cover - a metrics source must never break /metrics
                continue
        return ("\n".join(lines) + "\n").encode()


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")[:200]
