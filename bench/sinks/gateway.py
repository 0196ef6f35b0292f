"""The gateway's throughput with every sink on vs off, side by side in one run (issue 9).

    .venv/bin/python bench/sinks/gateway.py [--seconds S] [--rounds R] [--concurrency C]

Starts the sinks' servers once (a private nats-server with JetStream, noida-db's Kafka-protocol
broker and its Elasticsearch API, oteltap as the OTLP receiver, a private rsyslogd over TLS, the
tests' HTTPS webhook receiver), the bench's fake upstream, then alternates rounds of the gateway
(`vllm-audit serve --upstream`, one worker, strict durability, default privacy, the in-process
query store) with no `[sinks.*]` ("off") and with all seven ("on"). wrk drives non-streamed chat
requests. Reports req/s and the gateway process's CPU ms per request for each round, the medians,
the cost of sinks on, and — after each "on" round — how many records every sink had delivered
(from `vllm-audit ship --status`), so a sink that fell behind is visible rather than hidden.
Pinning as in bench/run.py: wrk, the upstream and the sink servers on CPU 0, the gateway on CPU 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("sink_bench", HERE / "run.py")
assert _spec is not None and _spec.loader is not None
sink_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sink_bench)

BIN = Path(sys.executable).parent
LOAD_CPU, GW_CPU = "0", "1"


def _popen(cmd: list[str], log: Path, cpu: str = LOAD_CPU, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = open(log, "wb")
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)


@contextlib.contextmanager
def servers(work: Path) -> Iterator[dict[str, dict[str, object]]]:
    """Start every sink's server; yield the ``[sinks.*]`` tables pointing at them."""
    from tests.sinks.test_syslog import Rsyslog
    from tests.sinks.test_webhook import SECRET, Receiver

    procs: list[subprocess.Popen[bytes]] = []
    stack = contextlib.ExitStack()
    try:
        tables: dict[str, dict[str, object]] = {}
        tables["file"] = {"type": "file", "directory": str(work / "file-out")}
        # NATS JetStream
        nport = sink_bench._port()
        (work / "nats").mkdir()
        conf = work / "nats" / "nats.conf"
        conf.write_text(f'port: {nport}\nhost: "127.0.0.1"\njetstream {{ store_dir: "{work / "nats" / "js"}" }}\n')
        nats_bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
        procs.append(_popen([nats_bin, "-c", str(conf)], work / "nats.log"))
        sink_bench._wait_port(nport, procs[-1])
        tables["nats"] = {"type": "nats", "servers": [f"nats://127.0.0.1:{nport}"]}
        # Kafka (noida-db) and Elasticsearch (noida-db)
        for kind, venv, flag in (("kafka", "noida-venv", "--kafka-port"), ("elastic", "noida-venv", "--elasticsearch-port")):
            found = sorted((Path.home() / ".cache/vllm-audit" / venv).glob("lib/python3*/site-packages/noida_db/noida-db"))
            if not found:
                raise SystemExit("run scripts/services.d/noida.sh first")
            port = sink_bench._port()
            (work / kind).mkdir()
            only = "kafka" if kind == "kafka" else "elasticsearch"
            procs.append(_popen([str(found[0]), "start", "--only", only, flag, str(port), "--data-dir", str(work / kind)],
                                work / f"{kind}.log"))  # fmt: skip
            sink_bench._wait_port(port, procs[-1])
            if kind == "kafka":
                tables["kafka"] = {"type": "kafka", "bootstrap_servers": f"127.0.0.1:{port}", "create_topic": True}
            else:
                tables["elasticsearch"] = {"type": "elasticsearch", "url": f"http://127.0.0.1:{port}"}
        # OTLP (oteltap)
        oport = sink_bench._port()
        procs.append(_popen([sys.executable, "-m", "oteltap", "--port", str(oport)], work / "otlp.log"))
        sink_bench._wait_port(oport, procs[-1])
        tables["otlp"] = {"type": "otlp", "endpoint": f"http://127.0.0.1:{oport}/v1/logs", "compression": "none"}
        # syslog over TLS (rsyslog) and the webhook receiver (HTTPS)
        rs = Rsyslog(work / "rsyslog")
        rs.start()
        stack.callback(rs.stop)
        tables["syslog"] = {"type": "syslog", "host": "localhost", "port": rs.tls_port, "ca_file": str(rs.ca)}
        os.environ["BENCH_HOOK_SECRET"] = SECRET
        rx = Receiver(work / "receiver")
        rx.start()
        stack.callback(rx.stop)
        tables["webhook"] = {"type": "webhook", "url": rx.url, "secret": {"env": "BENCH_HOOK_SECRET"}, "ca_file": str(rx.ca)}
        yield tables
    finally:
        stack.close()
        for p in procs:
            p.kill()
            p.wait()


