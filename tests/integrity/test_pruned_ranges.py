"""Pruned ranges that follow one another with no local segment between them (a second prune).

A prune after the first usually removes the segments right after the previous range: ``[0, a)``
and ``[a, b)``, the first local segment at ``b`` (or, with an older segment kept by a hold,
``[a, b)`` and ``[b, c)`` between two local segments). The reader and the verifier go on over the
run of ranges from the state of the last one; a hole between two ranges stays a break.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader, PrunedRange, pruned_run

from ._prunelog import PrunableLog, prunable_log


def _twice_at_the_start(tmp_path: Path) -> PrunableLog:
    log = prunable_log(tmp_path)
    log.prune({0, 11, 22})
    log.prune({33, 44})  # right after the first range: [0, 33) and [33, 55), the first local segment at 55
    return log


def test_a_cursor_before_inside_or_between_adjacent_ranges_reads_on_from_the_first_kept_segment(
    tmp_path: Path,
) -> None:
    log = _twice_at_the_start(tmp_path)
    first, second = log.pruned()
    assert (first.start, first.end, second.start, second.end) == (0, 33, 33, 55)
    assert log.segments()[0][0] == 55
    wid = log.writer_dir.name
    for seq in (0, 10, 32, 33, 40, 54):
        entries = LogReader(log.log_dir, limit="all").read(Cursor(wid, seq, ""), 5)
        assert [e.seq for e in entries] == [55, 56, 57, 58, 59], seq
        assert entries[0].prev == second.last_leaf  # linked to the last range's leaf
    seqs = [e.seq for e in LogReader(log.log_dir).entries_all(wid)]
    assert seqs == list(range(55, 55 + len(seqs))) and len(seqs) > log.written - 55  # every entry left


def test_reading_across_adjacent_ranges_between_two_local_segments(tmp_path: Path) -> None:
    """The oldest segment stays (as under a legal hold); two prunes remove what follows it."""
    log = prunable_log(tmp_path)
    log.prune({11, 22})
    log.prune({33})  # [11, 33) and [33, 44), between seg 0 and seg 44
    assert [(r.start, r.end) for r in log.pruned()] == [(11, 33), (33, 44)]
    wid = log.writer_dir.name
    reader = LogReader(log.log_dir, limit="all")
    cur = Cursor(wid)
    seqs: list[int] = []
    while got := reader.read(cur, 4):  # small reads: a stop at every position, segment ends included
        seqs += [e.seq for e in got]
        cur = cur.after(got[-1])
    assert seqs[:11] == list(range(11)) and seqs[11] == 44 and seqs == sorted(seqs)
    assert seqs == list(range(11)) + list(range(44, seqs[-1] + 1))
    rep = log.verify()
    assert rep.intact, rep.problems
    assert [(r["start"], r["end"]) for r in rep.pruned] == [(11, 33), (33, 44)]


def test_a_hole_between_two_ranges_is_still_a_break(tmp_path: Path) -> None:
    """Without the first range's line the run does not reach the kept segment: no jump, a break."""
    log = prunable_log(tmp_path)
    log.prune({11, 22})
    log.prune({33})
    pruned = log.writer_dir / "pruned.jsonl"
    pruned.write_bytes(pruned.read_bytes().splitlines(keepends=True)[1])  # only [33, 44) left
    wid = log.writer_dir.name
    with pytest.raises(ChainBreak, match=r"segment seg-000000000044.jsonl starts at 44, expected 11"):
        list(LogReader(log.log_dir, limit="all").entries(wid))
    rep = log.verify()
    assert {p.kind for p in rep.problems} == {"segment_missing"}
    assert any("entries 11..43" in p.message for p in rep.problems), rep.problems


def test_pruned_run() -> None:
    def r(a: int, b: int) -> PrunedRange:
        return PrunedRange(a, b, "00" * 32, ("00" * 32,) * bin(b).count("1"))

    assert pruned_run([r(0, 3), r(3, 5)], 0, 5) == [r(0, 3), r(3, 5)]
    assert pruned_run([r(0, 3), r(3, 5)], 3, 5) == [r(3, 5)]
    assert pruned_run([r(0, 3), r(4, 5)], 0, 5) == []  # a hole at 3
    assert pruned_run([r(0, 3), r(3, 6)], 0, 5) == []  # runs past the segment at 5
    assert pruned_run([r(0, 3), r(0, 3), r(3, 5)], 0, 5) == [r(0, 3), r(3, 5)]  # a line written twice
    assert pruned_run([r(0, 3)], 3, 3) == []
