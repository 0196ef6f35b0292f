"""Console page load times with 1,000,000 records in a PostgreSQL query store (target: search p95 <= 300 ms).

    .venv/bin/python bench/console/run.py                 # 1,000,000 rows, 40 loads per page and role
    .venv/bin/python bench/console/run.py --rows 100000 --loads 20

Rows are bulk-inserted with COPY into a fresh table prefix (row-level security and indexes as the
store creates them), ANALYZEd, then a gateway subprocess serves the console over that store and
each page is fetched over HTTP as a platform admin, a tenant auditor and a user (every load is a
real console request: session cookie, authentication, RLS read, a durable audit event, the page).
Timings are client-side wall clock per request. The prefix and reader role are dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from vllm_audit.access.config import StoreConfig  # noqa: E402
from vllm_audit.access.store import COLUMNS, PostgresStore  # noqa: E402

PG_DSN = os.environ.get("VLLM_AUDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ORGS = [f"org{i:02d}" for i in range(20)]
MODELS = ["llama-3-8b", "llama-3-70b", "qwen2-7b", "mistral-7b", "phi-3"]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
STATUSES = ["ok"] * 18 + ["client_error", "upstream_error"]


def gen_rows(n: int, seed: int = 7) -> Any:
    rng = random.Random(seed)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    span = 30 * 86400
    for i in range(n):
        org = ORGS[i % len(ORGS)] if rng.random() < 0.5 else rng.choice(ORGS)
        user = f"user{rng.randrange(100)}"
        ts_dt = t0 + dt.timedelta(seconds=span * i / n + rng.random())
        ts = ts_dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_dt.microsecond // 1000:03d}Z"
        model = rng.choice(MODELS)
        route = rng.choice(ROUTES)
        status = rng.choice(STATUSES)
        http = 200 if status == "ok" else (400 if status == "client_error" else 502)
        pt, ct = rng.randrange(5, 2000), rng.randrange(1, 800)
        lat = round(rng.lognormvariate(5, 0.8), 3)
        rid = f"01a2{i:028x}"
        rid = f"{rid[:8]}-{rid[8:12]}-7{rid[13:16]}-8{rid[17:20]}-{rid[20:32]}"
        req = secrets.token_hex(8)
        sha = f"{rng.getrandbits(256):064x}"
        rec = {
            "seq": i,
            "writer_id": "bench-writer",
            "record_type": "inference",
            "record_id": rid,
            "request_id": req,
            "timestamp": ts,
            "org_id": org,
            "user_id": user,
            "auth_status": "authenticated",
            "model_name": model,
            "route": route,
            "method": "POST",
            "http_status": http,
            "status": status,
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "total_tokens": pt + ct,
            "latency_ms": lat,
            "prompt_sha256": sha,
            "input_prompt": [{"role": "user", "content": "benchmark prompt <EMAIL:ps_1a2b3c>"}],
            "output_response": "benchmark answer",
        }
        yield (
            rid,
            rid,
            "bench-writer",
            i,
            req,
            ts,
            org,
            user,
            "authenticated",
            model,
            route,
            "POST",
            http,
            status,
            pt,
            ct,
            pt + ct,
            lat,
            sha,
            "benchmark prompt\nbenchmark answer",
            orjson.dumps(rec).decode(),
        )


def load(store: PostgresStore, n: int) -> float:
    import psycopg

    t = time.perf_counter()
    with psycopg.connect(store.cfg.dsn) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY {store.records} ({', '.join(COLUMNS)}) FROM STDIN") as cp:
            for row in gen_rows(n):
                cp.write_row(row)
        conn.commit()
        conn.execute(f"ANALYZE {store.records}")
        conn.commit()
    return time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--loads", type=int, default=40)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from vllm_audit.access.apikeys import KeyStore

    tag = secrets.token_hex(4)
    prefix, role = f"vacb_{tag}", f"vacb_reader_{tag}"
    store = PostgresStore(StoreConfig(kind="postgresql", dsn=PG_DSN, table_prefix=prefix, reader_role=role))
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {"rows": args.rows, "loads": args.loads}
    try:
        store.init()
        secs = load(store, args.rows)
        results["copy_s"] = round(secs, 1)
        print(f"COPY {args.rows} rows + ANALYZE: {secs:.1f} s", flush=True)
        ks = KeyStore(tmp / "keys.json")
        people = {
            "admin": ks.add("root", "platform", ("platform_admin",), None, "bench")[0],
            "auditor": ks.add("aud", "org03", ("org_auditor",), None, "bench")[0],
            "user": ks.add("user7", "org03", (), None, "bench")[0],
        }
        port = free_port()
        cfg = tmp / "vllm-audit.toml"
        cfg.write_text(
            f'[log]\ndir = "{tmp / "log"}"\n[gateway]\nport = {port}\n[access]\nauth = "api_key"\n'
            f'[access.api_keys]\nfile = "keys.json"\n[access.store]\nkind = "postgresql"\ndsn = "{PG_DSN}"\n'
            f'table_prefix = "{prefix}"\nreader_role = "{role}"\n'
        )
        log = open(tmp / "gateway.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_audit.cli", "serve", "--config", str(cfg)], cwd=tmp, stdout=log, stderr=log
        )
        base = f"http://127.0.0.1:{port}/audit/console"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("gateway did not start")
            time.sleep(0.1)
        # The console builds its sort and usage indexes in the background after its first read:
        # trigger that, and measure once they exist (the time it took is reported).
        with httpx.Client(base_url=base, timeout=60) as c:
            import re

            csrf0 = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get("/login").text)
            assert csrf0 is not None
            c.post("/login", data={"credential": people["admin"], "csrf": csrf0.group(1)})
            t_idx = time.perf_counter()
            c.get("/search")
        import psycopg

        want = {f"{prefix}_records_c_{k}" for k in ("latency_ms", "total_tokens", "http_status", "usage")}
        while True:
            with psycopg.connect(PG_DSN) as conn:
                have = {
                    r[0]
                    for r in conn.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE %s", (prefix + "%",))
                }
                valid = conn.execute(
                    "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname LIKE %s AND NOT i.indisvalid",
                    (prefix + "%",),
                ).fetchone()
            if want <= have and valid is not None and valid[0] == 0:
                break
            if time.perf_counter() - t_idx > 900:
                raise SystemExit("the console's indexes were not built within 15 minutes")
            time.sleep(0.5)
        results["index_build_s"] = round(time.perf_counter() - t_idx, 1)
        print(f"console indexes built in {results['index_build_s']} s", flush=True)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"VACUUM (ANALYZE) {prefix}_records")  # what autovacuum does on a settled table
        some = next(gen_rows(1, seed=7))  # row 0 belongs to org00
        pages = {
            "search (newest first)": "/search",
            "search org+model filter": "/search?org_id=org03&model=qwen2-7b",
            "search user filter": "/search?user_id=user7&org_id=org03",
            "search time range": "/search?since=2026-01-10T00:00&until=2026-01-11T00:00",
            "search by request id": f"/search?request_id={some[4]}",
            "search sort latency": "/search?sort=latency_ms&dir=desc",
            "search page 2": None,
            "usage (30 days, by model)": "/usage?group=model&since=2026-01-01",
        }
        table = []
        for who, key in people.items():
            with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as c:
                r = c.get("/login")
                import re

                csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text)
                assert csrf is not None
                r = c.post("/login", data={"credential": key, "csrf": csrf.group(1)})
                assert r.status_code == 303, r.text
                first = c.get("/search")
                nxt = re.search(r'rel="next" href="([^"]+)"', first.text)
                for name, path in pages.items():
                    if path is None:
                        if not nxt:
                            continue
                        path = nxt.group(1).replace("&amp;", "&").split("/console", 1)[1]
                    times = []
                    status = 0
                    for _ in range(args.loads):
                        t = time.perf_counter()
                        resp = c.get(path)
                        times.append((time.perf_counter() - t) * 1000)
                        status = resp.status_code
                    row = {
                        "role": who,
                        "page": name,
                        "status": status,
                        "p50_ms": round(statistics.median(times), 1),
                        "p95_ms": round(pct(times, 95), 1),
                        "max_ms": round(max(times), 1),
                    }
                    table.append(row)
                    print(
                        f"{who:8s} {name:28s} {status} p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms",
                        flush=True,
                    )
        results["pages"] = table
        results["loadavg"] = os.getloadavg()
        if args.json:
            Path(args.json).write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for table_name in ("records", "cursors", "viewers", "db_tenants"):
                conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table_name}")
            conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_viewer()")
            conn.execute(f"DROP FUNCTION IF EXISTS {prefix}_act_as(TEXT, TEXT, TEXT)")
            conn.execute(f"DROP ROLE IF EXISTS {role}")


if __name__ == "__main__":
    sys.exit(main())
