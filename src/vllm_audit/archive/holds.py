"""Legal holds: data that must be kept whatever the retention says.

A hold names any combination of tenant (``org_id``), user, request id and time range (all given
criteria must match a record). Held data is never pruned locally, and the archive objects of
every segment holding a matching record carry an Object Lock legal hold until the last hold on
them is released. Each placement and release is an event in the chain (``hold.placed`` /
``hold.released``, with who and why), and those events are the authority: prune derives the hold
set from the chain (:func:`chain_holds`, incremental: a cursor per writer in
``<state dir>/holds/chain.json``, so each run reads only the entries appended since) and treats
the JSON file beside the log (``[retention] holds_file``) as a cache that must agree with it
(:func:`checked_holds`). A hold deleted from, altered in or added to the file without its event
makes prune refuse, naming the hold. Each ``retention.pruned`` event carries the whole hold set it
honoured, so a rescan of a chain whose hold events were themselves pruned still finds every hold.
The same scan collects the pruned ranges the prune events record (:attr:`ChainHolds.pruned`), which
the next prune event carries forward.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from vllm_audit._fs import replace_file
from vllm_audit.config import Config
from vllm_audit.errors import AuditError
from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader, PrunedRange, prune_event_ranges
from vllm_audit.ship.config import state_dir


class HoldError(AuditError):
    """A hold is malformed or unknown (the message says which)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """One legal hold. Empty criteria match everything; at least one must be given."""

    hold_id: str
    reason: str
    placed_by: str
    placed_at: str
    org_id: str = ""
    user_id: str = ""
    request_id: str = ""
    #: ISO-8601 UTC bounds on the record's ``timestamp``: ``time_from <= t < time_to``.
    time_from: str = ""
    time_to: str = ""
    released_at: str = ""
    released_by: str = ""
    release_reason: str = ""

    @property
    def active(self) -> bool:
        return not self.released_at

    def criteria(self) -> dict[str, str]:
        names = ("org_id", "user_id", "request_id", "time_from", "time_to")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    def describe(self) -> str:
        crit = ", ".join(f"{k}={v}" for k, v in self.criteria().items())
        return f"hold {self.hold_id} ({crit}; {self.reason})"

    def matches(self, rec: Mapping[str, Any]) -> bool:
        if self.org_id and rec.get("org_id") != self.org_id:
            return False
        if self.user_id and rec.get("user_id") != self.user_id:
            return False
        if self.request_id and rec.get("request_id") != self.request_id:
            return False
        if self.time_from or self.time_to:
            ts = rec.get("timestamp")
            if not isinstance(ts, str):
                return False
            if self.time_from and ts < self.time_from:
                return False
            if self.time_to and ts >= self.time_to:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def holds_path(config: Config) -> Path:
    if config.retention.holds_file:
        return Path(config.retention.holds_file)
    return Path(config.log.dir) / "holds.json"


