"""Legal holds cannot be removed silently: the chain's hold events are the authority, the file a cache.

Deleting the holds file, releasing or narrowing a hold in it, or adding one that no event placed,
makes ``vllm-audit prune`` (and its dry run) refuse, name the hold, and remove nothing; ``hold list
--repair`` rewrites the file from the chain, after which prune honours the hold again.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.archive.test_archive import write
from tests.archive.test_prune import _cli
from tests.export.conftest import rec
from vllm_audit.archive.holds import HoldMismatch, chain_holds, chain_state_path, checked_holds
from vllm_audit.archive.projection import scan_records
from vllm_audit.config import Config, load_config
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import LogReader, list_segments


@pytest.fixture
def held(tmp_path: Path) -> tuple[Config, Path, str]:
    """A log past retention (no archive required) with a hold on tenant globex placed through the CLI."""
    write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    cfg = tmp_path / "audit.toml"
    cfg.write_text(
        f'[log]\ndir = "{tmp_path / "log"}"\n[integrity]\nsigning_key = "{tmp_path / "ops.key"}"\n'
        "segment_max_bytes = 8000\n[retention]\ndays = 0\nrequire_archive = false\n"
    )
    config = load_config(str(cfg))
    write(config, [rec(i, "globex" if 120 <= i < 150 else "acme") for i in range(300)])
    r = _cli("hold", "add", "--config", str(cfg), "--org", "globex", "--reason", "case 2026-17", "--by", "legal")
    assert r.returncode == 0, r.stderr
    hold_id = r.stdout.split()[2]
    assert hold_id.startswith("hold-")
    return config, cfg, hold_id


def _segments(config: Config) -> set[str]:
    (wid,) = LogReader(config.log.dir).writer_ids()
    return {p.name for _f, p in list_segments(Path(config.log.dir) / "writers" / wid)}


def _globex_segments(config: Config) -> set[str]:
    (wid,) = LogReader(config.log.dir).writer_ids()
    segs = list_segments(Path(config.log.dir) / "writers" / wid)
    return {p.name for _f, p in segs if any(r.get("org_id") == "globex" for r in scan_records(p.read_bytes()))}


def _holds_file(config: Config) -> Path:
    return Path(config.log.dir) / "holds.json"


def _edit_hold(config: Config, **fields: str) -> None:
    data = orjson.loads(_holds_file(config).read_bytes())
    data["holds"][0].update(fields)
    _holds_file(config).write_bytes(orjson.dumps(data))


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        ("delete", "is in the audit chain (writer "),
        ("release", "is active in the audit chain"),
        ("narrow", "the holds file has other criteria"),
    ],
)
def test_deleting_releasing_or_narrowing_the_hold_in_the_file_makes_prune_refuse_and_name_it(
    held: tuple[Config, Path, str], tamper: str, why: str
) -> None:
    config, cfg, hold_id = held
    before = _segments(config)
    assert _globex_segments(config)
    if tamper == "delete":
        _holds_file(config).unlink()
    elif tamper == "release":
        _edit_hold(config, released_at="2026-01-01T00:00:00.000Z", released_by="intruder")
    else:
        _edit_hold(config, org_id="nobody")
    for args in (["--dry-run"], []):
        r = _cli("prune", "--config", str(cfg), *args)
        assert r.returncode == 2, r.stdout
        assert "prune refused, nothing was removed" in r.stderr and hold_id in r.stderr and why in r.stderr, r.stderr
    assert _segments(config) == before  # nothing was removed
    with pytest.raises(HoldMismatch, match=hold_id):
        checked_holds(config)

    # The file rewritten from the chain: prune goes on and still keeps the held tenant's segments.
    fix = _cli("hold", "list", "--config", str(cfg), "--repair")
    assert fix.returncode == 0 and hold_id in fix.stdout and "active" in fix.stdout, fix.stderr
    r = _cli("prune", "--config", str(cfg), "--reason", "after repair")
    assert r.returncode == 0, r.stderr
    left = _segments(config)
    assert left < before and _globex_segments(config) and _globex_segments(config) <= left
    assert (
        sum(x.get("org_id") == "globex" and x["record_type"] == "inference" for s in left for x in _records(config, s))
        == 30
    )


def _records(config: Config, segment: str) -> list[dict[str, object]]:
    (wid,) = LogReader(config.log.dir).writer_ids()
    return scan_records((Path(config.log.dir) / "writers" / wid / segment).read_bytes())


def test_a_hold_added_to_the_file_without_its_event_is_named(held: tuple[Config, Path, str]) -> None:
    config, cfg, _hold_id = held
    data = orjson.loads(_holds_file(config).read_bytes())
    data["holds"].append({**data["holds"][0], "hold_id": "hold-forged01", "org_id": "acme"})
    _holds_file(config).write_bytes(orjson.dumps(data))
    r = _cli("prune", "--config", str(cfg), "--dry-run")
    assert r.returncode == 2 and "hold-forged01" in r.stderr and "no hold.placed event" in r.stderr


def test_the_chain_hold_set_is_read_incrementally_and_follows_releases(held: tuple[Config, Path, str]) -> None:
    config, cfg, hold_id = held
    state = chain_holds(config)
    assert state.holds[hold_id].active and state.holds[hold_id].org_id == "globex"
    (wid,) = state.cursors
    end = state.cursors[wid].next_seq
    saved = orjson.loads(chain_state_path(config).read_bytes())
    assert saved["cursors"][wid]["next_seq"] == end  # the next run starts there
    r = _cli("hold", "release", hold_id, "--config", str(cfg), "--reason", "case closed", "--by", "legal")
    assert r.returncode == 0, r.stderr
    again = chain_holds(config)
    assert not again.holds[hold_id].active and again.holds[hold_id].released_by == "legal"
    assert again.cursors[wid].next_seq > end
    assert checked_holds(config) == []  # file and chain agree: no active hold
    # A release is final: a file claiming the hold is active again is named.
    _edit_hold(config, released_at="", released_by="", release_reason="")
    with pytest.raises(HoldMismatch, match="released .* in the audit chain"):
        checked_holds(config)


def test_each_prune_event_lists_the_holds_it_honoured_and_a_rescan_finds_them(
    held: tuple[Config, Path, str],
) -> None:
    config, cfg, hold_id = held
    r = _cli("prune", "--config", str(cfg), "--reason", "scheduled")
    assert r.returncode == 0, r.stderr
    (wid,) = LogReader(config.log.dir).writer_ids()
    events = [e.record() for e in LogReader(config.log.dir).entries_all(wid) if e.record_type == "event"]
    (pruned,) = [e for e in events if e.get("event") == "retention.pruned"]
    assert [h["hold_id"] for h in pruned["detail"]["holds"]] == [hold_id]
    chain_state_path(config).unlink()  # lost state: rebuilt from the chain
    assert chain_holds(config).holds[hold_id].active
