"""vllm-audit performance bench: one command, one table, ratios measured side by side.

    .venv/bin/python bench/run.py [--quick] [--seconds S] [--skip-http] [--skip-others]
                                  [--redaction-python PY] [--native auto|off] [--json OUT]

0. What a regular install runs: the record path's hot modules compiled by mypyc
   (``vllm_audit.native.MODULES``, ``hatch_build.py``), built once into a copy of ``src/`` that
   every process of the run gets on ``PYTHONPATH`` (``--native off``, or a failed build: the
   sources). The writer and redaction benches also run on the sources, side by side.

1. HTTP (wrk, Lua POST bodies): the fake upstream alone ("bare", bench/_upstream.py: asyncio +
   uvloop replaying DemoEngine's bytes) vs nginx pass-through (JSON access log, proxy_buffering
   off) vs the audited gateway (``vllm-audit serve --upstream``, strict durability, default
   privacy + integrity, sinks off) with one worker, the same with the record work in other
   processes (``[log] prepare_processes = 1``, ``[ship] isolation = "process"``, all on the same
   CPU), and with two workers on both CPUs, vs DemoEngine on uvicorn without middleware (the
   Python-server floor). Non-stream and stream (20 tokens), concurrency 1/16/64 (16/64 for the
   variants). Pinning as in PERFORMANCE.md: wrk + upstream on CPU 0, the system under test alone
   on CPU 1. CPU ms per request of the server's own process and of all its processes (from
   /proc), and time to first token at c=1 for every system.
2. Middleware mode (bench/_inproc.py): loop-thread CPU µs per request and per streamed chunk.
3. Writer (bench/_writer.py): records/s made durable with group commit, in the writer thread (one
   CPU) and with 2 prepare processes on both CPUs (the target's setting).
4. The other areas' benches beside their baselines: verifier (bench/verify/run.py), inclusion
   proofs verified per second per core (bench/_proofs.py), redaction vs Presidio
   (bench/redaction/run.py, with ``--redaction-python`` an interpreter that has presidio-analyzer).
5. Records written by each gateway vs requests completed, and every writer's hash chain checked
   through the package's ``LogReader``.

Everything listens on 127.0.0.1, every run is bounded, every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import resource
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


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (each wrk run, once waited for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user+sys) of pid alone, and of pid with all its descendants (nginx workers,
    gateway workers, prepare processes, the projections' child), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, float] = {}
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
        children.setdefault(int(fields[1]), []).append(int(d.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return cpu.get(pid, 0.0), total


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
        f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\nlocal bad = 0\n'
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
    tmp: Path,
    port: int,
    up_port: int,
    extra_env: dict[str, str] | None = None,
    workers: int = 1,
    cpu: str = PROXY_CPU,
    config: str = "",
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``vllm-audit serve --upstream`` (``config``: extra TOML, e.g. ``[log] prepare_processes``)."""
    d = tmp / "gateway"
    d.mkdir(parents=True, exist_ok=True)
    log_dir = d / "audit-log"
    env = dict(os.environ)
    env.pop("VLLM_AUDIT_CONFIG", None)
    env.pop("VLLM_AUDIT_OVERRIDES", None)
    env.update(extra_env or {})
    cmd = [str(BIN / "vllm-audit"), "serve", "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(port),
           "--log-dir", str(log_dir), "--workers", str(workers)]  # fmt: skip
    if config:
        (d / "gateway.toml").write_text(config)
        cmd += ["--config", str(d / "gateway.toml")]
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
    """Count inference records by status and check every writer's hash chain, through the
    package's own reader (``LogReader``: it link-checks seq and prev for each entry it returns)."""
    from vllm_audit.integrity.reader import ChainBreak, LogReader

    counts: dict[str, int] = {}
    inference = other = 0
    chain_ok = True
    problems: list[str] = []
    if not (log_dir / "writers").is_dir():
        return {"inference": 0, "by_status": counts, "other": 0, "chain_ok": True, "problems": []}
    reader = LogReader(log_dir, limit="all")
    for wid in reader.writer_ids():
        try:
            for entry in reader.entries_all(wid):
                if entry.record_type != "inference":
                    other += 1
                    continue
                inference += 1
                st = str(entry.record().get("status", "?"))  # the outcome: ok, cancelled, ...
                counts[st] = counts.get(st, 0) + 1
        except ChainBreak as exc:
            chain_ok = False
            problems.append(str(exc))
    return {"inference": inference, "by_status": counts, "other": other, "chain_ok": chain_ok, "problems": problems[:5]}


