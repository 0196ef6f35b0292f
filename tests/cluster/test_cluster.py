"""The scale-out cluster on this machine: 3 replicas (2 gateway-mode `vllm-audit serve`, 1 in
middleware mode: uvicorn serving an app wrapped in ``AuditMiddleware``, configured from the
environment), each with its own log directory and a ``nats`` sink; a 3-node NATS JetStream cluster
(R3 stream); nginx balancing the replicas; `vllm-audit collect` into PostgreSQL with an archive copy.
Every replica reads one shared API key file (two tenants, two users each) and keeps its quota
counters in Redis (a key prefix unique to the test).

Load goes through nginx with a unique ``x-request-id`` and a tenant's API key per call. Under load
the test kills the JetStream stream leader (SIGKILL), then kills one replica (SIGKILL, disk kept)
and restarts it on the same log directory. Then one user makes QUOTA_N + 15 calls on the quota's
route through nginx: exactly QUOTA_N pass, served by all three replicas. At the end every answered
call (HTTP 200) must be in the central store exactly once, every replica must have records there,
no alert may be raised, each tenant's auditor (the query store's RLS, as the reader role) must see
all of its tenant's answered calls, from every replica, and none of the other tenant's, and
`vllm-audit verify` over the archive must exit 0. The counts are printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.collect.conftest import NATS_BINARY, PG_DSN, NatsServer, collect_toml, pg_rows, wait_until
from tests.conftest import need_service
from tests.helpers import ROOT, free_port, wait_http
from vllm_audit.access.apikeys import KeyStore
from vllm_audit.access.config import StoreConfig
from vllm_audit.access.store import PostgresStore, RecordQuery, Viewer
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS_URL = os.environ.get("VLLM_AUDIT_TEST_REDIS", "redis://127.0.0.1:6379/0")
TENANTS = {"bank-a": ("alice", "bob"), "bank-b": ("carol", "dave")}
STREAM = "VAC_CLUSTER"
SUBJ = "vaccl"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello cluster"}], "max_tokens": 4}


QUOTA_N = 25  # per-user requests/min on QUOTA_ROUTE, shared through Redis
QUOTA_ROUTE = "/v1/completions"


def gateway_toml(key: Path, servers: list[str], keys_file: Path, redis_url: str, redis_prefix: str) -> str:
    """One configuration for every replica: the backbone sink, the shared API key file and the
    Redis quota (only on QUOTA_ROUTE, so the main load is not limited)."""
    srv = ", ".join(f'"{s}"' for s in servers)
    return (
        f'[integrity]\nsigning_key = "{key}"\nembed_checkpoints = true\ncheckpoint_every_seconds = 0.5\n'
        "heartbeat_seconds = 0.5\ncheckpoint_every_records = 200\nsegment_max_bytes = 262144\n"
        f'[access]\nauth = "api_key"\n[access.api_keys]\nfile = "{keys_file}"\n'
        f'[access.quota]\nredis_url = "{redis_url}"\nredis_prefix = "{redis_prefix}"\nroutes = ["{QUOTA_ROUTE}"]\n'
        f"[access.quota.per_user]\nrequests_per_min = {QUOTA_N}\n"
        f'[sinks.backbone]\ntype = "nats"\nservers = [{srv}]\nstream = "{STREAM}"\nsubject_prefix = "{SUBJ}"\n'
        "replicas = 3\nack_timeout_s = 5\n"
    )


class Replica:
    """One `vllm-audit serve` process; ``wrap`` prefixes the command (``ip netns exec NS``)."""

    def __init__(
        self,
        root: Path,
        n: int,
        config: Path,
        *,
        host: str = "127.0.0.1",
        wrap: tuple[str, ...] = (),
        middleware: bool = False,
    ) -> None:
        self.root, self.n, self.config = root, n, config
        self.host, self.wrap, self.middleware = host, wrap, middleware
        self.port = free_port()
        self.log_dir = root / f"replica{n}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = None
        if self.middleware:
            # Middleware mode: the audited app's own server (uvicorn), configured from the environment.
            cmd = [
                *self.wrap,
                sys.executable,
                "-m",
                "uvicorn",
                "tests.cluster.mwapp:create_app",
                "--factory",
                "--host",
                self.host,
                "--port",
                str(self.port),
            ]
            env = {
                **os.environ,
                "VLLM_AUDIT_CONFIG": str(self.config),
                "VLLM_AUDIT_OVERRIDES": orjson.dumps({"log": {"dir": str(self.log_dir)}}).decode(),
            }
            self._spawn(cmd, env)
            return
        cmd = [
            *self.wrap,
            sys.executable,
            "-m",
            "vllm_audit.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-dir",
            str(self.log_dir),
            "--config",
            str(self.config),
        ]
        self._spawn(cmd, env)

    def _spawn(self, cmd: list[str], env: dict[str, str] | None) -> None:
        logf = open(self.root / f"replica{self.n}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        logf.close()
        wait_http(f"{self.base}/healthz", 30, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nginx_conf(root: Path, port: int, upstreams: list[int]) -> Path:
    ups = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in upstreams)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/nginx-body;
  proxy_temp_path {root}/nginx-proxy;
  fastcgi_temp_path {root}/nginx-fastcgi;
  uwsgi_temp_path {root}/nginx-uwsgi;
  scgi_temp_path {root}/nginx-scgi;
  upstream replicas {{
{ups}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""
    )
    return conf


async def _load(
    base: str, rids: list[str], out: dict[str, int], key: Callable[[str], str] | None, path: str, body: Any
) -> None:
    import aiohttp

    sem = asyncio.Semaphore(12)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def one(rid: str) -> None:
            async with sem:
                try:
                    headers = {"x-request-id": rid}
                    if key is not None:
                        headers["authorization"] = f"Bearer {key(rid)}"
                    async with s.post(base + path, json=body, headers=headers) as r:
                        await r.read()
                        out[rid] = r.status
                except Exception:
                    out[rid] = 0

        await asyncio.gather(*(one(r) for r in rids))


def load(
    base: str,
    rids: list[str],
    out: dict[str, int],
    key: Callable[[str], str] | None = None,
    path: str = "/v1/chat/completions",
    body: Any = CHAT,
) -> None:
    """POST one call per request id (``key(rid)``: the caller's API key), statuses into ``out``."""
    asyncio.run(_load(base, rids, out, key, path, body))


def stream_leader(url: str) -> str:
    import nats

    async def go() -> str:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return str(info.cluster.leader if info.cluster else "")
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def cluster_root(tmp_path: Path) -> Path:
    need_service(os.access(NATS_BINARY, os.X_OK), f"nats-server binary ({NATS_BINARY})")
    need_service(os.access(NGINX, os.X_OK), f"nginx ({NGINX}; scripts/services.d/nginx.sh installs it)")
    need_service(_redis_ok(), f"Redis at {REDIS_URL}")
    return tmp_path


def _redis_ok() -> bool:
    try:
        r = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        r.ping()
        r.close()
        return True
    except Exception:
        return False


def tenant_view(prefix: str, org: str) -> list[dict[str, Any]]:
    """Every record an ``org_auditor`` of ``org`` sees through the query store (RLS as the reader role)."""
    store = PostgresStore(
        StoreConfig(kind="postgresql", dsn=PG_DSN, table_prefix=prefix, reader_role=f"{prefix}_reader")
    )
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page, cursor = store.query(Viewer("org_auditor", org, ""), RecordQuery(limit=500, cursor=cursor))
        out += page
        if cursor is None:
            return out


def test_cluster_every_answered_call_is_stored_once_and_verifies(cluster_root: Path, pg_prefix: str) -> None:
    """3 replicas (2 gateway, 1 middleware mode) behind nginx, a 3-node JetStream cluster, the
    collector: load from two tenants with the stream leader killed and a replica killed and
    restarted, then one user's Redis-held quota across the replicas (exactly N pass); every
    answered call stored exactly once, records of every replica, no alerts, each tenant's auditor
    sees its own records from every replica and none of the other's, `verify` of the archive exits 0."""
    root = cluster_root
    write_keypair(root / "k", "test/cluster")
    # One API key file shared by every replica: two users in each of two tenants, and a quota user.
    keystore = KeyStore(root / "keys.json")
    callers = [(org, user, keystore.add(user, org)[0]) for org, users in TENANTS.items() for user in users]
    quota_key = keystore.add("quinn", "bank-a")[0]
    tenant_of: dict[str, str] = {}

    def key_for(rid: str) -> str:
        org, _, key = callers[int(rid[-5:]) % len(callers)]
        tenant_of[rid] = org
        return key

    redis_prefix = f"vac_cluster_{os.getpid()}_{free_port()}:quota"
    cports = [free_port() for _ in range(3)]
    nats_nodes = [NatsServer(root, f"n{i}", cports, cports[i]) for i in range(3)]
    replicas: list[Replica] = []
    nginx: subprocess.Popen[bytes] | None = None
    collector: subprocess.Popen[bytes] | None = None
    try:
        for node in nats_nodes:
            node.start()
        urls = [n.url for n in nats_nodes]
        gw_cfg = root / "gateway.toml"
        gw_cfg.write_text(gateway_toml(root / "k.key", urls, root / "keys.json", REDIS_URL, redis_prefix))
        # Two gateway replicas and one in middleware mode (the audited app's own server).
        replicas = [Replica(root, i, gw_cfg, middleware=i == 2) for i in range(3)]
        for r in replicas:
            r.start()
        port = free_port()
        nginx = subprocess.Popen(
            [NGINX, "-c", str(nginx_conf(root, port, [r.port for r in replicas])), "-p", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", 20, nginx)
        ccfg = root / "collect.toml"
        ccfg.write_text(
            collect_toml(
                pg_prefix,
                urls,
                stream=STREAM,
                subject_prefix=SUBJ,
                keys=[root / "k.pub"],
                log_dir=root / "collector-log",
                archive=root / "archive",
            )
        )
        clog = open(root / "collector.log", "ab")
        collector = subprocess.Popen(
            [sys.executable, "-m", "vllm_audit.cli", "collect", "--config", str(ccfg)],
            stdout=clog,
            stderr=subprocess.STDOUT,
        )
        clog.close()
        statuses: dict[str, int] = {}
        # Phase 1: load; the JetStream stream leader is killed in the middle of it.
        rids = [f"cl-a-{i:05d}" for i in range(600)]
        t = threading.Thread(target=load, args=(base, rids, statuses, key_for))
        t.start()
        wait_until(lambda: len(statuses) >= 200, "a third of phase 1 answered", 120)
        leader = wait_until(lambda: stream_leader(urls[0]), "the stream exists and has a leader", 30)
        [node] = [n for n in nats_nodes if n.name == leader]
        node.kill()
        t.join()
        node.start()  # it rejoins and catches up from the others
        # Phase 2: load; replica 1 is killed (SIGKILL, disk kept) in the middle, then restarted.
        rids2 = [f"cl-b-{i:05d}" for i in range(600)]
        t = threading.Thread(target=load, args=(base, rids2, statuses, key_for))
        t.start()
        wait_until(lambda: len(statuses) >= 800, "a third of phase 2 answered", 120)
        replicas[1].kill()
        t.join()
        replicas[1].start()
        # nginx takes the restarted replica back (it was marked failed): warm-up calls until one lands there.
        warm = iter(range(10_000))

        def back_in_rotation() -> bool:
            load(base, [f"cl-w-{next(warm):05d}" for _ in range(6)], statuses, key_for)
            reader = LogReader(replicas[1].log_dir, limit="all")
            return any(b'"request_id":"cl-w-' in e.line for w in reader.writer_ids() for e in reader.entries(w))

        wait_until(back_in_rotation, "nginx sends calls to the restarted replica", 30, 0.2)
        # Phase 3: one user's quota of QUOTA_N calls/min, held in Redis, across the 3 replicas.
        quota: dict[str, int] = {}
        qbody = {"model": "demo-model", "prompt": "hello quota", "max_tokens": 2}
        load(base, [f"cl-q-{i:05d}" for i in range(QUOTA_N + 15)], quota, lambda _: quota_key, QUOTA_ROUTE, qbody)
        passed = sorted(r for r, st in quota.items() if st == 200)
        print(f"quota: {len(quota)} calls by one user via nginx, {len(passed)} passed (limit {QUOTA_N}/min)")
        assert len(passed) == QUOTA_N and {st for st in quota.values()} == {200, 429}
        answered = {rid for rid, st in statuses.items() if st == 200} | set(passed)

        def stored() -> dict[str, int]:
            rows = pg_rows(pg_prefix, "SELECT request_id, count(*) FROM {p}_records GROUP BY request_id")
            return {str(r): int(n) for r, n in rows}

        wait_until(lambda: answered <= set(stored()), "every answered call in the central store", 180, 0.5)
        got = stored()
        missing = answered - set(got)
        duplicated = {r for r, n in got.items() if n > 1}
        print(
            f"cluster: answered {len(answered)} of {len(statuses) + len(quota)}, stored {len(got)}, "
            f"missing {len(missing)}, duplicated {len(duplicated)}; stream leader {leader} killed, "
            "replica 1 killed and restarted"
        )
        assert len(answered) > 900
        assert not missing and not duplicated
        writers = pg_rows(pg_prefix, "SELECT DISTINCT writer_id FROM {p}_records")
        assert len(writers) >= 3  # every replica's records (the restarted one continues its chain)
        assert [] == pg_rows(pg_prefix, "SELECT kind, writer_id, message FROM {p}_collect_alerts")
        # The quota's calls were served by every replica (the counter is shared, not per process).
        qwriters = pg_rows(pg_prefix, "SELECT DISTINCT writer_id FROM {p}_records WHERE request_id LIKE 'cl-q-%%'")
        assert len(qwriters) >= 3, qwriters
        # Per-tenant queries on the central store: each tenant's auditor sees every replica's records
        # of that tenant, and none of the other's.
        for org in TENANTS:
            seen = tenant_view(pg_prefix, org)
            mine = {r for r in answered if tenant_of.get(r, "bank-a") == org}
            seen_ids = {str(r["request_id"]) for r in seen}
            writers_seen = {str(r["writer_id"]) for r in seen}
            print(f"tenant {org}: answered {len(mine)}, seen {len(seen)} records from {len(writers_seen)} writers")
            assert mine <= seen_ids
            assert {str(r["org_id"]) for r in seen} == {org}
            assert not {r for r in seen_ids if tenant_of.get(r, "bank-a") != org}
            assert len(writers_seen) >= 3
        # The archive (the central copy) verifies: the collector stops first so no line is mid-write.
        # (Entries a replica writes while shutting down are shipped when it next starts.)
        collector.terminate()
        collector.wait(30)
        v = subprocess.run(
            [
                sys.executable,
                "-m",
                "vllm_audit.cli",
                "verify",
                str(root / "archive"),
                "--public-key",
                str(root / "k.pub"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert v.returncode == 0, v.stdout + v.stderr
    finally:
        for r in replicas:
            r.stop()
        for p in (collector, nginx):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for n in nats_nodes:
            n.stop()
        rc = redis.Redis.from_url(REDIS_URL)
        for k in rc.scan_iter(match=f"{redis_prefix}*"):
            rc.delete(k)
        rc.close()


_ = Any
