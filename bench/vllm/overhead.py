#!/usr/bin/env python3
"""What does auditing cost a real vLLM? (M16) — one command, one table.

    .venv/bin/python bench/vllm/overhead.py            # ~6-10 min on 2 cores
    .venv/bin/python bench/vllm/overhead.py --quick    # concurrency 1 and 8, one round (~3 min)

Three targets, same tiny model, same load:

* ``vllm``        — ``vllm serve`` alone
* ``middleware``  — ``vllm serve --middleware vllm_audit.AuditMiddleware`` (strict durability)
* ``gateway``     — ``vllm-audit serve --upstream <the plain vLLM>`` in front of the plain vLLM

For each: 16-token completions (``ignore_eos``), non-streaming and streaming, at concurrency
1, 8 and 32 (closed loop, bounded request counts): throughput, p50/p99 latency, p50 TTFT for
streams, and the CPU time per request of vLLM's API server process (``/proc/<pid>/stat``
utime+stime before/after the load; for the gateway also the gateway process's own CPU).

Both vLLM servers and the gateway run at once and the cells are measured interleaved (every
round runs each cell on every target back to back, rotating the order), so background load and
drift hit all targets alike. Servers come from ``scripts/vllm-cpu`` (setup.sh runs first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "vllm-cpu"))
import vllm_cpu_harness as harness  # noqa: E402

MODEL = "tiny-llama"


@dataclass
class Result:
    target: str
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    tok_s: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float | None
    api_cpu_ms_per_req: float | None
    #: Lowest per-round p50 and API CPU/request: background load only ever adds, so the best
    #: round is the least disturbed view of each target (the pooled figures include the noise).
    best_round_p50_ms: float | None = None
    best_round_api_cpu_ms_per_req: float | None = None
    gw_cpu_ms_per_req: float | None = None
    error_samples: list[str] = field(default_factory=list)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


async def one_request(
    session: aiohttp.ClientSession, url: str, stream: bool, max_tokens: int, i: int
) -> tuple[float, float | None, int, str | None]:
    """(latency s, ttft s or None, completion tokens, error or None)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": f"def function_{i % 97}(",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    t0 = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if stream:
                n = 0
                async for line in r.content:
                    if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        n += 1
                if r.status != 200:
                    return time.perf_counter() - t0, ttft, 0, f"HTTP {r.status}"
                return time.perf_counter() - t0, ttft, n, None
            data = await r.read()
            if r.status != 200:
                return time.perf_counter() - t0, None, 0, f"HTTP {r.status}: {data[:200]!r}"
            return time.perf_counter() - t0, None, json.loads(data)["usage"]["completion_tokens"], None
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        return time.perf_counter() - t0, None, 0, repr(exc)


async def run_load(url: str, stream: bool, concurrency: int, n: int, max_tokens: int) -> tuple[float, list[Any]]:
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    results: list[Any] = []
    next_i = 0

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                results.append(await one_request(session, url, stream, max_tokens, i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, results


@dataclass
class Target:
    name: str
    url: str
    api_pid: int
    gw_pid: int | None = None


@dataclass
class Acc:
    """Measurements of one (target, stream, concurrency) cell, summed over rounds."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    tokens: int = 0
    lat_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    api_cpu_s: float = 0.0
    gw_cpu_s: float = 0.0
    round_p50_ms: list[float] = field(default_factory=list)
    round_api_cpu_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def measure(t: Target, stream: bool, conc: int, n: int, max_tokens: int, acc: Acc) -> None:
    cpu0 = harness.proc_cpu_seconds(t.api_pid)
    gcpu0 = harness.proc_cpu_seconds(t.gw_pid) if t.gw_pid else 0.0
    secs, res = asyncio.run(run_load(t.url, stream, conc, n, max_tokens))
    api_cpu = harness.proc_cpu_seconds(t.api_pid) - cpu0
    acc.api_cpu_s += api_cpu
    if res:
        acc.round_api_cpu_ms.append(api_cpu * 1000 / len(res))
    if t.gw_pid:
        acc.gw_cpu_s += harness.proc_cpu_seconds(t.gw_pid) - gcpu0
    ok = [r for r in res if r[3] is None]
    acc.requests += len(res)
    acc.errors += len(res) - len(ok)
    acc.error_samples += [r[3] for r in res if r[3] is not None][: 3 - len(acc.error_samples)]
    acc.seconds += secs
    # ignore_eos: every successful request generates exactly max_tokens (stream chunks may carry
    # several tokens when the API server lags, so chunks are not counted).
    acc.tokens += len(ok) * max_tokens
    acc.lat_ms += [r[0] * 1000 for r in ok]
    if ok:
        acc.round_p50_ms.append(pct([r[0] * 1000 for r in ok], 50))
    acc.ttft_ms += [r[1] * 1000 for r in ok if r[1] is not None]


def result(name: str, stream: bool, conc: int, a: Acc, gw: bool) -> Result:
    return Result(
        target=name,
        stream=stream,
        concurrency=conc,
        requests=a.requests,
        errors=a.errors,
        seconds=a.seconds,
        rps=(a.requests - a.errors) / a.seconds if a.seconds else 0.0,
        tok_s=a.tokens / a.seconds if a.seconds else 0.0,
        p50_ms=pct(a.lat_ms, 50),
        p99_ms=pct(a.lat_ms, 99),
        ttft_p50_ms=pct(a.ttft_ms, 50) if stream else None,
        api_cpu_ms_per_req=a.api_cpu_s * 1000 / a.requests if a.requests else None,
        gw_cpu_ms_per_req=a.gw_cpu_s * 1000 / a.requests if gw and a.requests else None,
        best_round_p50_ms=min(a.round_p50_ms) if a.round_p50_ms else None,
        best_round_api_cpu_ms_per_req=min(a.round_api_cpu_ms) if a.round_api_cpu_ms else None,
        error_samples=a.error_samples,
    )


def bench(targets: list[Target], args: argparse.Namespace) -> list[Result]:
    """Interleaved: every round runs each cell on every target back to back (rotating the order),
    so background load and drift hit all targets alike."""
    for t in targets:  # warm-up: first requests pay for lazy initialisation on every path
        asyncio.run(run_load(t.url, False, 4, 16, args.max_tokens))
        asyncio.run(run_load(t.url, True, 4, 16, args.max_tokens))
    accs: dict[tuple[str, bool, int], Acc] = {}
    k = 0
    for rnd in range(args.rounds):
        for stream in (False, True):
            for conc in args.concurrency:
                n = max(args.min_requests, conc * args.requests_per_worker)
                order = targets[k % len(targets) :] + targets[: k % len(targets)]
                k += 1
                for t in order:
                    acc = accs.setdefault((t.name, stream, conc), Acc())
                    measure(t, stream, conc, n, args.max_tokens, acc)
                log(
                    f"round {rnd + 1}/{args.rounds} {'stream' if stream else 'non-stream'} c={conc}: "
                    + ", ".join(f"{t.name} p50 {pct(accs[(t.name, stream, conc)].lat_ms, 50):.1f} ms" for t in targets)
                )
    return [
        result(t.name, stream, conc, accs[(t.name, stream, conc)], t.gw_pid is not None)
        for t in targets
        for stream in (False, True)
        for conc in args.concurrency
    ]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "" if v is None else format(v, fmt)


def table(results: list[Result]) -> str:
    base = {(r.stream, r.concurrency): r for r in results if r.target == "vllm"}
    head = (
        "| target | mode | conc | req | err | req/s | tok/s | p50 ms | p99 ms | TTFT p50 ms "
        "| best-round p50 ms | Δ best p50 vs vllm | vLLM API CPU ms/req (best round) | gateway CPU ms/req |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = ["vllm", "middleware", "gateway"]
    for r in sorted(results, key=lambda r: (r.stream, r.concurrency, order.index(r.target))):
        b = base.get((r.stream, r.concurrency))
        delta = ""
        if b and r.target != "vllm" and r.best_round_p50_ms is not None and b.best_round_p50_ms is not None:
            delta = f"{r.best_round_p50_ms - b.best_round_p50_ms:+.1f}"
        lines.append(
            f"| {r.target} | {'stream' if r.stream else 'non-stream'} | {r.concurrency} | {r.requests} | {r.errors} "
            f"| {r.rps:.1f} | {r.tok_s:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {_f(r.ttft_p50_ms)} "
            f"| {_f(r.best_round_p50_ms)} | {delta} "
            f"| {_f(r.api_cpu_ms_per_req, '.2f')} ({_f(r.best_round_api_cpu_ms_per_req, '.2f')}) "
            f"| {_f(r.gw_cpu_ms_per_req, '.2f')} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (results are pooled)")
    ap.add_argument("--requests-per-worker", type=int, default=4, help="requests per round = max(min, conc * this)")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--targets", nargs="+", default=["vllm", "middleware", "gateway"])
    ap.add_argument("--durability", choices=["strict", "async"], default="strict")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 8, one round")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--keep-dir", action="store_true", help="keep the temp dir (server logs, audit logs)")
    args = ap.parse_args()
    if args.quick:
        args.concurrency = [1, 8]
        args.rounds = 1
    unknown = set(args.targets) - {"vllm", "middleware", "gateway"}
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}")

    setup = harness.ensure_setup()
    load0 = os.getloadavg()[0]
    log(f"vLLM {setup.versions.get('VLLM_VERSION')} torch {setup.versions.get('TORCH_VERSION')} venv {setup.venv}")
    work = Path(tempfile.mkdtemp(prefix="vllm-audit-bench-"))
    log(f"work dir {work}")
    notes: list[str] = []
    servers: list[harness.Server] = []
    targets: list[Target] = []

    def cfg(name: str) -> Path:
        p = work / f"{name}.toml"
        p.write_text(f'[log]\ndir = "{work / (name + "-log")}"\ndurability = "{args.durability}"\n')
        return p

    try:
        # Both vLLM servers run side by side (idle while the other is measured); only the
        # API-server process of the measured target does work, besides its engine core.
        plain = mw = None
        if {"vllm", "gateway"} & set(args.targets):
            log("starting plain vLLM")
            plain = harness.start_vllm(setup, work / "vllm-plain.log", wait=False)
            servers.append(plain)
        if "middleware" in args.targets:
            log("starting vLLM with --middleware vllm_audit.AuditMiddleware")
            mw = harness.start_vllm(
                setup,
                work / "vllm-middleware.log",
                extra_args=["--middleware", "vllm_audit.AuditMiddleware"],
                env={"VLLM_AUDIT_CONFIG": str(cfg("middleware"))},
                wait=False,
            )
            servers.append(mw)
        for srv in servers:
            srv.wait_healthy()
        if plain is not None and "vllm" in args.targets:
            targets.append(Target("vllm", plain.url, plain.pid))
        if mw is not None:
            targets.append(Target("middleware", mw.url, mw.pid))
        if plain is not None and "gateway" in args.targets:
            try:
                gw = harness.start_gateway(setup, plain.url, cfg("gateway"), work / "gateway.log")
            except harness.ServerError as exc:
                notes.append(f"gateway did not start: {str(exc).splitlines()[0]}")
                log(str(exc))
            else:
                servers.append(gw)
                targets.append(Target("gateway", gw.url, plain.pid, gw.pid))
        log("targets: " + ", ".join(f"{t.name} {t.url}" for t in targets))
        results = bench(targets, args)
    except harness.ServerError as exc:
        log(str(exc))
        return 2
    finally:
        for srv in reversed(servers):
            srv.stop()

    print()
    print(
        f"vLLM {setup.versions.get('VLLM_VERSION')} (CPU), tiny-llama, {args.max_tokens}-token completions "
        f"(ignore_eos), audit durability={args.durability}, {args.rounds} interleaved round(s); "
        f"{len(os.sched_getaffinity(0))} CPUs, load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}"
    )
    print()
    print(table(results))
    for n in notes:
        print(f"\nNOTE: {n}")
    errs = [r for r in results if r.errors]
    for r in errs:
        print(f"\nERRORS {r.target} stream={r.stream} c={r.concurrency}: {r.errors}, e.g. {r.error_samples}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.keep_dir:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if errs or notes else 0


if __name__ == "__main__":
    sys.exit(main())