# -- the runs -----------------------------------------------------------------------------------


#: The extra configuration of the gateway variant that moves the record work out of its process.
OFFLOAD_TOML = '[log]\nprepare_processes = 1\n\n[ship]\nisolation = "process"\n'
ALL_CELLS = [(stream, c) for stream in (False, True) for c in CONCURRENCY]


def http_bench(tmp: Path, seconds: float, with_demo: bool, variants: bool) -> dict[str, Any]:
    scripts = {False: lua_script(tmp, False), True: lua_script(tmp, True)}
    up_port = free_port()
    up_log = tmp / "upstream.log"
    up = start([PY, str(HERE / "_upstream.py"), str(up_port)], LOAD_CPU, up_log)
    wait_port(up_port, up, up_log)
    results: dict[str, Any] = {"rows": {}, "records": {}, "ttft": {}}

    def run_system(
        name: str,
        port: int,
        pid: int | None,
        log_dir: Path | None,
        cells: list[tuple[bool, int]] = ALL_CELLS,
        one_process: bool = True,
    ) -> None:
        """``one_process``: the server's own process does the work (else only "all" is shown:
        nginx's master and uvicorn's supervisor only watch their workers)."""
        wrk(port, scripts[True], 16, min(1.0, seconds))  # warm-up (connections, JIT-free caches)
        wrk(port, scripts[False], 16, min(1.0, seconds))
        time.sleep(0.3)
        for stream, c in cells:
            before = log_records(log_dir) if log_dir else None
            own0, all0 = proc_cpu(pid) if pid else (0.0, 0.0)
            load0 = proc_cpu(up.pid)[1] + _children_cpu()
            t0 = time.monotonic()
            r = wrk(port, scripts[stream], c, seconds)
            own1, all1 = proc_cpu(pid) if pid else (0.0, 0.0)
            n = r["requests"]
            r["cpu_ms_per_req"] = (own1 - own0) * 1000 / n if pid and n and one_process else None
            r["cpu_all_ms_per_req"] = (all1 - all0) * 1000 / n if pid and n else None
            # CPUs used by the load side (wrk and the fake upstream) while the cell ran
            r["load_cpus"] = (proc_cpu(up.pid)[1] + _children_cpu() - load0) / max(time.monotonic() - t0, 1e-9)
            key = f"{'stream' if stream else 'json'}_c{c}"
            if log_dir is not None and before is not None:
                time.sleep(0.5)  # cancelled exchanges are submitted without waiting
                after = log_records(log_dir)
                ok = after["by_status"].get("ok", 0) - before["by_status"].get("ok", 0)
                results["records"][f"{name} {key}"] = {
                    "completed": n,
                    "records": after["inference"] - before["inference"],
                    "ok_records": ok,
                    "lost": max(0, n - r["non2xx"] - ok),
                }
            results["rows"].setdefault(name, {})[key] = {k: v for k, v in r.items() if k != "raw"}
            line = f"  {name:10s} {key:10s} {r['rps']:9.0f} req/s  p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f} ms"
            if r["cpu_all_ms_per_req"] is not None:
                line += f"  CPU ms/req: {_fmt(r['cpu_ms_per_req'], '.3f')} own, {r['cpu_all_ms_per_req']:.3f} all processes"
            if r["non2xx"] or r["socket_errors"]:
                line += f"  non2xx={r['non2xx']} errors=[{r['socket_errors']}]"
            print(line, flush=True)

    def gateway(
        name: str, sub: str, label: str, workers: int, cpu: str, config: str, cells: list[tuple[bool, int]]
    ) -> None:
        port = free_port()
        gw, log_dir = gateway_start(tmp / sub, port, up_port, workers=workers, cpu=cpu, config=config)
        print(f"HTTP: {label}", flush=True)
        try:
            run_system(name, port, gw.pid, log_dir, cells, one_process=workers == 1)
            results["ttft"][name] = ttft(port)
        finally:
            stop(gw)  # SIGTERM: uvicorn shuts down, the writers drain and close their chains
        results.setdefault("final_log", {})[name] = log_records(log_dir)

    try:
        print("HTTP: bare upstream (wrk -> fake upstream, both on CPU 0)", flush=True)
        run_system("bare", up_port, None, None)
        results["ttft"]["bare"] = ttft(up_port)

        port = free_port()
        ng = nginx_start(tmp, port, up_port)
        print("HTTP: nginx pass-through on CPU 1", flush=True)
        try:
            run_system("nginx", port, ng.pid, None, one_process=False)
            results["ttft"]["nginx"] = ttft(port)
        finally:
            stop(ng, signal.SIGQUIT)
        access = tmp / "nginx" / "access.jsonl"
        results["nginx_log_lines"] = sum(1 for _ in open(access, "rb")) if access.exists() else 0

        gateway("gateway", "w1", "audited gateway, 1 worker on CPU 1", 1, PROXY_CPU, "", ALL_CELLS)
        if variants:
            # The same gateway with finalize + redaction in a prepare process and the projections
            # (query store) in their child: its own process does less, its processes in all do not.
            cells = [(s, c) for s in (False, True) for c in (16, 64)]
            gateway("offload", "off", "audited gateway, record work in other processes (all on CPU 1)", 1, PROXY_CPU,
                    OFFLOAD_TOML, cells)  # fmt: skip
        # Two workers on both CPUs (wrk and the upstream share CPU 0 with one of them: on a
        # 2-core machine the load generator cannot have a core of its own here).
        cells = [(s, c) for s in (False, True) for c in (16, 64)]
        gateway("gateway2", "w2", "audited gateway, 2 workers on CPUs 0-1", 2, "0,1", "", cells)

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
                if (
                    first is None
                    and b'"content":"' in buf
                    and b'"content":""' not in buf.split(b'"content":"', 1)[0][-5:]
                ):
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