class HoldStore:
    """The holds file: read it, add or release one, replace it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Hold]:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except orjson.JSONDecodeError as exc:
            raise HoldError(f"holds file {str(self.path)!r} is not valid JSON: {exc}") from None
        items = raw.get("holds") if isinstance(raw, dict) else None
        if not isinstance(items, list):
            raise HoldError(f'holds file {str(self.path)!r} must hold {{"holds": [...]}}')
        out = []
        names = {f.name for f in dataclasses.fields(Hold)}
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) - names or not all(isinstance(v, str) for v in item.values()):
                raise HoldError(f"holds file {str(self.path)!r}: entry {i} is malformed")
            try:
                out.append(Hold(**item))
            except TypeError:
                raise HoldError(f"holds file {str(self.path)!r}: entry {i} lacks a required field") from None
        return out

    def active(self) -> list[Hold]:
        return [h for h in self.load() if h.active]

    def _save(self, holds: list[Hold]) -> None:
        replace_file(self.path, orjson.dumps({"holds": [h.to_json() for h in holds]}, option=orjson.OPT_INDENT_2))

    def add(
        self,
        *,
        reason: str,
        placed_by: str,
        org_id: str = "",
        user_id: str = "",
        request_id: str = "",
        time_from: str = "",
        time_to: str = "",
    ) -> Hold:
        if not (org_id or user_id or request_id or time_from or time_to):
            raise HoldError("a hold needs at least one of --org, --user, --request-id, --from, --to")
        if not reason.strip():
            raise HoldError("a hold needs a --reason (it is recorded in the audit log)")
        hold = Hold(
            "hold-" + secrets.token_hex(4),
            reason,
            placed_by,
            now_iso(),
            org_id,
            user_id,
            request_id,
            time_from,
            time_to,
        )
        self._save([*self.load(), hold])
        return hold

    def release(self, hold_id: str, *, by: str, reason: str) -> Hold:
        holds = self.load()
        for i, h in enumerate(holds):
            if h.hold_id == hold_id:
                if not h.active:
                    raise HoldError(f"hold {hold_id} was already released at {h.released_at}")
                holds[i] = dataclasses.replace(h, released_at=now_iso(), released_by=by, release_reason=reason)
                self._save(holds)
                return holds[i]
        raise HoldError(f"no hold {hold_id!r} (see `vllm-audit hold list`)")


def hold_event(hold: Hold, kind: str) -> dict[str, Any]:
    """The audit event for placing (``hold.placed``) or releasing (``hold.released``) a hold."""
    return {"record_type": "event", "event": kind, "org_id": hold.org_id or None, "detail": hold.to_json()}


#: Events whose ``detail`` is one hold (placed or released), and the prune event whose
#: ``detail.holds`` lists every hold known when it ran.
HOLD_EVENTS = (b'"event":"hold.placed"', b'"event":"hold.released"')
PRUNE_EVENT = b'"event":"retention.pruned"'


class HoldMismatch(HoldError):
    """The holds file does not agree with the hold events in the audit chain (the message names each hold)."""


def _hold(obj: object, where: str) -> Hold:
    names = {f.name for f in dataclasses.fields(Hold)}
    if not isinstance(obj, dict) or set(obj) - names or not all(isinstance(v, str) for v in obj.values()):
        raise HoldError(f"{where}: malformed hold")
    try:
        return Hold(**obj)
    except TypeError:
        raise HoldError(f"{where}: a hold lacks a required field") from None


def _merge(holds: dict[str, Hold], hold: Hold) -> None:
    """A release is final: once any source says released, the hold stays released."""
    old = holds.get(hold.hold_id)
    if old is None or (old.active and not hold.active):
        holds[hold.hold_id] = hold


@dataclasses.dataclass(slots=True)
class ChainHolds:
    """The hold set as the chain states it, with how far each writer's chain was read."""

    holds: dict[str, Hold]
    cursors: dict[str, Cursor]
    #: Where each hold was last stated (``writer:seq``), for messages.
    where: dict[str, str]
    #: Every pruned range the chain's ``retention.pruned`` events record, by (writer id, start, end,
    #: last leaf, compact range): a range repeated by later events is kept once.
    pruned: dict[tuple[str, int, int, str, tuple[str, ...]], PrunedRange] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "holds": {k: h.to_json() for k, h in sorted(self.holds.items())},
            "cursors": {w: c.to_json() for w, c in sorted(self.cursors.items())},
            "where": dict(sorted(self.where.items())),
            "pruned": [dict(r.to_json(), writer_id=w) for w, r in self.pruned_ranges()],
        }

    def add_pruned(self, writer_id: str, rng: PrunedRange) -> None:
        self.pruned.setdefault((writer_id, rng.start, rng.end, rng.last_leaf, rng.compact_range), rng)

    def pruned_ranges(self) -> list[tuple[str, PrunedRange]]:
        """``(writer_id, range)`` of every recorded pruned range, by writer and start."""
        return [(k[0], r) for k, r in sorted(self.pruned.items(), key=lambda kv: kv[0][:3])]

    @classmethod
    def load(cls, path: Path) -> ChainHolds:
        try:
            raw = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls({}, {}, {})
        except orjson.JSONDecodeError:
            raise HoldError(f"hold state {str(path)!r} is not valid JSON (delete it to rescan the chain)") from None
        if isinstance(raw, dict) and "pruned" not in raw:  # written before pruned ranges were kept: rescan
            return cls({}, {}, {})
        try:
            state = cls(
                {k: _hold(v, str(path)) for k, v in raw["holds"].items()},
                {w: Cursor.from_json(c) for w, c in raw["cursors"].items()},
                {k: str(v) for k, v in raw["where"].items()},
            )
            for r in raw["pruned"]:
                state.add_pruned(str(r["writer_id"]), PrunedRange.from_json(r))
            return state
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise HoldError(f"hold state {str(path)!r} is malformed ({exc}; delete it to rescan the chain)") from None


