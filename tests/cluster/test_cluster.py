"""The scale-out cluster on this machine: 3 gateway replicas (`vllm-audit serve`, each with its own
log directory and a ``nats`` sink), a 3-node NATS JetStream cluster (R3 stream), nginx balancing
the replicas, and `vllm-audit collect` into PostgreSQL with an archive copy.

Load goes through nginx with a unique ``x-request-id`` per call. Under load the test kills the
JetStream stream leader (SIGKILL), then kills one replica (SIGKILL, disk kept) and restarts it on
the same log directory. At the end every answered call (HTTP 200) must be in the central store
exactly once, every replica must have records there, no alert may be raised, and `vllm-audit
verify` over the archive must exit 0. The counts (answered, stored, missing, duplicated) are
printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.collect.conftest import NATS_BINARY, NatsServer, collect_toml, pg_rows, wait_until
from tests.conftest import need_service
from tests.helpers import free_port, wait_http
from vllm_audit.integrity.keys import write_keypair

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM = "VAC_CLUSTER"
SUBJ = "vaccl"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello cluster"}], "max_tokens": 4}


def gateway_toml(key: Path, servers: list[str]) -> str:
    srv = ", ".join(f'"{s}"' for s in servers)
    return (
        f'[integrity]\nsigning_key = "{key}"\nembed_checkpoints = true\ncheckpoint_every_seconds = 0.5\n'
        "heartbeat_seconds = 0.5\ncheckpoint_every_records = 200\nsegment_max_bytes = 262144\n"
        f'[sinks.backbone]\ntype = "nats"\nservers = [{srv}]\nstream = "{STREAM}"\nsubject_prefix = "{SUBJ}"\n'
        "replicas = 3\nack_timeout_s = 5\n"
    )


class Replica:
    """One `vllm-audit serve` process; ``wrap`` prefixes the command (``ip netns exec NS``)."""

    def __init__(
        self, root: Path, n: int, config: Path, *, host: str = "127.0.0.1", wrap: tuple[str, ...] = ()
    ) -> None:
        self.root, self.n, self.config = root, n, config
        self.host, self.wrap = host, wrap
        self.port = free_port()
        self.log_dir = root / f"replica{n}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
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
        logf = open(self.root / f"replica{self.n}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
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


async def _load(base: str, rids: list[str], out: dict[str, int]) -> None:
    import aiohttp

    sem = asyncio.Semaphore(12)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def one(rid: str) -> None:
            async with sem:
                try:
                    async with s.post(base + "/v1/chat/completions", json=CHAT, headers={"x-request-id": rid}) as r:
                        await r.read()
                        out[rid] = r.status
                except Exception:
                    out[rid] = 0

        await asyncio.gather(*(one(r) for r in rids))


def load(base: str, rids: list[str], out: dict[str, int]) -> None:
    asyncio.run(_load(base, rids, out))


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
    return tmp_path


def test_cluster_every_answered_call_is_stored_once_and_verifies(cluster_root: Path, pg_prefix: str) -> None:
    """3 replicas behind nginx, a 3-node JetStream cluster, the collector: load with the stream
    leader killed and a replica killed and restarted; every answered call stored exactly once,
    records of every replica, no alerts, `verify` of the archive exits 0."""
    root = cluster_root
    write_keypair(root / "k", "test/cluster")
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
        gw_cfg.write_text(gateway_toml(root / "k.key", urls))
        replicas = [Replica(root, i, gw_cfg) for i in range(3)]
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
        t = threading.Thread(target=load, args=(base, rids, statuses))
        t.start()
        wait_until(lambda: len(statuses) >= 200, "a third of phase 1 answered", 120)
        leader = wait_until(lambda: stream_leader(urls[0]), "the stream exists and has a leader", 30)
        [node] = [n for n in nats_nodes if n.name == leader]
        node.kill()
        t.join()
        node.start()  # it rejoins and catches up from the others
        # Phase 2: load; replica 1 is killed (SIGKILL, disk kept) in the middle, then restarted.
        rids2 = [f"cl-b-{i:05d}" for i in range(600)]
        t = threading.Thread(target=load, args=(base, rids2, statuses))
        t.start()
        wait_until(lambda: len(statuses) >= 800, "a third of phase 2 answered", 120)
        replicas[1].kill()
        t.join()
        replicas[1].start()
        answered = {rid for rid, st in statuses.items() if st == 200}

        def stored() -> dict[str, int]:
            rows = pg_rows(pg_prefix, "SELECT request_id, count(*) FROM {p}_records GROUP BY request_id")
            return {str(r): int(n) for r, n in rows}

        wait_until(lambda: answered <= set(stored()), "every answered call in the central store", 180, 0.5)
        got = stored()
        missing = answered - set(got)
        duplicated = {r for r, n in got.items() if n > 1}
        print(
            f"cluster: answered {len(answered)} of {len(statuses)}, stored {len(got)}, missing {len(missing)}, "
            f"duplicated {len(duplicated)}; stream leader {leader} killed, replica 1 killed and restarted"
        )
        assert len(answered) > 900
        assert not missing and not duplicated
        writers = pg_rows(pg_prefix, "SELECT DISTINCT writer_id FROM {p}_records")
        assert len(writers) >= 3  # every replica's records (the restarted one continues its chain)
        assert [] == pg_rows(pg_prefix, "SELECT kind, writer_id, message FROM {p}_collect_alerts")
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


_ = Any
