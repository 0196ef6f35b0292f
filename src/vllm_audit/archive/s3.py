"""The archive's object store: S3 (or an S3-compatible server) with Object Lock, through boto3.

Every object is written with ``Content-MD5`` and an ``x-amz-checksum-sha256`` (the server refuses a
body that does not match), its SHA-256 in the object's metadata, the configured Object Lock mode and
a retain-until date, and is then read back and compared. Writing the same key again with the same
bytes is recognised (idempotent re-upload after a crash) and does not add a version.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from vllm_audit.archive.config import ArchiveConfig
from vllm_audit.errors import AuditError


class ArchiveError(AuditError):
    """The archive refused or could not be reached (the message says which object and why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class StoredObject:
    """One locked object version in the archive."""

    key: str
    version_id: str
    sha256: str
    size: int
    lock_mode: str = ""
    retain_until: str = ""
    legal_hold: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _iso(t: dt.datetime | None) -> str:
    if t is None:
        return ""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


class ObjectStore:
    """A bucket with Object Lock (one client; thread-compatible)."""

    def __init__(self, config: ArchiveConfig, base_dir: Path | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError as exc:  # pragma: no cover - the extra is part of the test install
            raise ArchiveError("the archive needs the 'archive' extra: pip install 'vllm-audit[archive]'") from exc
        self.config = config
        self.bucket = config.bucket
        kwargs: dict[str, Any] = {"region_name": config.region}
        if config.endpoint_url:
            kwargs["endpoint_url"] = config.endpoint_url
        if config.access_key_id is not None:
            kwargs["aws_access_key_id"] = config.access_key_id.resolve("[archive] access_key_id")
        if config.secret_access_key is not None:
            kwargs["aws_secret_access_key"] = config.secret_access_key.resolve("[archive] secret_access_key")
        boto_cfg = BotoConfig(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": config.addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client("s3", config=boto_cfg, **kwargs)

    # -- bucket ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Check the bucket has Object Lock enabled (create it first when so configured)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound") or not self.config.create_bucket:
                raise ArchiveError(f"archive bucket {self.bucket!r} is not reachable: {exc}") from None
            try:
                self.client.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
            except Exception as exc2:
                if _code(exc2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise ArchiveError(f"cannot create archive bucket {self.bucket!r}: {exc2}") from None
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
        except Exception as exc:
            raise ArchiveError(f"archive bucket {self.bucket!r} has no Object Lock configuration: {exc}") from None
        if conf.get("ObjectLockEnabled") != "Enabled":
            raise ArchiveError(f"archive bucket {self.bucket!r} does not have Object Lock enabled")

    # -- objects --------------------------------------------------------------------------------

    def key(self, writer_id: str, name: str) -> str:
        prefix = self.config.prefix.strip("/")
        return f"{prefix}/{writer_id}/{name}" if prefix else f"{writer_id}/{name}"

    def head(self, key: str, version_id: str = "") -> StoredObject | None:
        """The newest (or the given) version of ``key`` with its lock, or None when absent."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            args["VersionId"] = version_id
        try:
            h = self.client.head_object(**args)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchVersion"):
                return None
            raise ArchiveError(f"cannot read archive object {key!r}: {exc}") from None
        sha = (h.get("Metadata") or {}).get("sha256", "")
        checksum = h.get("ChecksumSHA256")
        if checksum:
            sha_server = base64.b64decode(checksum).hex()
            if sha and sha != sha_server:
                raise ArchiveError(f"archive object {key!r}: stored checksum differs from its recorded sha256")
            sha = sha_server
        return StoredObject(
            key,
            str(h.get("VersionId") or ""),
            sha,
            int(h.get("ContentLength", 0)),
            str(h.get("ObjectLockMode") or ""),
            _iso(h.get("ObjectLockRetainUntilDate")),
            h.get("ObjectLockLegalHoldStatus") == "ON",
        )

    def get(self, key: str, version_id: str = "") -> bytes:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        try:
            body: bytes = self.client.get_object(**args)["Body"].read()
        except Exception as exc:
            raise ArchiveError(f"cannot download archive object {key!r}: {exc}") from None
        return body

    def put(self, key: str, data: bytes, retain_until: dt.datetime, *, legal_hold: bool = False) -> StoredObject:
        """Store ``data`` locked until ``retain_until`` (or reuse an identical existing version), read back."""
        sha = hashlib.sha256(data).hexdigest()
        existing = self.head(key)
        if existing is not None and existing.sha256 == sha and existing.lock_mode:
            if legal_hold and not existing.legal_hold:
                self.set_legal_hold(existing, True)
            return existing
        if existing is not None and existing.sha256 != sha:
            raise ArchiveError(
                f"archive object {key!r} already exists with different content (sha256 {existing.sha256[:16]}...,"
                f" ours {sha[:16]}...): refusing to add a conflicting version"
            )
        try:
            r = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentMD5=base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode(),
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha)).decode(),
                Metadata={"sha256": sha},
                ObjectLockMode=self.config.lock_mode,
                ObjectLockRetainUntilDate=retain_until,
                ObjectLockLegalHoldStatus="ON" if legal_hold else "OFF",
            )
        except Exception as exc:
            raise ArchiveError(f"cannot upload archive object {key!r}: {exc}") from None
        version = str(r.get("VersionId") or "")
        self._verify(key, version, sha, len(data))
        stored = self.head(key, version)
        if stored is None:
            raise ArchiveError(f"archive object {key!r} version {version} vanished right after upload")
        if stored.lock_mode != self.config.lock_mode:
            raise ArchiveError(f"archive object {key!r} was stored without the {self.config.lock_mode} lock")
        return stored

    def _verify(self, key: str, version: str, sha: str, size: int) -> None:
        if self.config.verify == "full":
            got = hashlib.sha256(self.get(key, version)).hexdigest()
        else:
            h = self.head(key, version)
            got = h.sha256 if h is not None else ""
        if got != sha:
            raise ArchiveError(f"archive object {key!r} read back with sha256 {got[:16]}..., expected {sha[:16]}...")

    def set_legal_hold(self, obj: StoredObject, on: bool) -> None:
        try:
            self.client.put_object_legal_hold(
                Bucket=self.bucket,
                Key=obj.key,
                VersionId=obj.version_id,
                LegalHold={"Status": "ON" if on else "OFF"},
            )
        except Exception as exc:
            raise ArchiveError(f"cannot set the legal hold of archive object {obj.key!r}: {exc}") from None

    def verify_stored(self, obj: StoredObject, *, now: dt.datetime, full: bool = False) -> str:
        """Why the archived version cannot be relied on, or "" when it is present, intact and locked."""
        h = self.head(obj.key, obj.version_id)
        if h is None:
            return f"archive object {obj.key} (version {obj.version_id}) is missing"
        if h.sha256 != obj.sha256:
            return f"archive object {obj.key} has sha256 {h.sha256[:16]}..., expected {obj.sha256[:16]}..."
        if not h.lock_mode:
            return f"archive object {obj.key} is not under Object Lock"
        if not h.retain_until or h.retain_until < _iso(now):
            return f"archive object {obj.key} is locked only until {h.retain_until or 'never'}"
        if full and hashlib.sha256(self.get(obj.key, obj.version_id)).hexdigest() != obj.sha256:
            return f"archive object {obj.key} does not hash to its sha256"
        return ""
