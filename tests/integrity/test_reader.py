"""The one log reader: link-checked entries from a cursor, across segments, writers and live tails."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.codec import ZERO_HASH, leaf_hash
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader

from ._logtools import record, segments, write_lines


def _chain(log: Path, key: Path, *, segment_max_bytes: int = 8192, checkpoint_every_records: int = 1000) -> Chain:
    cfg = IntegrityConfig(
        signing_key=str(key), segment_max_bytes=segment_max_bytes, checkpoint_every_records=checkpoint_every_records
    )
    return Chain(log, cfg)


def _append(chain: Chain, start: int, n: int, *, sign: bool = True) -> None:
    for i in range(start, start + n, 10):
        chain.append(chain.pending_events() + [record(j) for j in range(i, min(i + 10, start + n))])
        chain.sync()
        chain.after_commit()
    if sign:
        chain.checkpoint()


@pytest.fixture()
def key(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "k", "test/reader")
    return tmp_path / "k.key"


def _drain(reader: LogReader, cur: Cursor, batch: int = 7) -> tuple[list[int], Cursor]:
    seqs: list[int] = []
    while got := reader.read(cur, batch):
        seqs += [e.seq for e in got]
        cur = cur.after(got[-1])
    return seqs, cur


def test_reads_every_entry_in_order_across_segments(tmp_path: Path, key: Path) -> None:
    chain = _chain(tmp_path / "log", key)
    _append(chain, 0, 120)
    reader = LogReader(tmp_path / "log")
    (wid,) = reader.writer_ids()
    assert len(reader.segments(wid)) > 3
    seqs, cur = _drain(reader, Cursor(wid))
    assert seqs == list(range(chain.next_seq))
    assert cur.last_leaf == chain.last_hash
    chain.close()


def test_only_signed_entries_by_default_and_the_live_tail_follows(tmp_path: Path, key: Path) -> None:
    chain = _chain(tmp_path / "log", key, checkpoint_every_records=10_000)
    _append(chain, 0, 10)
    signed = chain.next_seq
    _append(chain, 10, 5, sign=False)  # durable but not yet signed
    reader = LogReader(tmp_path / "log")
    (wid,) = reader.writer_ids()
    seqs, cur = _drain(reader, Cursor(wid))
    assert seqs == list(range(signed))
    assert _drain(LogReader(tmp_path / "log", limit="all"), Cursor(wid))[0] == list(range(chain.next_seq))
    chain.checkpoint()
    more, _ = _drain(reader, cur)
    assert more == list(range(signed, chain.next_seq))
    chain.close()


def test_a_durable_bound_replaces_checkpoints_for_the_writing_process(tmp_path: Path, key: Path) -> None:
    chain = _chain(tmp_path / "log", key, checkpoint_every_records=10_000)
    _append(chain, 0, 10, sign=False)
    reader = LogReader(tmp_path / "log")
    reader.set_limit(chain.writer_id, lambda: 4)
    assert _drain(reader, Cursor(chain.writer_id))[0] == [0, 1, 2, 3]
    chain.close()


def test_resumes_from_a_cursor_in_the_middle(tmp_path: Path, key: Path) -> None:
    chain = _chain(tmp_path / "log", key)
    _append(chain, 0, 60)
    reader = LogReader(tmp_path / "log")
    wid = chain.writer_id
    all_entries = list(reader.entries(wid))
    mid = all_entries[33]
    seqs, _ = _drain(LogReader(tmp_path / "log"), Cursor(wid, mid.seq + 1, mid.leaf_hex))
    assert seqs == list(range(34, chain.next_seq))
    with pytest.raises(ChainBreak):  # a cursor whose leaf is not the chain's: refused
        LogReader(tmp_path / "log").read(Cursor(wid, mid.seq + 1, "ab" * 32))
    chain.close()


def test_follows_new_writers(tmp_path: Path, key: Path) -> None:
    log = tmp_path / "log"
    a = _chain(log, key)
    _append(a, 0, 3)
    reader = LogReader(log)
    assert reader.writer_ids() == [a.writer_id]
    b = _chain(log, key)  # a second live process: a new writer
    _append(b, 0, 3)
    assert sorted(reader.writer_ids()) == sorted([a.writer_id, b.writer_id])
    assert _drain(reader, Cursor(b.writer_id))[0] == list(range(b.next_seq))
    a.close()
    b.close()


@pytest.mark.parametrize("attack", ["flip", "delete"])
def test_a_break_in_the_chain_stops_the_reader_there(tmp_path: Path, key: Path, attack: str) -> None:
    log = tmp_path / "log"
    chain = _chain(log, key, segment_max_bytes=1 << 20)
    _append(chain, 0, 30)
    chain.close()
    (seg,) = [s for s in segments(log)][:1]
    lines = seg.read_bytes().split(b"\n")[:-1]
    if attack == "flip":
        lines[10] = lines[10].replace(b"demo-model", b"demo-modem")
    else:
        del lines[10]
    write_lines(seg, lines)
    reader = LogReader(log, limit="all")
    wid = reader.writer_ids()[0]
    got: list[int] = []
    with pytest.raises(ChainBreak) as err:
        for e in reader.entries(wid):
            got.append(e.seq)
    assert err.value.seq == (11 if attack == "flip" else 10)
    assert got == list(range(err.value.seq))


def test_torn_tail_is_never_returned(tmp_path: Path, key: Path) -> None:
    log = tmp_path / "log"
    chain = _chain(log, key, segment_max_bytes=1 << 20)
    _append(chain, 0, 5)
    seg = segments(log)[-1]
    with open(seg, "ab") as f:
        f.write(b'{"seq":')  # a write in progress
    entries = list(LogReader(log, limit="all").entries(chain.writer_id))
    assert [e.seq for e in entries] == list(range(chain.next_seq))
    assert entries[0].prev == ZERO_HASH and entries[1].prev == leaf_hash(entries[0].line).hex()
    chain.close()


@pytest.mark.parametrize("limit", [64, 333, 0])
def test_a_read_limit_that_cuts_a_line_neither_loses_nor_tears_entries(
    tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Reads stop at a byte limit (not the rest of the segment); a line cut there is read next, not
    torn, and a read that ends exactly on a line boundary goes on in the same segment (limit 0:
    three whole lines of the first segment)."""
    import vllm_audit.integrity.reader as reader_mod

    chain = _chain(tmp_path / "log", key)
    _append(chain, 0, 120)
    if limit == 0:
        limit = sum(len(line) for line in segments(tmp_path / "log")[0].read_bytes().splitlines(keepends=True)[:3])
    monkeypatch.setattr(reader_mod, "_READ_MIN", limit)
    monkeypatch.setattr(reader_mod, "_READ_MAX", limit)
    reader = LogReader(tmp_path / "log")
    (wid,) = reader.writer_ids()
    assert len(reader.segments(wid)) > 3  # sealed segments: a torn one would be skipped over
    for batch in (1, 7, 1000):
        seqs, cur = _drain(LogReader(tmp_path / "log"), Cursor(wid), batch)
        assert seqs == list(range(chain.next_seq))
        assert cur.last_leaf == chain.last_hash
    # A fresh reader resuming in the middle of a segment skips the entries before its cursor.
    entries = list(LogReader(tmp_path / "log").entries(wid))
    mid = entries[len(entries) // 2]
    seqs, _ = _drain(LogReader(tmp_path / "log"), Cursor(wid).after(mid), 1000)
    assert seqs == list(range(mid.seq + 1, chain.next_seq))
    chain.close()
