"""Chain behaviour: keys on first start, resume, rotation and sealing, heartbeats, anchors, config."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from vllm_audit.config import config_from_mapping
from vllm_audit.errors import ConfigError, LogWriteError
from vllm_audit.integrity.chain import Chain, anchor_file, list_segments
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
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
