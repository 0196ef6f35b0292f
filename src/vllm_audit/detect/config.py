"""The ``[detect]`` section: the detector projection (rules over the record stream)."""

from __future__ import annotations

import dataclasses

from vllm_audit.ship.config import Secret


@dataclasses.dataclass(frozen=True, slots=True)
class DetectConfig:
    """The detector: rules over sealed records, alerts appended to the log (``[detect]``)."""

    #: Run the detector projection (beside the sinks, off the request path).
    enabled: bool = False
    #: The rules file (YAML or JSON); empty: the packaged default rules (docs/detection.md).
    rules_file: str = ""
    #: Redis holding windows, baselines, dedupe keys and cursors, shared by every detector.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key the detector uses.
    redis_prefix: str = "vllm-audit:detect:"
    #: This log directory's name among the detectors sharing Redis (its cursors and pending
    #: alerts); empty: derived from the host name and the log directory's absolute path.
    instance: str = ""
    #: Score prompts with the packaged local classifier (rule kind ``classifier``), in batches.
    classifier: bool = False
    #: POST each alert (JSON, HMAC-SHA256 signed) to this URL; empty: no webhook.
    webhook_url: str = ""
    #: The webhook's HMAC key: ``{ env = "NAME" }`` or ``{ file = "/path" }``.
    webhook_secret: Secret | None = None
    #: Seconds a webhook POST may take; failed POSTs are retried 3 times, then counted and logged.
    webhook_timeout_s: float = 5.0
    #: Most entries evaluated in one batch (one Redis round trip per batch).
    batch_max: int = 2000

    def __post_init__(self) -> None:
        if self.batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        if self.webhook_url and self.webhook_secret is None:
            raise ValueError("webhook_url needs webhook_secret (the HMAC key)")
