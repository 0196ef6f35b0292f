"""Request ids."""

from __future__ import annotations

import re
import time

from vllm_audit.ids import accept_request_id, uuid7

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_uuid7_has_version_and_variant_bits() -> None:
    """Minted ids are RFC 9562 UUIDv7 strings."""
    assert UUID7.match(uuid7())


def test_uuid7_sorts_by_time() -> None:
    """Ids minted later sort after earlier ones (millisecond prefix)."""
    a = uuid7()
    ms = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == ms:  # the next millisecond
        pass
    b = uuid7()
    assert a < b


def test_safe_inbound_id_is_kept() -> None:
    """A short id of safe characters is honoured as is."""
    assert ("abc-123_x.y:z", None) == accept_request_id(b"abc-123_x.y:z", 128)


def test_missing_id_is_minted_without_a_note() -> None:
    """No header means a fresh id and no complaint."""
    rid, note = accept_request_id(None, 128)
    assert UUID7.match(rid) and note is None


def test_too_long_id_is_replaced_with_a_reason() -> None:
    """An id over the cap is replaced and the reason names the cap."""
    rid, note = accept_request_id(b"a" * 200, 128)
    assert UUID7.match(rid) and note is not None and "128" in note


def test_unsafe_characters_are_replaced() -> None:
    """Spaces, quotes, control bytes or non-ASCII make the id unacceptable."""
    for raw in (b"a b", b'a"b', b"a\nb", "é".encode()):
        rid, note = accept_request_id(raw, 128)
        assert UUID7.match(rid) and note
