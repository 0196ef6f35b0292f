"""The real client address behind trusted reverse proxies.

``X-Forwarded-For`` and ``Forwarded`` (RFC 7239) are read right to left and only while the hop
that added the entry is a trusted proxy: the first address that is not trusted is the client.
A header that reaches us from an untrusted peer is ignored entirely (it could say anything).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from vllm_audit.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIPResolver:
    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        nets: list[IPNetwork] = []
        for cidr in trusted_proxies:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ConfigError(f"[edge] trusted_proxies: {cidr!r} is not an IP address or CIDR.") from None
        self.trusted = tuple(nets)

    def is_trusted(self, addr: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)

    def resolve(self, peer: str | None, headers: list[tuple[bytes, bytes]]) -> tuple[str, bool]:
        """Return ``(client_ip, forwarded_ignored)`` for one request.

        ``forwarded_ignored`` is true when forwarding headers arrived from an untrusted peer
        (a spoofing attempt or a misconfigured proxy list) and were not believed.
        """
        peer_ip = peer or "unknown"
        xff: list[bytes] = []
        fwd: list[bytes] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                xff.append(value)
            elif name == b"forwarded":
                fwd.append(value)
        if not xff and not fwd:
            return peer_ip, False
        if not self.is_trusted(peer_ip):
            return peer_ip, True
        hops = _forwarded_hops(fwd) if fwd else _xff_hops(xff)
        client = peer_ip
        for hop in reversed(hops):
            client = hop
            if not self.is_trusted(hop):
                break
        return client, False


def _xff_hops(values: list[bytes]) -> list[str]:
    hops: list[str] = []
    for value in values:
        for part in value.decode("latin-1").split(","):
            addr = _clean(part.strip())
            if addr:
                hops.append(addr)
    return hops


def _forwarded_hops(values: list[bytes]) -> list[str]:
    hops: list[str] = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                key, _, val = pair.strip().partition("=")
                if key.strip().lower() == "for":
                    addr = _clean(val.strip().strip('"'))
                    if addr:
                        hops.append(addr)
    return hops


def _clean(addr: str) -> str:
    """Strip ports and IPv6 brackets; return "" for obfuscated ids like ``_hidden`` or ``unknown``."""
    if addr.startswith("["):
        end = addr.find("]")
        addr = addr[1:end] if end > 0 else addr[1:]
    elif addr.count(":") == 1:
        addr = addr.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return ""
