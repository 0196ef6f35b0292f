"""Interleaved A/B of two source trees through the same harness as bench/run.py.

``python bench/ab.py OLD_SRC NEW_SRC [--rounds 3] [--seconds 3]`` starts the fake upstream on CPU 0,
then per round and tree (order alternating) a gateway (``vllm-audit serve --upstream``, one worker,
strict, ``PYTHONPATH=<tree>``) on CPU 1, and prints per round: time to first token at c=1 (p50 /
p99, 600 streamed requests, raw socket) and the CPU time of the gateway's processes per request
under wrk at c=64 for JSON and 20-chunk streams. Alternating the trees within one run is what makes
a difference visible on a shared, noisy machine; read the medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as R  # the bench harness: processes, wrk, TTFT client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="src directory of the first tree (the one holding vllm_audit/)")
    ap.add_argument("new", help="src directory of the second tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per wrk cell")
    args = ap.parse_args()
    trees = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    tmp = Path(tempfile.mkdtemp(prefix="vllm-audit-ab-"))
    scripts = {False: R.lua_script(tmp, False), True: R.lua_script(tmp, True)}
    up_port = R.free_port()
    up = R.start([R.PY, str(R.HERE / "_upstream.py"), str(up_port)], R.LOAD_CPU, tmp / "upstream.log")
    R.wait_port(up_port, up, tmp / "upstream.log")
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
        for name, tree in order:
            port = R.free_port()
            p, _log = R.gateway_start(tmp / f"{name}{r}", port, up_port, extra_env={"PYTHONPATH": tree})
            R.ttft(port, 100)  # warm-up
            t = R.ttft(port, 600)
            results.setdefault((name, "ttft_p50_ms"), []).append(t["p50"])
            results.setdefault((name, "ttft_p99_ms"), []).append(t["p99"])
            for stream in (False, True):
                R.wrk(port, scripts[stream], 16, 1)  # warm-up
                _own0, all0 = R.proc_cpu(p.pid)
                w = R.wrk(port, scripts[stream], 64, args.seconds)
                _own1, all1 = R.proc_cpu(p.pid)
                key = "stream_c64_cpu_ms" if stream else "json_c64_cpu_ms"
                results.setdefault((name, key), []).append((all1 - all0) * 1000 / max(1, w["requests"]))
            R.stop(p)
            row = {k: round(v[-1], 3) for (n, k), v in results.items() if n == name}
            print(f"round {r} {name}: {row} (load {os.getloadavg()[0]:.2f})", flush=True)
    print("\nmedians over rounds:")
    for key in ("ttft_p50_ms", "ttft_p99_ms", "json_c64_cpu_ms", "stream_c64_cpu_ms"):
        old, new = (statistics.median(results[(n, key)]) for n in ("old", "new"))
        print(f"  {key:18s} old {old:7.3f}  new {new:7.3f}  ({(new / old - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
