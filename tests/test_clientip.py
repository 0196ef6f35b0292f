"""Client address resolution through trusted proxies."""

from __future__ import annotations

import pytest

from vllm_audit.clientip import ClientIPResolver
from vllm_audit.errors import ConfigError


def test_no_forwarding_headers_gives_the_peer() -> None:
    """Without headers the TCP peer is the client."""
    assert ("192.0.2.1", False) == ClientIPResolver([]).resolve("192.0.2.1", [])


def test_untrusted_peer_headers_are_ignored_and_flagged() -> None:
    """A forwarding header from an untrusted peer is not believed."""
    r = ClientIPResolver(["10.0.0.0/8"])
    assert ("192.0.2.1", True) == r.resolve("192.0.2.1", [(b"x-forwarded-for", b"1.1.1.1")])


def test_rightmost_untrusted_hop_is_the_client() -> None:
    """Entries added by trusted proxies are skipped from the right; a spoofed left entry is not reached."""
    r = ClientIPResolver(["10.0.0.0/8"])
    got = r.resolve("10.0.0.1", [(b"x-forwarded-for", b"9.9.9.9, 198.51.100.2, 10.0.0.5")])
    assert ("198.51.100.2", False) == got


def test_rfc7239_forwarded_with_ipv6_and_ports() -> None:
    """Forwarded: for="[2001:db8::1]:4711" is parsed, brackets and port removed."""
    r = ClientIPResolver(["127.0.0.1/32"], "forwarded")
    got = r.resolve("127.0.0.1", [(b"forwarded", b'for="[2001:db8::1]:4711";proto=https, for=127.0.0.1')])
    assert ("2001:db8::1", False) == got


def test_obfuscated_forwarded_identifiers_are_skipped() -> None:
    """Obfuscated 'for=_hidden' entries do not become a client address."""
    r = ClientIPResolver(["127.0.0.1/32"], "forwarded")
    assert ("127.0.0.1", False) == r.resolve("127.0.0.1", [(b"forwarded", b"for=_hidden")])


def test_ipv4_mapped_peer_matches_ipv4_cidr() -> None:
    """A ::ffff:10.0.0.1 peer is inside 10.0.0.0/8."""
    assert ClientIPResolver(["10.0.0.0/8"]).is_trusted("::ffff:10.0.0.1")


def test_bad_cidr_is_a_config_error() -> None:
    """A malformed CIDR names itself in the error."""
    with pytest.raises(ConfigError, match="not-a-cidr"):
        ClientIPResolver(["not-a-cidr"])


def test_client_forwarded_header_is_not_believed_behind_an_xff_proxy() -> None:
    """Behind nginx/ALB (X-Forwarded-For), a Forwarded header the client wrote is never read."""
    r = ClientIPResolver(["10.0.0.0/8"])
    headers = [(b"forwarded", b"for=6.6.6.6"), (b"x-forwarded-for", b"198.51.100.2")]
    assert ("198.51.100.2", False) == r.resolve("10.0.0.1", headers)
    # and with only the client's Forwarded, the trusted proxy itself is the best we know
    assert ("10.0.0.1", False) == r.resolve("10.0.0.1", [(b"forwarded", b"for=6.6.6.6")])


def test_configured_forwarded_header_ignores_x_forwarded_for() -> None:
    """With client_ip_header = "forwarded", X-Forwarded-For is the header a client could forge."""
    r = ClientIPResolver(["10.0.0.0/8"], "forwarded")
    headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=198.51.100.3")]
    assert ("198.51.100.3", False) == r.resolve("10.0.0.1", headers)


def test_an_entry_that_is_not_an_address_stops_the_walk() -> None:
    """Nothing left of an unparsable hop is believed (it could be a client's own text)."""
    r = ClientIPResolver(["10.0.0.0/8"])
    got = r.resolve("10.0.0.1", [(b"x-forwarded-for", b"6.6.6.6, not-an-ip, 10.0.0.9")])
    assert ("10.0.0.9", False) == got


def test_unknown_client_ip_header_is_a_config_error() -> None:
    """Only the two forwarding headers can be configured."""
    with pytest.raises(ConfigError, match="client_ip_header"):
        ClientIPResolver([], "x-real-ip")