def _toml(tables: dict[str, dict[str, object]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[sinks.{name}]")
        for k, v in table.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in v.items())
                out.append(f"{k} = {{ {inner} }}")
            else:
                out.append(f"{k} = {json.dumps(v)}")
        out.append("")
    return "\n".join(out)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def round_(work: Path, label: str, up_port: int, tables: dict[str, dict[str, object]] | None, seconds: float,
           conc: int) -> dict[str, object]:  # fmt: skip
    d = work / f"gw-{label}-{time.monotonic_ns()}"
    d.mkdir()
    cfg = d / "config.toml"
    cfg.write_text('[log]\ndir = "' + str(d / "log") + '"\n\n' + (_toml(tables) if tables else ""))
    port = sink_bench._port()
    env = dict(os.environ)
    env.pop("VLLM_AUDIT_CONFIG", None)
    cmd = [str(BIN / "vllm-audit"), "serve", "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(port),
           "--config", str(cfg)]  # fmt: skip
    gw = _popen(cmd, d / "gateway.log", GW_CPU, env)
    try:
        sink_bench._wait_port(port, gw)
        lua = d / "post.lua"
        body = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "Summarise ticket 4711."}],
                           "max_tokens": 20})  # fmt: skip
        lua.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n')
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c", str(conc), "-d", "1s", "-s", str(lua), url],
                       capture_output=True, timeout=60)  # fmt: skip  (warm-up)
        # With sinks, the gateway runs them in a child process ([ship] isolation = "auto"); it
        # inherits the gateway's pinning, so move it beside the load, off the gateway's core.
        kids = subprocess.run(["pgrep", "-P", str(gw.pid)], capture_output=True, text=True).stdout.split()
        for kid in kids:
            subprocess.run(["taskset", "-p", "-c", LOAD_CPU, kid], capture_output=True)
        k0 = sum(_cpu_ticks(int(k)) for k in kids)
        c0 = _cpu_ticks(gw.pid)
        out = subprocess.run(
            ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c", str(conc), "-d", f"{int(seconds)}s", "-s", str(lua), url],
            capture_output=True, text=True, timeout=seconds + 60,
        ).stdout  # fmt: skip
        c1 = _cpu_ticks(gw.pid)
        k1 = sum(_cpu_ticks(int(k)) for k in kids if Path(f"/proc/{k}").exists())
        m = re.search(r"(\d+) requests in", out)
        reqs = int(m.group(1)) if m else 0
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        rps = float(m.group(1)) if m else 0.0
        res: dict[str, object] = {
            "label": label, "rps": rps, "requests": reqs,
            "cpu_ms_per_req": round((c1 - c0) / os.sysconf("SC_CLK_TCK") * 1000 / max(1, reqs), 3),
            "shipper_cpu_ms_per_req": round((k1 - k0) / os.sysconf("SC_CLK_TCK") * 1000 / max(1, reqs), 3),
        }  # fmt: skip
        if tables:
            deadline = time.monotonic() + 30
            status: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                st = subprocess.run([str(BIN / "vllm-audit"), "ship", "--config", str(cfg), "--status", "--json"],
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
                status = json.loads(st.stdout or "[]")
                if all(s.get("lag_records", 1) == 0 for s in status):
                    break
                time.sleep(0.5)
            res["delivered"] = {str(s["name"]): (s.get("delivered"), s.get("lag_records")) for s in status}
        return res
    finally:
        gw.terminate()
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sinks-gateway-"))
    up_port = sink_bench._port()
    up = _popen([sys.executable, str(ROOT / "bench" / "_upstream.py"), str(up_port)], work / "upstream.log")
    try:
        sink_bench._wait_port(up_port, up)
        with servers(work) as tables:
            results = []
            for _ in range(args.rounds):
                for label, t in (("off", None), ("on", tables)):
                    r = round_(work, label, up_port, t, args.seconds, args.concurrency)
                    print(json.dumps(r), flush=True)
                    results.append(r)
        med = {}
        for label in ("off", "on"):
            rows = [r for r in results if r["label"] == label]
            med[label] = (statistics.median(float(r["rps"]) for r in rows),  # type: ignore[arg-type]
                          statistics.median(float(r["cpu_ms_per_req"]) for r in rows))  # type: ignore[arg-type]  # fmt: skip
        cost = 1 - med["on"][0] / med["off"][0]
        print()
        print("| sinks | req/s (median) | gateway CPU ms/request (median) |")
        print("|---|---:|---:|")
        print(f"| off (query store only) | {med['off'][0]:,.0f} | {med['off'][1]:.3f} |")
        print(f"| on (file, syslog/TLS, kafka, nats, elasticsearch, otlp, webhook) | {med['on'][0]:,.0f} | {med['on'][1]:.3f} |")
        print(f"\nthroughput cost of all sinks on: {cost * 100:.1f} % (target <= 5 %); "
              f"CPU per request +{(med['on'][1] / med['off'][1] - 1) * 100:.1f} %")  # fmt: skip
        print(f"load average at end: {os.getloadavg()}")
    finally:
        up.kill()
        up.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
