"""The real client address behind trusted reverse proxies.

Exactly one forwarding header is believed, the one the trusted proxies maintain (``[edge]
client_ip_header``: ``X-Forwarded-For`` by default, or ``Forwarded``, RFC 7239). Proxies that
maintain one header pass the other through from the client unchanged, so reading both would
let a client pick its own address. The header is walked right to left while the hop that added
the entry is a trusted proxy: the first address that is not trusted is the client. An entry
that is not an address (``unknown``, an obfuscated ``_id``, garbage) stops the walk: nothing to
its left can be attributed. A header that reaches us from an untrusted peer is ignored entirely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from vllm_audit.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIPResolver:
    def __init__(self, trusted_proxies: Iterable[str], header: str = "x-forwarded-for") -> None:
        if header not in ("x-forwarded-for", "forwarded"):
            raise ConfigError(f"[edge] client_ip_header: {header!r} is not 'x-forwarded-for' or 'forwarded'.")
        self.header = header.encode("ascii")
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
        values: list[bytes] = []
        other = False
        for name, value in headers:
            if name == self.header:
                values.append(value)
            elif name == b"x-forwarded-for" or name == b"forwarded":
                other = True
        if not values:
            return peer_ip, other and not self.is_trusted(peer_ip)
        if not self.is_trusted(peer_ip):
            return peer_ip, True
        hops = _forwarded_hops(values) if self.header == b"forwarded" else _xff_hops(values)
        client = peer_ip
        for hop in reversed(hops):
            if not hop:
                break  # not an address: the chain cannot be followed past it
            client = hop
            if not self.is_trusted(hop):
                break
        return client, False


def _xff_hops(values: list[bytes]) -> list[str]:
    hops: list[str] = []
    for value in values:
        for part in value.decode("latin-1").split(","):
            hops.append(_clean(part.strip()))
    return hops


def _forwarded_hops(values: list[bytes]) -> list[str]:
    hops: list[str] = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                key, _, val = pair.strip().partition("=")
                if key.strip().lower() == "for":
                    hops.append(_clean(val.strip().strip('"')))
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