def chain_state_path(config: Config) -> Path:
    return state_dir(config.ship, config.log.dir) / "holds" / "chain.json"


def chain_holds(config: Config, *, rescan: bool = False) -> ChainHolds:
    """Every hold the audit chain states (placed, released, or listed by a prune), read incrementally.

    Entries are read up to each writer's durable position (``LogReader(limit="durable")``); only
    event lines naming a hold or a prune are parsed. ``rescan`` ignores the saved state.
    """
    path = chain_state_path(config)
    state = ChainHolds({}, {}, {}) if rescan else ChainHolds.load(path)
    reader = LogReader(config.log.dir, limit="durable")
    changed = False
    for wid in reader.writer_ids():
        cur = state.cursors.get(wid, Cursor(wid))
        while True:
            try:
                got = reader.read(cur, 4096)
            except ChainBreak as exc:
                raise HoldError(f"cannot read the hold events of the audit chain: {exc}") from None
            if not got:
                break
            for e in got:
                if e.record_type != "event":
                    continue
                line = e.line
                if any(n in line for n in HOLD_EVENTS):
                    detail = e.record().get("detail")
                    h = _hold(detail, f"writer {wid} entry {e.seq}")
                    _merge(state.holds, h)
                    state.where[h.hold_id] = e.key
                elif PRUNE_EVENT in line:
                    detail = e.record().get("detail")
                    for w, rng in prune_event_ranges(detail):
                        state.add_pruned(w, rng)
                    listed = detail.get("holds", []) if isinstance(detail, dict) else []
                    for n, obj in enumerate(listed if isinstance(listed, list) else []):
                        h = _hold(obj, f"writer {wid} entry {e.seq} hold {n}")
                        _merge(state.holds, h)
                        state.where.setdefault(h.hold_id, e.key)
            cur = cur.after(got[-1])
            state.cursors[wid] = cur
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, orjson.dumps(state.to_json()))
    return state


def checked_holds(config: Config) -> list[Hold]:
    """The active holds, from the chain, after checking that the holds file agrees with it.

    Raises :class:`HoldMismatch` naming every hold that the file lacks, has in another state or
    with other criteria, or has without a ``hold.placed`` event in the chain.
    """
    chain = chain_holds(config)
    path = holds_path(config)
    try:
        cached = {h.hold_id: h for h in HoldStore(path).load()}
    except HoldError as exc:
        raise HoldMismatch(f"{exc}; the audit chain states {len(chain.holds)} hold(s)") from None
    problems = []
    for hid, h in sorted(chain.holds.items()):
        c = cached.get(hid)
        at = f"writer {chain.where.get(hid, '?').replace(':', ' entry ')}"
        if c is None:
            problems.append(f"{h.describe()} is in the audit chain ({at}) but missing from the holds file")
        elif c.active != h.active:
            state = "active" if h.active else f"released {h.released_at}"
            problems.append(f"{h.describe()} is {state} in the audit chain ({at}) but not in the holds file")
        elif c.criteria() != h.criteria():
            problems.append(f"{h.describe()}: the holds file has other criteria ({c.criteria()}) than the chain ({at})")
    for hid, c in sorted(cached.items()):
        if hid not in chain.holds:
            problems.append(
                f"{c.describe()} is in the holds file but no hold.placed event in the audit chain states it"
            )
    if problems:
        raise HoldMismatch(
            f"the holds file {str(path)!r} does not agree with the audit chain: "
            + "; ".join(problems)
            + " (restore the file, or rewrite it from the chain: `vllm-audit hold list --repair`)"
        )
    return [h for h in chain.holds.values() if h.active]


def repair_holds_file(config: Config) -> list[Hold]:
    """Rewrite the holds file from the audit chain (the cache made to agree with the authority)."""
    holds = sorted(chain_holds(config).holds.values(), key=lambda h: (h.placed_at, h.hold_id))
    HoldStore(holds_path(config))._save(holds)
    return holds
