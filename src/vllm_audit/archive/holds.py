"""Legal holds: data that must be kept whatever the retention says.

A hold names any combination of tenant (``org_id``), user, request id and time range (all given
criteria must match a record). Held data is never pruned locally, and the archive objects of
every segment holding a matching record carry an Object Lock legal hold until the last hold on
them is released. Each placement and release is an event in the chain (``hold.placed`` /
``hold.released``, with who and why); the current set lives in a small JSON file beside the log
(``[retention] holds_file``) so that prune does not have to search the whole chain for them.
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
