"""A second (and third) prune: adjacent ranges, and prune events that are pruned themselves.

Each ``retention.pruned`` event carries forward every range the chain's earlier prune events record
(``earlier_ranges``), so once a later prune removes the segment that held an earlier event, the
newest event still records that range and ``vllm-audit verify`` accepts it. What is carried comes
from the signed events, never from ``pruned.jsonl``: a range added to that file by hand stays
flagged, through any number of later prunes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.integrity._prunelog import PrunableLog, prunable_log
from vllm_audit.archive.holds import chain_holds, chain_state_path
from vllm_audit.integrity.reader import PrunedRange, read_manifest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_audit.cli", *args], capture_output=True, text=True, timeout=120)


def _verify(log: PrunableLog) -> tuple[int, dict[str, Any], str]:
    args = ("verify", str(log.log_dir), "--public-key", str(log.tmp / "k.pub"))
    text = _cli(*args)
    j = _cli(*args, "--json")
    return text.returncode, orjson.loads(j.stdout), text.stdout


def _spans(ranges: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(int(r["start"]), int(r["end"])) for r in ranges]


def _pruned_twice(tmp_path: Path) -> tuple[PrunableLog, dict[str, Any], dict[str, Any]]:
    """Prune everything sealed; write until the segment holding that prune's event is sealed; prune
    again (that segment included)."""
    log = prunable_log(tmp_path)
    first = log.prune()
    (held_in,) = log.event_locations(first["prune_id"])
    log.write(3)
    assert held_in in {p.name for _f, p in log.segments()[:-1]}  # sealed now, so it can go
    second = log.prune()
    assert log.event_locations(first["prune_id"]) == []  # the first prune's event is gone from the log
    return log, first, second


def test_a_prune_that_removes_the_previous_prune_event_still_verifies(tmp_path: Path) -> None:
    log, first, second = _pruned_twice(tmp_path)
    a, b = log.pruned()
    assert a.end == b.start and log.segments()[0][0] == b.end  # adjacent, no local segment between
    assert _spans(second["ranges"]) == [(b.start, b.end)]
    assert _spans(second["earlier_ranges"]) == [(a.start, a.end)]  # carried forward from the first event
    carried = second["earlier_ranges"][0]
    assert (carried["last_leaf"], tuple(carried["compact_range"]), carried["prune_id"]) == (
        a.last_leaf,
        a.compact_range,
        first["prune_id"],
    )
    rc, j, text = _verify(log)
    assert rc == 0, text
    assert j["intact"] and _spans(j["pruned"]) == [(a.start, a.end), (b.start, b.end)]
    assert j["summary"]["pruned_entries"] == b.end
    assert f"pruned: entries {a.start}..{a.end - 1}" in text and f"pruned: entries {b.start}..{b.end - 1}" in text

    log.write(3)
    third = log.prune({log.segments()[0][0]})  # once more: the newest event lists all three
    assert _spans(third["earlier_ranges"]) == [(a.start, a.end), (b.start, b.end)]
    rc, j, text = _verify(log)
    assert rc == 0, text
    assert len(j["pruned"]) == 3


def _forge_removal(log: PrunableLog, first_seq: int) -> PrunedRange:
    """Delete a sealed segment without ``vllm-audit prune`` and cover the deletion with a
    ``pruned.jsonl`` line built from its own manifest (true compact range and last leaf: nothing
    in the chain contradicts it)."""
    path = dict(log.segments())[first_seq]
    m = read_manifest(path)
    assert m is not None
    forged = PrunedRange(
        first_seq, int(m["tree_size"]), m["last_leaf"], tuple(m["compact_range"]), (path.name,), "prune-forged"
    )
    with open(log.writer_dir / "pruned.jsonl", "ab") as f:
        f.write(orjson.dumps(forged.to_json()) + b"\n")
    path.with_name(path.name.replace(".jsonl", ".manifest.json")).unlink()
    path.unlink()
    return forged


def test_a_pruned_range_that_no_event_records_is_flagged_and_never_carried_forward(tmp_path: Path) -> None:
    log, _first, _second = _pruned_twice(tmp_path)
    log.write(3)  # more sealed segments after the two ranges
    kept = log.segments()
    forged = _forge_removal(log, kept[1][0])  # the second local one: a local segment stays before it
    rc, j, text = _verify(log)
    assert rc == 1 and not j["intact"], text
    (p,) = j["problems"]
    assert p["kind"] == "segment_missing" and p["seq"] == forged.start
    want = f"entries {forged.start}..{forged.end - 1} are marked pruned, but no signed retention.pruned event"
    assert want in p["message"]

    third = log.prune({kept[0][0]})  # a real prune of the segment before the forged range
    assert (forged.start, forged.end) not in _spans(third["ranges"]) + _spans(third["earlier_ranges"])
    rc, j, text = _verify(log)
    assert rc == 1 and [(q["kind"], q["seq"]) for q in j["problems"]] == [("segment_missing", forged.start)], text
    assert len(j["pruned"]) == 4  # three real ranges and the forged one, reported as pruned and flagged


def test_the_hold_scan_reads_over_adjacent_ranges_and_rescans_an_old_state(tmp_path: Path) -> None:
    """The chain scan behind prune (holds and recorded ranges) starts at seq 0 on a rescan, inside
    the adjacent ranges; a state file written before ranges were kept is rescanned, not trusted."""
    log, _first, _second = _pruned_twice(tmp_path)
    a, b = log.pruned()
    state = chain_state_path(log.config)
    state.unlink()
    got = chain_holds(log.config)  # a full rescan: Cursor(writer, 0) lies inside [a.start, a.end)
    assert [(r.start, r.end) for _w, r in got.pruned_ranges()] == [(a.start, a.end), (b.start, b.end)]
    dry = _cli("prune", "--config", str(log.toml), "--dry-run")
    assert dry.returncode == 0, dry.stderr

    old = orjson.loads(state.read_bytes())
    del old["pruned"]  # the format before this change: the cursors are past both prune events
    state.write_bytes(orjson.dumps(old))
    log.write(3)
    third = log.prune({log.segments()[0][0]})
    assert _spans(third["earlier_ranges"]) == [(a.start, a.end), (b.start, b.end)]
