"""Chain behaviour: keys on first start, resume, rotation and sealing, heartbeats, anchors, config."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from vllm_audit.archive.prune import execute, plan
from vllm_audit.config import Config, config_from_mapping, load_config
from vllm_audit.errors import ConfigError, LogWriteError
from vllm_audit.integrity.chain import Chain, anchor_file, list_segments
from vllm_audit.integrity.checkpoint import open_checkpoint
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.merkle import CompactRange
from vllm_audit.integrity.reader import LogReader, read_pruned
from vllm_audit.integrity.verify import verify_log

from ._logtools import record


class Clock:
    def __init__(self) -> None:
        self.t = 1_780_000_000.0

    def __call__(self) -> float:
        return self.t


def commit(chain: Chain, n: int, start: int = 0) -> None:
    chain.append(chain.pending_events() + [record(i) for i in range(start, start + n)])
    chain.sync()
    chain.after_commit()


def test_generates_key_on_first_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a configured key one is generated (0600) under <log dir>/keys with a warning."""
    with caplog.at_level(logging.WARNING, "vllm_audit.integrity"):
        c = Chain(tmp_path / "log")
    commit(c, 3)
    c.close()
    key = tmp_path / "log" / "keys" / "signing.key"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert "signing_key" in caplog.text
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "log" / "keys" / "signing.pub"]))
    assert rep.intact, rep.problems
    c2 = Chain(tmp_path / "log")  # the same key is reused
    assert c2.key.seed == c.key.seed
    c2.close()


def test_world_readable_key_is_a_write_error(tmp_path: Path) -> None:
    """A configured key readable by others stops the chain from opening (fail closed)."""
    write_keypair(tmp_path / "k", "ops/k")
    os.chmod(tmp_path / "k.key", 0o640)
    with pytest.raises(LogWriteError, match="chmod 600"):
        Chain(tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key")))


def test_resume_continues_the_chain(tmp_path: Path) -> None:
    """A restarted writer adopts the free chain and continues seq, prev and the Merkle tree."""
    write_keypair(tmp_path / "k", "ops/k")
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), segment_max_bytes=20_000)
    c = Chain(tmp_path / "log", cfg)
    commit(c, 50)
    wid, n = c.writer_id, c.next_seq
    c.close()
    c = Chain(tmp_path / "log", cfg)
    assert c.writer_id == wid and c.next_seq >= n + 1  # + writer_stopped (and segment_sealed)
    events = c.pending_events()
    assert [e["event"] for e in events] == ["writer_resumed"]
    commit(c, 50, 50)
    c.close()
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems
    assert rep.records == 100


def test_rotation_by_size_and_time_seals_segments(tmp_path: Path) -> None:
    """Full or old segments become read-only with a manifest, and the seal is an event in the chain."""
    write_keypair(tmp_path / "k", "ops/k")
    clock = Clock()
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), segment_max_bytes=10_000, segment_max_seconds=60)
    c = Chain(tmp_path / "log", cfg, clock=clock)
    commit(c, 20)  # > 10 KB: rotates by size
    commit(c, 1, 20)
    clock.t += 61
    c.heartbeat()  # rotates by age while idle
    c.close()
    segs = list_segments(c.dir)
    assert len(segs) >= 3
    for _, p in segs[:-1]:
        assert os.stat(p).st_mode & 0o777 == 0o444
        m = orjson.loads(p.with_name(p.name.replace(".jsonl", ".manifest.json")).read_bytes())
        assert m["segment"] == p.name and m["count"] > 0
    text = b"".join(p.read_bytes() for _, p in segs)
    assert text.count(b'"event":"segment_sealed"') == len(segs) - 1
    assert verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"])).intact


