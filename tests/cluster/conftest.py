"""Fixtures shared by the cluster tests: the collector tests' PostgreSQL prefix, a network
namespace with two veth links (made and removed by the test itself, root needed), and a TCP
forwarder (to reach a host-only service, PostgreSQL on 127.0.0.1, across one of those links)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.collect.conftest import pg_prefix, pg_rows
from tests.conftest import need_service

__all__ = ["IP", "Netns", "TcpForward", "netns", "pg_prefix", "stop_collector", "stored", "stream_pending"]

IP = shutil.which("ip") or "/usr/sbin/ip"


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


@dataclass
class Netns:
    """A namespace ``name`` with a client link (host ``client_host`` ↔ ns ``client_ns``) and a
    backbone link (host ``bb_host`` ↔ ns ``bb_ns``).

    Taking a link down on the host side black-holes its packets (nothing is refused: the peer's
    TCP retransmits into the void until its own timeouts fire)."""

    name: str
    client_if: str
    bb_if: str
    client_host: str
    client_ns: str
    bb_host: str
    bb_ns: str

    def partition(self) -> None:
        ip("link", "set", self.bb_if, "down")

    def heal(self) -> None:
        ip("link", "set", self.bb_if, "up")

    def cut_client(self) -> None:
        ip("link", "set", self.client_if, "down")

    def heal_client(self) -> None:
        ip("link", "set", self.client_if, "up")

    @property
    def wrap(self) -> tuple[str, ...]:
        return (IP, "netns", "exec", self.name)


@pytest.fixture
def netns() -> Iterator[Netns]:
    need_service(os.geteuid() == 0 and os.access(IP, os.X_OK), "root and iproute2 (network namespaces)")
    tag = secrets.token_hex(3)
    a, b = 200 + secrets.randbelow(50), secrets.randbelow(60) * 4
    ns = Netns(f"vat{tag}", f"vc{tag}h", f"vb{tag}h", f"10.{a}.{b}.1", f"10.{a}.{b}.2", f"10.{a}.{b + 1}.1", "")
    ns.bb_ns = f"10.{a}.{b + 1}.2"
    made: list[str] = []
    try:
        ip("netns", "add", ns.name)
        made.append("ns")
        for host_if, ns_if, host_ip, ns_ip in (
            (ns.client_if, f"vc{tag}n", ns.client_host, ns.client_ns),
            (ns.bb_if, f"vb{tag}n", ns.bb_host, ns.bb_ns),
        ):
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            made.append(host_if)
            ip("link", "set", ns_if, "netns", ns.name)
            ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("netns", "exec", ns.name, IP, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            ip("netns", "exec", ns.name, IP, "link", "set", ns_if, "up")
        ip("netns", "exec", ns.name, IP, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        _teardown(ns, made)
        err = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        need_service(False, f"network namespaces with veth pairs ({err.strip()})")
    try:
        yield ns
    finally:
        _teardown(ns, made)


def _teardown(ns: Netns, made: list[str]) -> None:
    for what in reversed(made):
        args = ("netns", "del", ns.name) if what == "ns" else ("link", "del", what)
        subprocess.run([IP, *args], capture_output=True, timeout=10)


class TcpForward:
    """Accepts on ``listen_host`` (a free port) and relays each connection to ``target``."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._ls = socket.create_server((listen_host, 0))
        self.port = int(self._ls.getsockname()[1])
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                if self._closed:
                    c.close()
                    u.close()
                    return
                self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        self._ls.close()
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def stored(prefix: str) -> dict[str, int]:
    """request id → rows in the central store ({} until the collector has created its tables)."""
    import psycopg

    try:
        rows = pg_rows(prefix, "SELECT request_id, count(*) FROM {p}_records GROUP BY request_id")
    except psycopg.errors.UndefinedTable:
        return {}
    return {str(r): int(n) for r, n in rows}


def stream_pending(url: str, stream: str) -> int:
    """Messages of ``stream`` the collector's consumer has not had acknowledged yet (-1: no consumer)."""
    import nats

    async def go() -> int:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().consumer_info(stream, "collect")
            return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        except Exception:
            return -1
        finally:
            await nc.close()

    return asyncio.run(go())


def stop_collector(collector: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a collector process still running, SIGKILL it after 20 s."""
    if collector is not None and collector.poll() is None:
        collector.terminate()
        try:
            collector.wait(20)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait()
