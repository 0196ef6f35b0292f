"""Request ids: honour a safe inbound ``X-Request-Id``, else mint a time-ordered UUIDv7."""

from __future__ import annotations

import os
import random
import re
import time

# Ids must be unique, not secret: a per-process generator seeded from the OS is ~100x cheaper
# than an os.urandom call per request on these VMs. Re-seeded after fork.
_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))

_SAFE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]+")


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix ms timestamp, then random bits; sorts by time."""
    ms = time.time_ns() // 1_000_000
    rand = _rng.getrandbits(80)
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & 0x3FFF_FFFF_FFFF_FFFF
    value = ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def accept_request_id(raw: bytes | None, max_length: int) -> tuple[str, str | None]:
    """Return ``(request_id, rejected_reason)``.

    An inbound id is honoured when it is at most ``max_length`` bytes of a safe charset
    (letters, digits and ``._:@/+=-``). Otherwise a fresh UUIDv7 is minted and the reason
    is returned so the record can say the inbound id was replaced.
    """
    if raw is None or raw == b"":
        return uuid7(), None
    if len(raw) > max_length:
        return uuid7(), f"inbound request id longer than {max_length} bytes"
    if _SAFE_ID.fullmatch(raw) is None:
        return uuid7(), "inbound request id has characters outside [A-Za-z0-9._:@/+=-]"
    return raw.decode("ascii"), None