def test_heartbeat_signs_checkpoint_when_idle(tmp_path: Path) -> None:
    """An idle writer still signs fresh checkpoints on heartbeats (silence is not deletion)."""
    write_keypair(tmp_path / "k", "ops/k")
    clock = Clock()
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), heartbeat_seconds=10)
    c = Chain(tmp_path / "log", cfg, clock=clock)
    commit(c, 5)
    before = (c.dir / "checkpoints.jsonl").read_bytes().count(b"\n")
    for _ in range(3):
        clock.t += 10
        c.heartbeat()
    after = (c.dir / "checkpoints.jsonl").read_bytes().count(b"\n")
    assert after == before + 3
    c.close()


def test_checkpoints_are_anchored(tmp_path: Path) -> None:
    """Every checkpoint is also appended to each anchor directory; a missing anchor does not stop writing."""
    write_keypair(tmp_path / "k", "ops/k")
    (tmp_path / "a1").mkdir()
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), anchors=(str(tmp_path / "a1"), str(tmp_path / "gone")))
    c = Chain(tmp_path / "log", cfg)
    commit(c, 5)
    c.close()
    local = (c.dir / "checkpoints.jsonl").read_bytes()
    assert anchor_file(tmp_path / "a1", c.writer_id).read_bytes() == local
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]), [tmp_path / "a1"])
    assert rep.intact, rep.problems


def test_integrity_config_parsed_strictly() -> None:
    """[integrity] keys are typed and checked by the one config loader."""
    cfg = config_from_mapping({"integrity": {"checkpoint_every_records": 10, "anchors": ["/x"]}})
    assert cfg.integrity.checkpoint_every_records == 10 and cfg.integrity.anchors == ("/x",)
    with pytest.raises(ConfigError):
        config_from_mapping({"integrity": {"checkpoint_every_records": 0}})
    with pytest.raises(ConfigError):
        config_from_mapping({"integrity": {"nope": 1}})


def test_stored_line_is_the_canonical_encoding(tmp_path: Path) -> None:
    """append writes exactly {"seq":N,"prev":"<hex>","writer_id":"<id>","org_tag":"<tag>",<fields>}
    and returns SHA-256(0x00 || header || SHA-256(body)) (the rule written out here with hashlib)."""
    import hashlib

    write_keypair(tmp_path / "k", "ops/k")
    c = Chain(tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key")))
    c.append(c.pending_events())
    seq, prev = c.next_seq, c.last_hash
    entries: list[Mapping[str, Any] | bytes | tuple[bytes, str]] = [
        {"record_type": "event", "event": "x", "n": 1},
        (b'{"record_type":"inference","org_id":"acme","n":2}', "acme"),
        b'{"record_type":"alert","org_id":"globex","n":3}',
    ]
    leaves = c.append(entries)
    c.sync()
    (_, seg), *_ = list_segments(c.dir)
    lines = seg.read_bytes().split(b"\n")[-4:-1]
    bodies = [b'"record_type":"event","event":"x","n":1}', b'"record_type":"inference","org_id":"acme","n":2}']
    bodies.append(b'"record_type":"alert","org_id":"globex","n":3}')
    for k, (line, body, org) in enumerate(zip(lines, bodies, ["", "acme", "globex"], strict=True)):
        n = seq + k
        tag = hashlib.sha256(b"vllm-audit/org-tag/v1\x00%b\x00%d\x00%b" % (c.writer_id.encode(), n, org.encode()))
        header = f'{{"seq":{n},"prev":"{prev}","writer_id":"{c.writer_id}","org_tag":"{tag.hexdigest()[:32]}",'
        assert line == header.encode() + body
        leaf = hashlib.sha256(b"\x00" + header.encode() + hashlib.sha256(body).digest()).digest()
        assert leaves[k] == leaf
        prev = leaf.hex()
    assert c.last_hash == prev
    c.close()


def test_torn_first_write_of_a_new_segment(tmp_path: Path) -> None:
    """A segment holding only a torn write (crash right after rotation) moves to quarantine; the log verifies."""
    write_keypair(tmp_path / "k", "ops/k")
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), segment_max_bytes=10_000)
    c = Chain(tmp_path / "log", cfg)
    commit(c, 30)
    c.close()
    d = c.dir
    nxt = d / f"seg-{c.next_seq:012d}.jsonl"
    if not nxt.exists():
        nxt.write_bytes(b'{"seq":12')
    else:
        with open(nxt, "ab") as f:
            f.write(b'{"seq":12')
    c = Chain(tmp_path / "log", cfg)
    commit(c, 5, 30)
    c.close()
    assert list((d / "quarantine").iterdir())
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems


