"""The ``[archive]`` (WORM object storage) and ``[retention]`` (local prune, legal holds) sections."""

from __future__ import annotations

import dataclasses
from typing import Literal

from vllm_audit.ship.config import Secret


@dataclasses.dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Sealed segments, manifests and checkpoints copied to S3 with Object Lock (``[archive]``).

    Empty ``bucket``: no archive (and ``vllm-audit prune`` removes nothing while
    ``[retention] require_archive`` is on).
    """

    #: Bucket with Object Lock enabled (versioning on). Empty: the archive is off.
    bucket: str = ""
    #: Key prefix: objects are ``<prefix>/<writer_id>/seg-<first_seq>.{jsonl,manifest.json,checkpoints.jsonl}``.
    prefix: str = "vllm-audit"
    #: S3 endpoint URL (empty: AWS for ``region``); e.g. an S3-compatible server's URL.
    endpoint_url: str = ""
    #: Region of the bucket.
    region: str = "us-east-1"
    #: "path" or "virtual" host addressing ("auto": the SDK's choice).
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: Access key id (``{ env = "NAME" }`` or ``{ file = "/path" }``); unset: the SDK's credential chain.
    access_key_id: Secret | None = None
    #: Secret access key, same forms.
    secret_access_key: Secret | None = None
    #: Object Lock mode of every object: "COMPLIANCE" (nobody, root included, can delete or
    #: shorten it before retain-until) or "GOVERNANCE" (users with a bypass permission can).
    lock_mode: Literal["COMPLIANCE", "GOVERNANCE"] = "COMPLIANCE"
    #: Days each object is locked, counted from the segment's sealing (0: ``[retention] days``).
    retain_days: float = 0.0
    #: Read-back after upload: "full" downloads the object and compares its SHA-256; "checksum"
    #: asks the server for the SHA-256 checksum it stored (cheaper, trusts the server's hashing).
    verify: Literal["full", "checksum"] = "full"
    #: Create the bucket (with Object Lock) when it does not exist.
    create_bucket: bool = False

    def __post_init__(self) -> None:
        if self.retain_days < 0:
            raise ValueError("retain_days must not be negative")

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long sealed segments stay on the local disk, and legal holds (``[retention]``).

    ``vllm-audit prune`` removes a local segment only when it is past ``days`` since sealing,
    archived and verified in the archive, and under no hold; it appends a signed event first.
    """

    #: Days a sealed segment is kept locally (MLPS 2.0 / Cybersecurity Law Art. 21: at least
    #: 180; PIPL-style 3 years = 1095). Below 180 is flagged as weaker in the settings evidence.
    days: float = 180.0
    #: Prune only segments whose archive copy verifies (off: local copies may go unarchived;
    #: flagged as weaker).
    require_archive: bool = True
    #: File of legal holds (empty: ``<log dir>/holds.json``).
    holds_file: str = ""

    def __post_init__(self) -> None:
        if self.days < 0:
            raise ValueError("days must not be negative")
