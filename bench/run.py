"""vllm-audit performance bench: one command, one table, ratios measured side by side.

    .venv/bin/python bench/run.py [--quick] [--seconds S] [--skip-http] [--json OUT]

1. HTTP (wrk, Lua POST bodies): the fake upstream alone ("bare", bench/_upstream.py: asyncio +
   uvloop replaying DemoEngine's bytes) vs nginx pass-through (JSON access log, proxy_buffering
   off) vs the audited gateway (``vllm-audit serve --upstream``, strict durability, default
   privacy + integrity) vs DemoEngine on uvicorn without middleware (the Python-server floor).
   Non-stream and stream (20 tokens), concurrency 1/16/64. Pinning as in PERFORMANCE.md: wrk +
   upstream on CPU 0, the system under test alone on CPU 1 (one worker).
2. Middleware mode (bench/_inproc.py): loop-thread CPU µs per request and per streamed chunk.
3. Writer (bench/_writer.py): records/s made durable with group commit.
4. Records written by the gateway vs requests completed, and a hash-chain check of the log.

Everything listens on 127.0.0.1, every run is bounded, every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BIN = Path(PY).parent
LOAD_CPU, PROXY_CPU = "0", "1"
CONCURRENCY = (1, 16, 64)

sys.path.insert(0, str(HERE))
import _upstream  # noqa: E402

_procs: list[subprocess.Popen[bytes]] = []


# -- process handling ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], cpu: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = open(log, "wb")
    p = subprocess.Popen(
        ["taskset", "-c", cpu, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(ROOT)
    )
    _procs.append(p)
    return p


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)  # the process group this bench created (nginx master + worker)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


@atexit.register
def _cleanup() -> None:
    for p in _procs:
        stop(p)


def wait_port(port: int, p: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"server exited early (rc {p.returncode}); log {log}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not come up; log {log}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+sys) of pid and its direct children (nginx workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        if int(d.name) == pid or ppid == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# -- wrk ----------------------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNIT[m.group(2)]


def lua_script(tmp: Path, stream: bool) -> Path:
    body = _upstream.chat_body(stream).decode()
    assert "'" not in body and "\\" not in body
    p = tmp / f"post_{'stream' if stream else 'json'}.lua"
    p.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "local bad = 0\n"
    )
    return p


def wrk(port: int, script: Path, conc: int, seconds: float) -> dict[str, Any]:
    cmd = [
        "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
        "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    res: dict[str, Any] = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    return res


# -- the systems under test ---------------------------------------------------------------------


def nginx_start(tmp: Path, port: int, up_port: int) -> subprocess.Popen[bytes]:
    d = tmp / "nginx"
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = (HERE / "nginx.conf.tmpl").read_text()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = conf.replace("{TMP}", str(d)).replace("{PORT}", str(port)).replace("{UPSTREAM_PORT}", str(up_port))
    conf = conf.replace("{USER}", user)
    (d / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = start([nginx, "-c", str(d / "nginx.conf"), "-p", str(d)], PROXY_CPU, d / "stdout.log")
    wait_port(port, p, d / "stdout.log")
    return p


def gateway_start(
    tmp: Path, port: int, up_port: int, extra_env: dict[str, str] | None = None, workers: int = 1, cpu: str = PROXY_CPU
) -> tuple[subprocess.Popen[bytes], Path]:
    d = tmp / "gateway"
    d.mkdir(parents=True, exist_ok=True)
    log_dir = d / "audit-log"
    env = dict(os.environ)
    env.pop("VLLM_AUDIT_CONFIG", None)
    env.pop("VLLM_AUDIT_OVERRIDES", None)
    env.update(extra_env or {})
    cmd = [str(BIN / "vllm-audit"), "serve", "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(port),
           "--log-dir", str(log_dir), "--workers", str(workers)]  # fmt: skip
    p = start(cmd, cpu, d / "gateway.log", env)
    wait_port(port, p, d / "gateway.log")
    return p, log_dir


def demo_start(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    d = tmp / "demo"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "uvicorn", "--app-dir", str(HERE), "_upstream:demo_app", "--port", str(port), "--loop", "uvloop",
           "--http", "httptools", "--no-access-log", "--log-level", "warning", "--lifespan", "off"]  # fmt: skip
    p = start(cmd, PROXY_CPU, d / "demo.log")
    wait_port(port, p, d / "demo.log")
    return p


# -- records ------------------------------------------------------------------------------------


def log_records(log_dir: Path) -> dict[str, Any]:
    """Count inference records by status and check the hash chain (seq, prev = leaf hash)."""
    counts: dict[str, int] = {}
    inference = other = 0
    chain_ok = True
    problems: list[str] = []
    for wdir in sorted(log_dir.glob("writers/*")):
        segs = sorted(wdir.glob("seg-*.jsonl"))
        prev = "0" * 64
        seq = None
        for seg in segs:
            with open(seg, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        problems.append(f"{seg.name}: torn last line")
                        chain_ok = False
                        break
                    line = line[:-1]
                    head = json.loads(line[: line.find(b',"writer_id"')] + b"}")
                    if seq is not None and head["seq"] != seq + 1:
                        chain_ok = False
                        problems.append(f"seq gap at {head['seq']}")
                    if head["prev"] != prev and not (seq is None and head["seq"] > 0):
                        chain_ok = False
                        problems.append(f"prev mismatch at seq {head['seq']}")
                    seq = head["seq"]
                    prev = hashlib.sha256(b"\x00" + line).hexdigest()
                    if b'"record_type":"inference"' in line[:300]:
                        inference += 1
                        m = re.search(rb'"status":"(\w+)"', line)
                        st = m.group(1).decode() if m else "?"
                        counts[st] = counts.get(st, 0) + 1
                    else:
                        other += 1
    return {"inference": inference, "by_status": counts, "other": other, "chain_ok": chain_ok, "problems": problems[:5]}


# -- the runs -----------------------------------------------------------------------------------


def http_bench(tmp: Path, seconds: float, with_demo: bool) -> dict[str, Any]:
    scripts = {False: lua_script(tmp, False), True: lua_script(tmp, True)}
    up_port = free_port()
    up_log = tmp / "upstream.log"
    up = start([PY, str(HERE / "_upstream.py"), str(up_port)], LOAD_CPU, up_log)
    wait_port(up_port, up, up_log)
    results: dict[str, Any] = {"rows": {}, "records": {}}

    def run_system(name: str, port: int, pid: int | None, log_dir: Path | None) -> None:
        wrk(port, scripts[True], 16, min(1.0, seconds))  # warm-up (connections, JIT-free caches)
        wrk(port, scripts[False], 16, min(1.0, seconds))
        time.sleep(0.3)
        for stream in (False, True):
            for c in CONCURRENCY:
                before = log_records(log_dir) if log_dir else None
                cpu0 = proc_cpu(pid) if pid else 0.0
                r = wrk(port, scripts[stream], c, seconds)
                cpu1 = proc_cpu(pid) if pid else 0.0
                r["cpu_ms_per_req"] = (cpu1 - cpu0) * 1000 / r["requests"] if pid and r["requests"] else None
                key = f"{'stream' if stream else 'json'}_c{c}"
                if log_dir is not None and before is not None:
                    time.sleep(0.5)  # cancelled exchanges are submitted without waiting
                    after = log_records(log_dir)
                    ok = after["by_status"].get("ok", 0) - before["by_status"].get("ok", 0)
                    results["records"][key] = {
                        "completed": r["requests"],
                        "records": after["inference"] - before["inference"],
                        "ok_records": ok,
                        "lost": max(0, r["requests"] - r["non2xx"] - ok),
                    }
                results["rows"].setdefault(name, {})[key] = {k: v for k, v in r.items() if k != "raw"}
                line = f"  {name:8s} {key:10s} {r['rps']:9.0f} req/s  p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f} ms"
                if r["non2xx"] or r["socket_errors"]:
                    line += f"  non2xx={r['non2xx']} errors=[{r['socket_errors']}]"
                print(line, flush=True)

    try:
        print("HTTP: bare upstream (wrk -> fake upstream, both on CPU 0)", flush=True)
        run_system("bare", up_port, None, None)
        results["ttft"] = {"bare": ttft(up_port)}

        port = free_port()
        ng = nginx_start(tmp, port, up_port)
        print("HTTP: nginx pass-through on CPU 1", flush=True)
        try:
            run_system("nginx", port, ng.pid, None)
        finally:
            stop(ng, signal.SIGQUIT)
        access = tmp / "nginx" / "access.jsonl"
        results["nginx_log_lines"] = sum(1 for _ in open(access, "rb")) if access.exists() else 0

        port = free_port()
        gw, log_dir = gateway_start(tmp, port, up_port)
        print("HTTP: audited gateway on CPU 1", flush=True)
        try:
            run_system("gateway", port, gw.pid, log_dir)
            results["ttft"]["gateway"] = ttft(port)
        finally:
            stop(gw)  # SIGTERM: uvicorn shuts down, the writer drains and closes the chain
        results["final_log"] = log_records(log_dir)
        results["gateway_log"] = str(log_dir)

        # Two workers on both CPUs (wrk and the upstream share CPU 0 with one of them: on a
        # 2-core machine the load generator cannot have a core of its own here).
        port = free_port()
        gw2, _ = gateway_start(tmp / "w2", port, up_port, workers=2, cpu="0,1")
        print("HTTP: audited gateway, 2 workers on CPUs 0-1", flush=True)
        try:
            wrk(port, scripts[False], 64, min(1.0, seconds))
            results["workers2"] = {}
            for stream in (False, True):
                r = wrk(port, scripts[stream], 64, seconds)
                results["workers2"]["stream" if stream else "json"] = r["rps"]
                print(f"  gateway×2 {'stream' if stream else 'json'}_c64 {r['rps']:9.0f} req/s", flush=True)
        finally:
            stop(gw2)

        if with_demo:
            port = free_port()
            dm = demo_start(tmp, port)
            print("HTTP: DemoEngine on uvicorn (no middleware) on CPU 1", flush=True)
            try:
                run_system("uvicorn", port, dm.pid, None)
            finally:
                stop(dm)
    finally:
        stop(up)
    return results


def ttft(port: int, n: int = 300) -> dict[str, float]:
    """Time to first token at c=1: from sending a streamed chat request to the first SSE event
    carrying content (raw socket, keep-alive, the same client for every system)."""
    body = _upstream.chat_body(True)
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[float] = []
    try:
        for i in range(n + 20):
            t0 = time.perf_counter()
            sock.sendall(req)
            buf = b""
            first = None
            while True:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed")
                buf += data
                if first is None and b'"content":"' in buf and b'"content":""' not in buf.split(b'"content":"', 1)[0][-5:]:
                    if buf.count(b"data: {") >= 2:  # the role chunk, then the first content chunk
                        first = time.perf_counter() - t0
                if buf.endswith(b"0\r\n\r\n") or b"data: [DONE]" in buf and buf.endswith(b"\r\n\r\n"):
                    break
            if i >= 20 and first is not None:  # after a warm-up
                times.append(first * 1000)
    finally:
        sock.close()
    times.sort()
    return {"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99) - 1], "n": len(times)}


def fsync_probe(tmp: Path, n: int = 300) -> dict[str, float]:
    """Latency of one 4 KiB append + fdatasync in the bench's temp dir (what strict mode waits for)."""
    path = tmp / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = b"x" * 4095 + b"\n"
    lat = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    lat.sort()
    return {"p50": lat[len(lat) // 2], "p90": lat[int(len(lat) * 0.9)], "p99": lat[int(len(lat) * 0.99)]}


def run_helper(args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        ["taskset", "-c", PROXY_CPU, PY, *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{args[0]} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- report -------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or v != v else format(v, spec)


def report(
    http: dict[str, Any] | None, mw: dict[str, Any], wr: list[dict[str, Any]], seconds: float, fs: dict[str, float]
) -> str:
    out: list[str] = [
        f"Disk: 4 KiB append + fdatasync p50 {fs['p50']:.2f} ms, p90 {fs['p90']:.2f} ms, p99 {fs['p99']:.2f} ms "
        "(strict durability waits for one of these per batch).",
        "",
    ]
    if http:
        rows = http["rows"]
        out.append(f"### HTTP ({seconds:g} s per cell; wrk -t1; wrk + upstream on CPU {LOAD_CPU}, system under test on CPU {PROXY_CPU})")
        out.append("")
        out.append("| system | mode | c | req/s | p50 ms | p99 ms | CPU ms/req (CPU 1) |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for name, label in (("bare", "bare upstream (fake, CPU 0)"), ("nginx", "nginx 1.22 + JSON log"),
                            ("gateway", "**vllm-audit gateway** (strict)"), ("uvicorn", "DemoEngine on uvicorn, no audit")):  # fmt: skip
            if name not in rows:
                continue
            for key, r in rows[name].items():
                mode, c = key.split("_c")
                out.append(
                    f"| {label} | {mode} | {c} | {r['rps']:,.0f} | {_fmt(r['p50'], '.3f')} | {_fmt(r['p99'], '.3f')} | "
                    f"{_fmt(r['cpu_ms_per_req'], '.3f')} |"
                )
        out.append("")
    out.append("### Middleware mode (in-process, no sockets; loop-thread CPU via time.thread_time())")
    out.append("")
    raw = mw["raw"]
    out.append("| case | bare app µs/req | audited µs/req | added µs |")
    out.append("|---|---:|---:|---:|")
    for label, b, a in (
        ("non-stream, sequential, durability=async", "bare_ns", "audit_ns"),
        (f"stream 20 tokens ({mw['events_20']} body messages), async", "bare_s20", "audit_s20"),
        (f"stream 200 tokens ({mw['events_200']} body messages), async", "bare_s200", "audit_s200"),
        ("non-stream, c=64, durability=strict", "bare_ns_c64", "strict_ns_c64"),
        ("stream 20 tokens, c=64, durability=strict", "bare_s20_c64", "strict_s20_c64"),
    ):
        out.append(f"| {label} | {raw[b]['cpu_us']:.1f} | {raw[a]['cpu_us']:.1f} | {raw[a]['cpu_us'] - raw[b]['cpu_us']:.1f} |")
    out.append("")
    out.append(f"Per streamed chunk (slope 20 -> 200 tokens): **{mw['added_us_per_chunk']:.2f} µs**; fixed part of a "
               f"stream: {mw['added_us_per_request_stream_fixed']:.1f} µs.")  # fmt: skip
    out.append("")
    out.append("### Writer (AuditWriter thread: finalize + redact + hash chain + group commit)")
    out.append("")
    out.append("| records | batch_max | seconds | records/s | CPU µs/record | fdatasyncs | mean batch | lines on disk |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in wr:
        out.append(
            f"| {w['n']:,} | {w['batch_max']} | {w['seconds']:.2f} | **{w['records_per_s']:,}** | {w['cpu_us_per_record']:.1f} | "
            f"{w['fsyncs']} | {w['mean_batch']:.0f} | {w['lines_inference']:,} |"
        )
    out.append("")

    # ratios vs targets
    out.append("### Ratios vs targets")
    out.append("")
    out.append("| metric | measured | target | |")
    out.append("|---|---:|---:|---|")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    if http:
        rows = http["rows"]
        for mode in ("json", "stream"):
            g, n = rows["gateway"][f"{mode}_c64"]["rps"], rows["nginx"][f"{mode}_c64"]["rps"]
            ratio = g / n if n else 0.0
            out.append(f"| gateway / nginx req/s, {mode}, c=64 | {ratio:.1%} ({g:,.0f} / {n:,.0f}) | ≥ 10 % | {verdict(ratio >= 0.10)} |")
        for mode in ("json", "stream"):
            add = rows["gateway"][f"{mode}_c1"]["p50"] - rows["bare"][f"{mode}_c1"]["p50"]
            out.append(f"| gateway p50 − bare p50, {mode}, c=1 | {add:.3f} ms | ≤ 1 ms | {verdict(add <= 1.0)} |")
    a = mw["added_us_per_request_nonstream"]
    out.append(f"| middleware CPU per request (non-stream, async) | {a:.1f} µs | ≤ 50 µs | {verdict(a <= 50)} |")
    a = mw["added_us_strict_c64_nonstream"]
    out.append(f"| middleware CPU per request (non-stream, strict, c=64) | {a:.1f} µs | ≤ 50 µs | {verdict(a <= 50)} |")
    a = mw["added_us_per_chunk"]
    out.append(f"| middleware CPU per streamed chunk | {a:.2f} µs | ≤ 2 µs | {verdict(a <= 2.0)} |")
    w = wr[0]
    out.append(f"| writer records/s durable ({w['n']:,} records) | {w['records_per_s']:,} | ≥ 50,000 | {verdict(w['records_per_s'] >= 50000)} |")
    out.append("")

    if http:
        out.append("### Records written by the gateway during the HTTP run")
        out.append("")
        out.append("| cell | responses completed (wrk) | inference records | status ok | completed without an ok record |")
        out.append("|---|---:|---:|---:|---:|")
        tc = tr = tl = 0
        for key, r in http["records"].items():
            out.append(f"| {key} | {r['completed']:,} | {r['records']:,} | {r['ok_records']:,} | {r['lost']} |")
            tc += r["completed"]
            tr += r["records"]
            tl += r["lost"]
        fl = http["final_log"]
        out.append("")
        out.append(
            f"Total: {tc:,} responses completed in the measured cells, {tr:,} records; {tl} completed responses without "
            f"a record. Whole log after shutdown (incl. warm-up): {fl['inference']:,} inference records "
            f"{fl['by_status']}, {fl['other']} event entries; hash chain (seq + prev) "
            f"{'OK' if fl['chain_ok'] else 'BROKEN: ' + '; '.join(fl['problems'])}. "
            f"nginx access log: {http.get('nginx_log_lines', 0):,} lines."
        )
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s per HTTP cell, smaller in-process runs")
    ap.add_argument("--seconds", type=int, help="seconds per HTTP cell (default 5, --quick 2)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--no-uvicorn-row", action="store_true", help="skip the DemoEngine-on-uvicorn reference row")
    ap.add_argument("--writer-records", type=int, help="records for the writer bench (default 50000, --quick 20000)")
    ap.add_argument("--json", help="also write all raw results to this file")
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install -y wrk nginx util-linux")
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; pinning is meaningless", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="vllm-audit-bench-"))
    t0 = time.time()
    try:
        fs = fsync_probe(tmp)
        print(f"fdatasync probe: p50 {fs['p50']:.2f} ms p99 {fs['p99']:.2f} ms", flush=True)
        http = None if args.skip_http else http_bench(tmp, seconds, not args.no_uvicorn_row)
        print("middleware mode (in-process) ...", flush=True)
        mw = run_helper([str(HERE / "_inproc.py"), str(5000 if args.quick else 20000)], 600)
        n = args.writer_records or (20000 if args.quick else 50000)
        print(f"writer ({n:,} records) ...", flush=True)
        wr = [run_helper([str(HERE / "_writer.py"), str(n)], 900)]
        wr.append(run_helper([str(HERE / "_writer.py"), str(max(2000, n // 10)), "64"], 900))
        text = report(http, mw, wr, seconds, fs)
        print()
        print(text)
        if http and "ttft" in http:
            b, g = http["ttft"]["bare"], http["ttft"].get("gateway")
            print("\n### Time to first token (c=1, streamed chat, raw-socket client)\n")
            print("| system | TTFT p50 ms | TTFT p99 ms |\n|---|---:|---:|")
            print(f"| bare upstream | {b['p50']:.3f} | {b['p99']:.3f} |")
            if g:
                print(f"| gateway | {g['p50']:.3f} | {g['p99']:.3f} |")
                added = g["p50"] - b["p50"]
                print(f"\nTTFT added by the gateway (p50): **{added:.3f} ms** (target ≤ 1 ms: {'met' if added <= 1 else 'missed'})")
        if http and "workers2" in http:
            one = {k: http["rows"]["gateway"][f"{k}_c64"]["rps"] for k in ("json", "stream")}
            print("\n### Two workers (CPUs 0-1, sharing CPU 0 with wrk and the upstream)\n")
            print("| mode | 1 worker req/s | 2 workers req/s | ratio (target ≥ 1.8×) |\n|---|---:|---:|---:|")
            for k in ("json", "stream"):
                two = http["workers2"][k]
                print(f"| {k} c=64 | {one[k]:,.0f} | {two:,.0f} | {two / one[k]:.2f}× |")
        print(f"(total bench time {time.time() - t0:.0f} s; python {sys.version.split()[0]}; "
              f"{os.cpu_count()} CPUs; load avg at end {os.getloadavg()[0]:.2f})")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"http": http, "middleware": mw, "writer": wr, "fsync": fs}, indent=1, default=str))
        lost = sum(r["lost"] for r in http["records"].values()) if http else 0
        return 1 if lost or (http and not http["final_log"]["chain_ok"]) else 0
    finally:
        _cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