def run_helper(
    args: list[str], timeout: float, cpu: str | None = PROXY_CPU, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a bench script (pinned to ``cpu`` unless None); its result is the JSON object it prints last."""
    cmd = ["taskset", "-c", cpu, PY, *args] if cpu else [PY, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    text = out.stdout
    start_at = text.rfind("\n{") + 1 if not text.startswith("{") or "\n{" in text else 0
    try:
        result: dict[str, Any] = json.loads(text[start_at:])
    except ValueError:
        raise SystemExit(f"{args[0]} failed (rc {out.returncode}):\n{out.stderr[-3000:]}{text[-1000:]}") from None
    return result


def native_tree(tmp: Path) -> Path | None:
    """Build the compiled hot modules into a copy of src/ (``hatch_build.native_tree``); None when it fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_audit_hatch_build", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    hb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hb)
    try:
        hb.native_tree(ROOT / "src", tmp / "native")
    except Exception as exc:
        print(f"warning: compiling the hot modules failed, benchmarking the sources: {exc}", file=sys.stderr)
        return None
    return tmp / "native"


def redaction_bench(python: str, src: Path, timeout: float = 900) -> dict[str, Any]:
    """bench/redaction/run.py (owned by the privacy area), its figures taken from what it prints.

    ``python``: an interpreter with presidio-analyzer (bench-only) for the comparison; the package
    itself comes from ``src`` (this checkout's src/, or the compiled tree). Its exit code says
    whether its own targets were met.
    """
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        [python, str(HERE / "redaction" / "run.py")],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=env,
    )
    text = out.stdout
    res: dict[str, Any] = {"presidio": "not installed" not in text, "targets_met": out.returncode == 0}
    m = re.search(r"^ratio \(i\) 15 types / Presidio\s+([\d.]+)x\s+([\d.]+)x\s+([\d.]+)x", text, re.M)
    if m:
        res["x_presidio_one"], res["x_presidio_fifty"], res["x_presidio_prose"] = map(float, m.groups())
    m = re.search(r"^vllm-audit, 15 types\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if m:
        res["mb_s_one"], res["mb_s_fifty"], res["mb_s_prose"] = map(float, m.groups())
    m = re.search(r"^Presidio, 5 types\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if m:
        res["presidio_mb_s_one"], res["presidio_mb_s_fifty"], res["presidio_mb_s_prose"] = map(float, m.groups())
    m = re.search(r"([\d,]+) records/s\s+without PII", text)
    if m:
        res["records_per_s_clean"] = int(m.group(1).replace(",", ""))
    m = re.search(r"clean ~2 KB record: ([\d.]+) us", text)
    if m:
        res["us_clean_2kb"] = float(m.group(1))
    if len(res) <= 2:
        res["error"] = (out.stderr or text)[-1500:]
    return res


# -- report -------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or v != v else format(v, spec)


#: (row name, label) in the order of the HTTP table.
SYSTEMS = (
    ("bare", "bare upstream (fake, CPU 0)"),
    ("nginx", "nginx 1.22 + JSON log"),
    ("gateway", "**vllm-audit gateway**, 1 worker (strict)"),
    ("offload", "gateway, 1 worker, prepare_processes=1 + projections' child"),
    ("gateway2", "**vllm-audit gateway**, 2 workers (CPUs 0-1)"),
    ("uvicorn", "DemoEngine on uvicorn, no audit"),
)


def report(
    http: dict[str, Any] | None,
    mw: dict[str, Any],
    wr: list[dict[str, Any]],
    seconds: float,
    fs: dict[str, float],
    others: dict[str, Any],
) -> str:
    out: list[str] = [
        f"Disk: 4 KiB append + fdatasync p50 {fs['p50']:.2f} ms, p90 {fs['p90']:.2f} ms, p99 {fs['p99']:.2f} ms "
        "(strict durability waits for one of these per batch).",
        "",
    ]
    if http:
        rows = http["rows"]
        out.append(
            f"### HTTP ({seconds:g} s per cell; wrk -t1; wrk + upstream on CPU {LOAD_CPU}, system under test on CPU {PROXY_CPU})"
        )
        out.append("")
        out.append(
            "CPU ms/req: the server's main process; \"all\": with every process it started (nginx's worker, gateway"
        )
        out.append("workers, prepare processes, the projections' child) — the figure to compare.")
        out.append("")
        out.append("| system | mode | c | req/s | p50 ms | p99 ms | CPU ms/req | CPU ms/req, all |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, label in SYSTEMS:
            for key, r in rows.get(name, {}).items():
                mode, c = key.split("_c")
                out.append(
                    f"| {label} | {mode} | {c} | {r['rps']:,.0f} | {_fmt(r['p50'], '.3f')} | {_fmt(r['p99'], '.3f')} | "
                    f"{_fmt(r['cpu_ms_per_req'], '.3f')} | {_fmt(r['cpu_all_ms_per_req'], '.3f')} |"
                )
        out.append("")
        out.append("### Time to first token (c=1, streamed chat, raw-socket client, keep-alive)")
        out.append("")
        out.append("| system | TTFT p50 ms | TTFT p99 ms | added p50 vs bare |")
        out.append("|---|---:|---:|---:|")
        bare = http["ttft"]["bare"]
        for name, label in SYSTEMS:
            t = http["ttft"].get(name)
            if t:
                out.append(f"| {label} | {t['p50']:.3f} | {t['p99']:.3f} | {t['p50'] - bare['p50']:+.3f} |")
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
        out.append(
            f"| {label} | {raw[b]['cpu_us']:.1f} | {raw[a]['cpu_us']:.1f} | {raw[a]['cpu_us'] - raw[b]['cpu_us']:.1f} |"
        )
    out.append("")
    out.append(f"Per streamed chunk (slope 20 -> 200 tokens): **{mw['added_us_per_chunk']:.2f} µs**; fixed part of a "
               f"stream: {mw['added_us_per_request_stream_fixed']:.1f} µs.")  # fmt: skip
    out.append("")
    out.append("### Writer (AuditWriter thread: finalize + redact + hash chain + group commit)")
    out.append("")
    out.append(
        "| records | batch_max | prepare processes | seconds | records/s | CPU µs/record (writer + prepare) "
        "| fdatasyncs | mean batch | lines on disk |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in wr:
        procs = w.get("prepare_processes", 0)
        cpu = f"{w['cpu_us_per_record']:.1f}"
        if procs:
            cpu += f" + {w.get('prepare_cpu_us_per_record', 0.0):.1f}"
        out.append(
            f"| {w['n']:,} | {w['batch_max']} | {procs or '— (in-thread, 1 CPU)'} | {w['seconds']:.2f} | "
            f"**{w['records_per_s']:,}** | {cpu} | {w['fsyncs']} | {w['mean_batch']:.0f} | {w['lines_inference']:,} |"
        )
    out.append("")
    out.extend(_others_table(wr, others))

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
            out.append(
                f"| gateway / nginx req/s, {mode}, c=64 | {ratio:.1%} ({g:,.0f} / {n:,.0f}) | ≥ 10 % | {verdict(ratio >= 0.10)} |"
            )
        for mode, target in (("json", 0.3), ("stream", 0.5)):
            for c in (16, 64):
                v = rows["gateway"][f"{mode}_c{c}"]["cpu_all_ms_per_req"]
                out.append(f"| gateway CPU per request (all processes), {mode}, c={c} | {_fmt(v, '.3f')} ms | ≤ {target} ms | "
                           f"{verdict(v is not None and v <= target)} |")  # fmt: skip
        for mode in ("json", "stream"):
            add = rows["gateway"][f"{mode}_c1"]["p50"] - rows["bare"][f"{mode}_c1"]["p50"]
            out.append(f"| gateway p50 − bare p50, {mode}, c=1 | {add:.3f} ms | ≤ 1 ms | {verdict(add <= 1.0)} |")
        t = http["ttft"]
        add = t["gateway"]["p50"] - t["bare"]["p50"]
        out.append(f"| time to first token added (p50, c=1) | {add:.3f} ms | ≤ 1 ms | {verdict(add <= 1.0)} |")
        if "gateway2" in rows:
            for mode in ("json", "stream"):
                one, two = rows["gateway"][f"{mode}_c64"]["rps"], rows["gateway2"][f"{mode}_c64"]["rps"]
                out.append(
                    f"| 2 workers / 1 worker req/s, {mode}, c=64 | {two / one:.2f}× | ≥ 1.8× | {verdict(two / one >= 1.8)} |"
                )
            for mode in ("json", "stream"):
                r1, r2 = rows["gateway"][f"{mode}_c64"], rows["gateway2"][f"{mode}_c64"]
                c1, c2, load = r1["cpu_all_ms_per_req"], r2["cpu_all_ms_per_req"], r2["load_cpus"]
                if c1 and c2 and r1["rps"]:
                    # What 2 workers could reach here: the CPUs wrk and the upstream leave them, at
                    # the CPU per request they spent, against one worker's rate on a CPU of its own.
                    bound = (2.0 - load) / (c2 / 1000) / r1["rps"]
                    out.append(
                        f"| of it, {mode}: CPU/request 2 workers ÷ 1 worker; wrk + upstream CPUs; the ratio the CPUs "
                        f"left allow | {c2 / c1:.2f}; {load:.2f} of 2; {bound:.2f}× | — | — |"
                    )
    a = mw["added_us_per_request_nonstream"]
    out.append(f"| middleware CPU per request (non-stream, async) | {a:.1f} µs | ≤ 50 µs | {verdict(a <= 50)} |")
    a = mw["added_us_strict_c64_nonstream"]
    out.append(f"| middleware CPU per request (non-stream, strict, c=64) | {a:.1f} µs | ≤ 50 µs | {verdict(a <= 50)} |")
    a = mw["added_us_per_chunk"]
    out.append(f"| middleware CPU per streamed chunk | {a:.2f} µs | ≤ 2 µs | {verdict(a <= 2.0)} |")
    w = max(wr, key=lambda x: int(x["records_per_s"]))
    how = f"{w['prepare_processes']} prepare processes" if w.get("prepare_processes") else "in-thread"
    out.append(
        f"| writer records/s durable ({w['n']:,} records, {how}) | {w['records_per_s']:,} | ≥ 50,000 | "
        f"{verdict(w['records_per_s'] >= 50000)} |"
    )
    v = others.get("verify")
    if v and "verify_records_per_s" in v:
        out.append(f"| verifier records/s ({v['records']:,} records, {v['log_mb']} MB) | {v['verify_records_per_s']:,} | ≥ 500,000 | "
                   f"{verdict(v['verify_records_per_s'] >= 500_000)} |")  # fmt: skip
    pr = others.get("proofs")
    if pr and "verify_proofs_per_s_per_core" in pr:
        n = pr["verify_proofs_per_s_per_core"]
        out.append(f"| inclusion proofs verified per second per core | {n:,} | ≥ 20,000 | {verdict(n >= 20_000)} |")
    rd = others.get("redaction")
    if rd and "x_presidio_one" in rd:
        x = min(rd["x_presidio_one"], rd["x_presidio_fifty"])
        out.append(
            f"| redaction throughput / Presidio (lower of 1 and 50 texts per call) | {x:.1f}× | ≥ 20× | {verdict(x >= 20)} |"
        )
    if rd and "us_clean_2kb" in rd:
        out.append(
            f"| redaction of a clean 2 KB record | {rd['us_clean_2kb']:.1f} µs | ≤ 25 µs | {verdict(rd['us_clean_2kb'] <= 25)} |"
        )
    out.append("")

    if http:
        out.append("### Records written by the gateways during the HTTP run")
        out.append("")
        out.append(
            "| cell | responses completed (wrk) | inference records | status ok | completed without an ok record |"
        )
        out.append("|---|---:|---:|---:|---:|")
        tc = tr = tl = 0
        for key, r in http["records"].items():
            out.append(f"| {key} | {r['completed']:,} | {r['records']:,} | {r['ok_records']:,} | {r['lost']} |")
            tc += r["completed"]
            tr += r["records"]
            tl += r["lost"]
        out.append("")
        out.append(
            f"Total: {tc:,} responses completed in the measured cells, {tr:,} records; {tl} completed responses without "
            f"a record. nginx access log: {http.get('nginx_log_lines', 0):,} lines."
        )
        for name, fl in http["final_log"].items():
            out.append(
                f"Whole log of `{name}` after shutdown (incl. warm-up): {fl['inference']:,} inference records "
                f"{fl['by_status']}, {fl['other']} event entries; hash chains "
                f"{'OK' if fl['chain_ok'] else 'BROKEN: ' + '; '.join(fl['problems'])}."
            )
        out.append("")
    return "\n".join(out)


def _others_table(wr: list[dict[str, Any]], others: dict[str, Any]) -> list[str]:
    """The writer, verifier, proof and redaction figures beside their baselines."""
    out = ["### Writer, verifier, proofs and redaction beside their baselines", ""]
    out.append("| bench | measured | baseline | target |")
    out.append("|---|---:|---:|---:|")
    w = wr[0]
    out.append(f"| writer: records/s durable, {w['n']:,} records (bench/_writer.py; {others.get('package', '')}) | "
               f"{w['records_per_s']:,} ({w['cpu_us_per_record']:.1f} µs CPU/record) | "
               "9,632 (issue 10's first landing) | 50,000 |")  # fmt: skip
    wp = others.get("writer_pure")
    if wp:
        out.append(f"| writer, same run on the sources (pure Python) | {wp['records_per_s']:,} "
                   f"({wp['cpu_us_per_record']:.1f} µs CPU/record) | — | — |")  # fmt: skip
    v = others.get("verify")
    if v and "verify_records_per_s" in v:
        out.append(
            f"| verifier: records/s over {v['log_mb']} MB (bench/verify/run.py, {v['verify_workers']}) | "
            f"{v['verify_records_per_s']:,} ({v['verify_mb_per_s']} MB/s; {v['verify_cpu_us_per_record']} µs CPU/record) | "
            f"~200,000 (issue 10's first landing) | 500,000 |"
        )
        out.append(
            f"| chain append per record: serialise + write alone / with chain + Merkle | "
            f"{v['append_cpu_us_per_record']} µs | {v['serialize_write_only_cpu_us_per_record']} µs (plain JSON lines) | — |"
        )
    elif v:
        out.append(f"| verifier | failed: {str(v.get('error', ''))[:200]} | | |")
    pr = others.get("proofs")
    if pr and "verify_proofs_per_s_per_core" in pr:
        out.append(
            f"| inclusion proofs verified / s / core, signed checkpoint + path (bench/_proofs.py, {pr['proofs']} proofs) | "
            f"{pr['verify_proofs_per_s_per_core']:,} ({pr['verify_us_per_proof']} µs each) | "
            f"Merkle path alone: {pr['merkle_only_per_s_per_core']:,} ({pr['merkle_only_us_per_proof']} µs) | 20,000 |"
        )
    rd = others.get("redaction")
    if rd and "mb_s_one" in rd:
        if rd.get("presidio_mb_s_one"):
            out.append(
                f"| redaction MB/s (CPU), one text / 50 texts per call (bench/redaction/run.py) | "
                f"{rd['mb_s_one']:.2f} / {rd['mb_s_fifty']:.2f} | Presidio {rd['presidio_mb_s_one']:.2f} / "
                f"{rd['presidio_mb_s_fifty']:.2f} ({rd['x_presidio_one']:.1f}× / {rd['x_presidio_fifty']:.1f}×) | 20× |"
            )
        else:
            out.append(f"| redaction MB/s (CPU), one / 50 texts per call | {rd['mb_s_one']:.2f} / {rd['mb_s_fifty']:.2f} | "
                       "Presidio not installed (--redaction-python) | 20× |")  # fmt: skip
        if "us_clean_2kb" in rd:
            out.append(
                f"| redaction: clean ~2 KB record | {rd['us_clean_2kb']:.1f} µs | 73.2 µs (issue 10's first round) | 25 µs |"
            )
        if "records_per_s_clean" in rd:
            out.append(
                f"| redaction: ~1 KB records/s without PII, one core | {rd['records_per_s_clean']:,} | — | 50,000 |"
            )
    elif rd:
        out.append(f"| redaction | failed: {str(rd.get('error', ''))[:200]} | | |")
    rp = others.get("redaction_pure")
    if rp and "mb_s_one" in rp:
        ratio = f" ({rp['x_presidio_one']:.1f}× / {rp['x_presidio_fifty']:.1f}×)" if rp.get("x_presidio_one") else ""
        us2k = rp.get("us_clean_2kb", float("nan"))
        out.append(f"| redaction on the sources (pure Python): MB/s one / 50 texts{ratio}; clean 2 KB record | "
                   f"{rp['mb_s_one']:.2f} / {rp['mb_s_fifty']:.2f}; {us2k:.1f} µs | — | — |")  # fmt: skip
    out.append("")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s per HTTP cell, smaller in-process runs")
    ap.add_argument("--seconds", type=int, help="seconds per HTTP cell (default 5, --quick 2)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--no-uvicorn-row", action="store_true", help="skip the DemoEngine-on-uvicorn reference row")
    ap.add_argument("--no-variants", action="store_true", help="skip the gateway variant with record work offloaded")
    ap.add_argument("--writer-records", type=int, help="records for the writer bench (default 50000, --quick 20000)")
    ap.add_argument(
        "--verify-records", type=int, help="records for the verifier bench (default 300000, --quick 100000)"
    )
    ap.add_argument("--skip-others", action="store_true", help="skip the verifier, proof and redaction benches")
    ap.add_argument(
        "--redaction-python",
        default=PY,
        help="interpreter for bench/redaction/run.py: one with presidio-analyzer installed gives the baseline",
    )
    ap.add_argument(
        "--native",
        choices=("auto", "off"),
        default="auto",
        help="auto: compile the hot modules (as a regular install does) and run everything on them; off: the sources",
    )
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
    load0 = os.getloadavg()[0]
    try:
        src = ROOT / "src"
        tree = native_tree(tmp) if args.native == "auto" else None
        # Every process of the run (gateways, helpers) imports the package from here.
        os.environ["PYTHONPATH"] = str(tree or src)
        pure_env = dict(os.environ, PYTHONPATH=str(src))
        version = subprocess.run([PY, "-m", "vllm_audit.cli", "--version"], capture_output=True, text=True)
        flavour = version.stdout.strip()
        print(f"package: {flavour}", flush=True)
        fs = fsync_probe(tmp)
        print(f"fdatasync probe: p50 {fs['p50']:.2f} ms p99 {fs['p99']:.2f} ms", flush=True)
        http = None if args.skip_http else http_bench(tmp, seconds, not args.no_uvicorn_row, not args.no_variants)
        print("middleware mode (in-process) ...", flush=True)
        mw = run_helper([str(HERE / "_inproc.py"), str(5000 if args.quick else 20000)], 600)
        n = args.writer_records or (20000 if args.quick else 50000)
        print(f"writer ({n:,} records) ...", flush=True)
        wr = [run_helper([str(HERE / "_writer.py"), str(n)], 900)]
        wr.append(run_helper([str(HERE / "_writer.py"), str(max(2000, n // 10)), "64"], 900))
        # The target's setting: 2 cores, finalize + redaction in 2 prepare processes ([log]
        # prepare_processes = 2), the writer thread sealing; not pinned, so both CPUs are used.
        wr.append(run_helper([str(HERE / "_writer.py"), str(n), "4096", "2"], 900, cpu=None))
        others: dict[str, Any] = {"package": flavour}
        if tree is not None:  # the same in-thread run on the sources, for the difference the compiled modules make
            others["writer_pure"] = run_helper([str(HERE / "_writer.py"), str(n)], 900, env=pure_env)
        if not args.skip_others:
            nv = args.verify_records or (100_000 if args.quick else 300_000)
            print(f"verifier ({nv:,} records, processes on every CPU) ...", flush=True)
            others["verify"] = run_helper(
                [str(HERE / "verify" / "run.py"), "--records", str(nv), "--dir", str(tmp / "verify")], 900, None
            )
            print("inclusion proofs ...", flush=True)
            others["proofs"] = run_helper([str(HERE / "_proofs.py")], 600)
            print("redaction (vs Presidio) ...", flush=True)
            others["redaction"] = redaction_bench(args.redaction_python, tree or src)
            if tree is not None:
                print("redaction on the sources ...", flush=True)
                others["redaction_pure"] = redaction_bench(args.redaction_python, src)
        text = report(http, mw, wr, seconds, fs, others)
        print()
        print(text)
        print(f"(total bench time {time.time() - t0:.0f} s; python {sys.version.split()[0]}; "
              f"{os.cpu_count()} CPUs; load avg at start {load0:.2f}, at end {os.getloadavg()[0]:.2f})")  # fmt: skip
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"http": http, "middleware": mw, "writer": wr, "fsync": fs, "others": others}, indent=1, default=str
                )
            )
        lost = sum(r["lost"] for r in http["records"].values()) if http else 0
        broken = bool(http) and not all(fl["chain_ok"] for fl in http["final_log"].values())
        return 1 if lost or broken else 0
    finally:
        _cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
