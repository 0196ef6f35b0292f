"""The verifier's fast path (``codec.scan_run``) accepts exactly what the careful path accepts.

The reference below is the careful path's rule, entry by entry with ``parse_header`` and
``leaf_hash``: every line is the next entry (seq, ``prev`` link, writer id, lowercase hex tag,
header closed by ``",``). ``scan_run`` must give the same leaves, events and inference count when
the reference accepts, and None whenever it does not: a line it took on trust that the careful
path rejects would be a check skipped.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_audit.integrity import codec

WRITER = 'w-"%d\\\u00e9'  # escaped in JSON, and a % that the header format must not take as one


def _entries(first: int, n: int) -> list[dict[str, Any]]:
    kinds: list[dict[str, Any]] = [
        {"record_type": "inference", "org_id": "acme", "input_prompt": "x" * 40},
        {"record_type": "event", "event": "segment_sealed", "detail": {"record_type": "inference"}},
        {"record_type": "alert", "rule": "r1"},
        {"note": "no record type", "n": 7},
        {"record_type": "inference", "org_id": "o", "input_prompt": '","record_type":"event"'},
    ]
    return [dict(kinds[(first + i) % len(kinds)], i=first + i) for i in range(n)]


def _log(first: int, n: int) -> tuple[bytes, bytes]:
    """``(bytes of entries first..first+n-1, prev of the first)`` as the writer encodes them."""
    prev = codec.ZERO if first == 0 else b"ab" * 32
    data, _leaves = codec.encode_entries(_entries(first, n), WRITER, first, prev)
    return bytes(data), prev


def _careful(good: bytes, first: int, prev: bytes, tail: bytes) -> codec.Run | None:
    if not good.endswith(b"\n"):
        return None
    leaves, hexes, events, n_inf = [], [], [], 0
    for i, line in enumerate(codec.split_lines(good)):
        h = codec.parse_header(line, tail)
        if h is None or h[0] != first + i or h[1] != prev or line[h[2] - 2 : h[2]] != b'",':
            return None
        leaf = codec.leaf_hash(line)
        leaves.append(leaf)
        prev = leaf.hex().encode()
        hexes.append(prev)
        kind = codec.record_type_at(line, h[2])
        n_inf += kind == b"inference"
        if kind == b"event":
            events.append((i, line))
    return codec.Run(leaves, hexes, events, n_inf)


def test_runs_across_digit_boundaries_match_the_careful_path() -> None:
    """Header lengths change at 10, 100, 1000: each run of one length is checked on its own."""
    tail = codec.writer_tail(WRITER)
    for first, n in [(0, 120), (95, 10), (990, 30), (9_999_990, 25)]:
        good, prev = _log(first, n)
        fast = codec.scan_run(good, first, prev, tail)
        assert fast is not None and fast == _careful(good, first, prev, tail)
        assert fast.inference == sum(1 for e in _entries(first, n) if e.get("record_type") == "inference")
        assert len(fast.events) == sum(1 for e in _entries(first, n) if e.get("record_type") == "event")


_EDITS = st.sampled_from(["set", "insert", "delete"])
_BYTES = st.sampled_from(list(b'0189afAFG",{}:\n\x00 %') + [0xC3])


@settings(max_examples=1500, deadline=None)
@given(
    first=st.sampled_from([0, 7, 96, 995]),
    n=st.integers(1, 4),
    edits=st.lists(st.tuples(_EDITS, st.floats(0, 1, exclude_max=True), _BYTES), min_size=1, max_size=3),
)
def test_any_edit_is_taken_only_where_the_careful_path_takes_it(
    first: int, n: int, edits: list[tuple[str, float, int]]
) -> None:
    """Random edits (an edit to any line but the last also breaks the next line's ``prev``, so short
    runs put most edits where only the header checks can catch them)."""
    tail = codec.writer_tail(WRITER)
    good, prev = _log(first, n)
    data = bytearray(good)
    for op, where, value in edits:
        at = int(where * len(data))
        if op == "set":
            data[at] = value
        elif op == "insert":
            data.insert(at, value)
        else:
            del data[at]
    mutated = bytes(data)
    assert codec.scan_run(mutated, first, prev, tail) == _careful(mutated, first, prev, tail)


def test_a_header_only_entry_or_a_wrong_first_prev_leaves_the_fast_path() -> None:
    tail = codec.writer_tail(WRITER)
    good, prev = _log(5, 4)
    assert codec.scan_run(good, 5, prev, tail) is not None
    assert codec.scan_run(good, 5, b"cd" * 32, tail) is None
    assert codec.scan_run(good, 6, prev, tail) is None
    empty, _ = codec.encode_entries([{}], WRITER, 5, prev)  # '{"seq":5,...,"org_tag":"…"}': careful path
    assert codec.scan_run(bytes(empty), 5, prev, tail) is None


def test_entries_given_encoded_with_their_digest_are_the_entries_given_as_mappings() -> None:
    """A prepare process hands the writer ``(body, org_id, body_digest(body))``: the same lines and
    leaves as the mappings themselves; each leaf is the careful path's hash of its stored line; a
    wrong digest gives a leaf that is not (verification's finding), a malformed one an error."""
    import orjson
    import pytest

    entries = [*_entries(3, 6), {}]
    prev = b"ab" * 32
    want, want_leaves = codec.encode_entries(entries, WRITER, 3, prev)
    triples: list[tuple[bytes, str, bytes]] = []
    for e in entries:
        raw, org = orjson.dumps(e), e.get("org_id")
        triples.append((raw, org if isinstance(org, str) else "", codec.body_digest(raw)))
    got, leaves = codec.encode_entries(triples, WRITER, 3, prev)
    assert (bytes(got), leaves) == (bytes(want), want_leaves)
    lines = bytes(got).splitlines()
    assert [codec.leaf_hash(line) for line in lines] == leaves
    bad = [(raw, org, codec.body_digest(raw + b" ")) for raw, org, _d in triples[:1]]
    _data, bad_leaves = codec.encode_entries(bad, WRITER, 3, prev)
    assert bad_leaves[0] != codec.leaf_hash(bytes(_data).rstrip(b"\n"))
    with pytest.raises(codec.EntryError, match="32 bytes"):
        codec.encode_entries([(triples[0][0], "", b"short")], WRITER, 3, prev)