def test_live_writer_verifies_with_unsigned_tail(tmp_path: Path) -> None:
    """A live writer's log verifies; entries after its last checkpoint are a note, not a problem."""
    write_keypair(tmp_path / "k", "ops/k")
    c = Chain(tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key")))
    commit(c, 5)  # first batch: checkpoint
    commit(c, 5, 5)  # not yet due
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems
    assert rep.writers[0].live and rep.writers[0].unsigned_tail == 5
    c.close()


def test_torn_checkpoint_line_is_recovered(tmp_path: Path) -> None:
    """A torn checkpoints line fails verification until a restart quarantines it and records the recovery."""
    write_keypair(tmp_path / "k", "ops/k")
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"))
    c = Chain(tmp_path / "log", cfg)
    commit(c, 5)
    c.close()
    with open(c.dir / "checkpoints.jsonl", "ab") as f:
        f.write(b'{"note":"vllm-audit/')
    keys = load_public_keys([tmp_path / "k.pub"])
    assert not verify_log(tmp_path / "log", keys).intact
    c = Chain(tmp_path / "log", cfg)
    commit(c, 5, 5)
    c.close()
    rep = verify_log(tmp_path / "log", keys)
    assert rep.intact, rep.problems


# -- resuming after retention removed the oldest segments (``vllm-audit prune``) ----------------


def _prunable_log(tmp_path: Path) -> tuple[Config, IntegrityConfig]:
    """A closed writer with several sealed segments; retention 0 days and no archive required."""
    write_keypair(tmp_path / "k", "ops/k")
    config = load_config(
        None,
        {
            "log": {"dir": str(tmp_path / "log")},
            "integrity": {"signing_key": str(tmp_path / "k.key"), "segment_max_bytes": 8000},
            "retention": {"days": 0, "require_archive": False},
        },
    )
    cfg = IntegrityConfig(signing_key=str(tmp_path / "k.key"), segment_max_bytes=8000)
    c = Chain(tmp_path / "log", cfg)
    for k in range(0, 60, 10):
        commit(c, 10, k)
    c.close()
    return config, cfg


def _prune(config: Config, *, keep_sealed: int = 0, only: int | None = None) -> None:
    """The real ``vllm-audit prune``, sparing the newest ``keep_sealed`` sealed segments (or pruning
    ``only`` the oldest ones)."""
    decisions = plan(config)
    assert decisions and all(d.prune for d in decisions), decisions
    execute(config, decisions[: len(decisions) - keep_sealed if only is None else only], reason="test")


def _resume_and_write(tmp_path: Path, cfg: IntegrityConfig, start: int) -> tuple[str, int]:
    """Resume the writer, check it goes on where it stopped (no recovery), append 10 records."""
    size = _entries_on_disk(tmp_path / "log")
    c = Chain(tmp_path / "log", cfg)
    assert c.next_seq == size and c.tree.size == size
    events = c.pending_events()
    assert [e["event"] for e in events] == ["writer_resumed"]
    c.append(events)  # written as the writer would
    commit(c, 10, start)
    c.close()
    return c.writer_id, size


def _entries_on_disk(log_dir: Path) -> int:
    (d,) = (log_dir / "writers").iterdir()
    last = list_segments(d)[-1][1].read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    seq: int = orjson.loads(last)["seq"]
    return seq + 1


@pytest.mark.parametrize("keep_sealed", [0, 1], ids=["only-the-open-tail-left", "a-sealed-segment-left"])
def test_a_writer_resumed_after_prune_continues_its_chain(tmp_path: Path, keep_sealed: int) -> None:
    """After a prune the resumed writer takes its state from the pruned range (checked against the
    manifest, or against the signed roots when only the open tail is left), goes on at the next seq
    and the log verifies."""
    config, cfg = _prunable_log(tmp_path)
    _prune(config, keep_sealed=keep_sealed)  # (its retention.pruned event is appended before the files go)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    segs = list_segments(d)
    assert segs[0][0] == read_pruned(d)[0].end > 0
    assert len(segs) == 1 + keep_sealed  # the open tail alone, or a sealed segment (with manifest) before it
    assert (d / segs[0][1].name.replace(".jsonl", ".manifest.json")).exists() == bool(keep_sealed)
    _resume_and_write(tmp_path, cfg, 60)
    _rotate(cfg, tmp_path)  # a resume whose last sealed segment follows a manifest of the pruned log
    _resume_and_write(tmp_path, cfg, 130)
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems
    assert [(r["start"], r["end"]) for r in rep.pruned] == [(r.start, r.end) for r in read_pruned(d)]


def test_a_writer_resumed_after_two_prunes_continues_its_chain(tmp_path: Path) -> None:
    """Two pruned ranges one after the other (no local segment between them): the resume takes the
    state from the one ending at the first local segment once the ranges cover the prefix; the tree
    grown from that range over the entries left gives the root of the last signed checkpoint."""
    config, cfg = _prunable_log(tmp_path)
    _prune(config, keep_sealed=1)
    _resume_and_write(tmp_path, cfg, 60)
    _prune(config, only=1)  # the sealed segment the first prune kept (the first prune's event stays)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    first, second = read_pruned(d)
    assert first.start == 0 and first.end == second.start and list_segments(d)[0][0] == second.end
    both = (d / "pruned.jsonl").read_bytes()
    (d / "pruned.jsonl").write_bytes(both.splitlines(keepends=True)[1])  # the range ending here, but a hole before
    with pytest.raises(LogWriteError, match=f"entries 0..{first.end - 1} are missing"):
        Chain(tmp_path / "log", cfg)
    (d / "pruned.jsonl").write_bytes(both)
    _resume_and_write(tmp_path, cfg, 70)
    entries = list(LogReader(tmp_path / "log").entries(d.name, second.end))
    assert entries[0].seq == second.end and entries[0].prev == second.last_leaf
    tree = CompactRange(second.end, [bytes.fromhex(h) for h in second.compact_range])
    for e in entries:
        tree.append(bytes.fromhex(e.leaf_hex))
    last_note = orjson.loads((d / "checkpoints.jsonl").read_bytes().splitlines()[-1])["note"]
    cp = open_checkpoint(last_note, load_public_keys([tmp_path / "k.pub"]))
    assert (cp.size, cp.root) == (tree.size, tree.root())


def test_verify_after_two_adjacent_prunes(tmp_path: Path) -> None:
    config, cfg = _prunable_log(tmp_path)
    _prune(config, keep_sealed=1)
    _resume_and_write(tmp_path, cfg, 60)
    _prune(config, only=1)
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems


def _rotate(cfg: IntegrityConfig, tmp_path: Path) -> None:
    c = Chain(tmp_path / "log", cfg)
    commit(c, 30, 100)  # > 8000 bytes: the segment the last resume wrote to is sealed
    c.close()


def test_a_missing_prefix_without_a_pruned_record_is_refused(tmp_path: Path) -> None:
    """Sealed segments deleted without ``vllm-audit prune``: the writer refuses to append (naming the
    writer and the missing seqs) instead of restarting at seq 0, and keeps refusing."""
    _config, cfg = _prunable_log(tmp_path)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    segs = list_segments(d)
    for _first, path in segs[:2]:
        path.unlink()
        path.with_name(path.name.replace(".jsonl", ".manifest.json")).unlink()
    before = {p.name: p.read_bytes() for _, p in segs[2:]}
    for _ in range(2):  # the refused chain's lock is released: the next start refuses the same way
        with pytest.raises(LogWriteError) as exc:
            Chain(tmp_path / "log", cfg)
        assert f"Audit chain {d.name} cannot be resumed: entries 0..{segs[2][0] - 1} are missing" in str(exc.value)
    assert {p.name: p.read_bytes() for _, p in list_segments(d)} == before  # nothing appended
    assert [p.name for p in (tmp_path / "log" / "writers").iterdir()] == [d.name]


@pytest.mark.parametrize("keep_sealed", [0, 1], ids=["only-the-open-tail-left", "a-sealed-segment-left"])
def test_a_malformed_or_forged_pruned_range_is_refused(tmp_path: Path, keep_sealed: int) -> None:
    """A pruned.jsonl line that does not parse, or whose compact range was changed, is not built on."""
    config, cfg = _prunable_log(tmp_path)
    _prune(config, keep_sealed=keep_sealed)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    good = (d / "pruned.jsonl").read_bytes()
    line = orjson.loads(good)
    line["compact_range"] = line["compact_range"][1:]
    (d / "pruned.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    with pytest.raises(LogWriteError, match=r"no range in pruned.jsonl records their removal \(.*line 1: "):
        Chain(tmp_path / "log", cfg)
    line = orjson.loads(good)
    line["compact_range"][0] = "00" * 32
    (d / "pruned.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    want = "disagree" if keep_sealed else "does not give the root of the checkpoint signed"
    with pytest.raises(LogWriteError, match=want):
        Chain(tmp_path / "log", cfg)
    line = orjson.loads(good)
    line["last_leaf"] = "00" * 32
    (d / "pruned.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    with pytest.raises(LogWriteError, match="does not continue the pruned range"):
        Chain(tmp_path / "log", cfg)
    (d / "pruned.jsonl").write_bytes(good)
    _resume_and_write(tmp_path, cfg, 60)


def test_entries_lost_below_a_signed_checkpoint_or_every_segment_gone_are_refused(tmp_path: Path) -> None:
    """A deleted open tail (entries a signed checkpoint covers) or a writer with pruned ranges and no
    segment file left: refused, not restarted below what was signed."""
    config, cfg = _prunable_log(tmp_path)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    tail = list_segments(d)[-1][1]
    saved = tail.read_bytes()
    tail.unlink()
    with pytest.raises(
        LogWriteError, match=r"entries \d+\.\.\d+ are covered by the last checkpoint in checkpoints.jsonl"
    ):
        Chain(tmp_path / "log", cfg)
    tail.write_bytes(saved)
    _prune(config)
    (only,) = list_segments(d)
    only[1].unlink()
    with pytest.raises(LogWriteError, match="every segment file is gone, but pruned.jsonl records entries up to"):
        Chain(tmp_path / "log", cfg)


def test_a_torn_tail_after_prune_is_recovered_on_the_pruned_range(tmp_path: Path) -> None:
    """kill -9 mid-write when only the open tail is left: the resume seals it (torn bytes quarantined)
    on the state from the pruned range, and the log verifies."""
    config, cfg = _prunable_log(tmp_path)
    _prune(config)
    (d,) = (tmp_path / "log" / "writers").iterdir()
    ((first, tail),) = list_segments(d)
    size = _entries_on_disk(tmp_path / "log")
    with open(tail, "ab") as f:
        f.write(b'{"seq":9')
    c = Chain(tmp_path / "log", cfg)
    events = c.pending_events()
    assert c.next_seq == size and [e["event"] for e in events] == ["segment_sealed", "recovery"]
    c.append(events)  # the recovery event explains the torn bytes to verify
    commit(c, 10, 60)
    c.close()
    assert list((d / "quarantine").iterdir()) and (d / tail.name.replace(".jsonl", ".manifest.json")).exists()
    rep = verify_log(tmp_path / "log", load_public_keys([tmp_path / "k.pub"]))
    assert rep.intact, rep.problems
