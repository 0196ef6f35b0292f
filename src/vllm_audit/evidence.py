"""Settings are evidence: the effective audit-relevant configuration, appended to the chain.

Every writing process appends one ``settings.effective`` event when it starts (the configuration
is read once per process, so a change takes effect, and is recorded, at the next start). The
event holds the settings that decide what a record looks like and how safe it is — redaction
policy per tenant, durability, failure policy, retention, archive, sinks, checkpoint key
fingerprints — never a secret (key files, tokens and secret references are left out), their
SHA-256 over canonical JSON, and the list of ways they are weaker than the recommended baseline.
``vllm-audit verify`` and the export summary list each period (from one event to the next of the
same writer) and flag the weaker ones, so an auditor can see which rules were in force for any
record.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.config import Config

EVENT = "settings.effective"
#: Keys never copied into the evidence (secrets, and paths that only locate them).
_SECRET_WORDS = ("secret", "password", "token", "key_file", "key_dir", "access_key", "credential", "signing_key")


def _clean(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {
            str(k): _clean(v) for k, v in sorted(value.items()) if not any(w in str(k).lower() for w in _SECRET_WORDS)
        }
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _key_fingerprints(config: Config) -> list[str]:
    from vllm_audit.integrity.keys import load_signing_key, parse_vkey

    try:
        if config.integrity.signing_key:
            vk = load_signing_key(config.integrity.signing_key).verifier
            return [f"{vk.label} sha256:{vk.fingerprint}"]
        pub = Path(config.log.dir) / "keys" / "signing.pub"
        lines = [ln for ln in pub.read_text("utf-8").splitlines() if ln and not ln.startswith("#")]
        key = parse_vkey(lines[0], str(pub))
        return [f"{key.label} sha256:{key.fingerprint} (auto-generated, beside the log)"]
    except Exception:  # a missing or unreadable key is the writer's error to report, not ours
        return []


def settings_snapshot(config: Config) -> dict[str, Any]:
    """The audit-relevant effective settings, without secrets."""
    return {
        "log": {"durability": config.log.durability, "on_failure": config.log.on_failure},
        "privacy": _clean(config.privacy),
        "integrity": {
            "checkpoint_every_records": config.integrity.checkpoint_every_records,
            "checkpoint_every_seconds": config.integrity.checkpoint_every_seconds,
            "anchors": len(config.integrity.anchors),
            "key_fingerprints": _key_fingerprints(config),
            "auto_generated_key": not config.integrity.signing_key,
        },
        "retention": {"days": config.retention.days, "require_archive": config.retention.require_archive},
        "archive": {
            "enabled": config.archive.enabled,
            "bucket": config.archive.bucket,
            "lock_mode": config.archive.lock_mode,
            "retain_days": config.archive.retain_days or config.retention.days,
        },
        "sinks": {name: spec.type for name, spec in sorted(config.sinks.items())},
        "edge": {"unaudited_paths": list(config.edge.unaudited_paths)},
    }


def weaker(settings: Mapping[str, Any]) -> list[str]:
    """How these settings fall short of the recommended baseline (empty: none)."""
    out = []
    log = settings.get("log", {})
    if log.get("on_failure") == "fail_open":
        out.append("fail-open: requests are served when records cannot be written")
    if log.get("durability") == "async":
        out.append("async durability: a crash may lose the last batch of records")
    privacy = settings.get("privacy", {})
    if not privacy.get("enabled", True):
        out.append("redaction off: prompts and outputs are stored as received")
    for scope, policy in [("default", privacy.get("default", {})), *sorted((privacy.get("tenants") or {}).items())]:
        fields = (policy or {}).get("fields") or {}
        for field in ("input_prompt", "output_response"):
            if (fields.get(field) or {}).get("mode") == "keep":
                out.append(f"redaction off for {field} ({'tenant ' + scope if scope != 'default' else 'default'})")
    integrity = settings.get("integrity", {})
    if integrity.get("auto_generated_key"):
        out.append("checkpoint key auto-generated beside the log")
    retention = settings.get("retention", {})
    if float(retention.get("days", 180)) < 180:
        out.append(f"local retention {retention.get('days')} days (< 180, MLPS 2.0 / Cybersecurity Law Art. 21)")
    if not retention.get("require_archive", True):
        out.append("prune does not require an archived copy")
    if not settings.get("archive", {}).get("enabled"):
        out.append("no WORM archive configured")
    if settings.get("edge", {}).get("unaudited_paths"):
        out.append("some paths are passed through without a record")
    return out


def settings_event(config: Config, *, process: str = "writer") -> dict[str, Any]:
    """The ``settings.effective`` event for this configuration."""
    settings = settings_snapshot(config)
    digest = hashlib.sha256(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {
        "record_type": "event",
        "event": EVENT,
        "detail": {"sha256": digest, "process": process, "weaker": weaker(settings), "settings": settings},
    }


@dataclasses.dataclass(frozen=True, slots=True)
class SettingsPeriod:
    """From ``since`` on, writer ``writer_id`` ran with the settings hashed ``sha256``."""

    writer_id: str
    seq: int
    since: str
    sha256: str
    weaker: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings_periods(events: Iterable[Mapping[str, Any]]) -> list[SettingsPeriod]:
    """The periods recorded by ``settings.effective`` events (parsed entries), in time order."""
    out = []
    for ev in events:
        detail = ev.get("detail")
        if ev.get("event") != EVENT or not isinstance(detail, Mapping):
            continue
        weak = detail.get("weaker")
        out.append(
            SettingsPeriod(
                str(ev.get("writer_id", "")),
                int(ev.get("seq", ev.get("_seq", -1))),
                str(ev.get("timestamp", "")),
                str(detail.get("sha256", "")),
                tuple(str(w) for w in weak) if isinstance(weak, list) else (),
            )
        )
    return sorted(out, key=lambda p: (p.since, p.writer_id, p.seq))
