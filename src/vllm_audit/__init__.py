"""vllm-audit: tamper-evident audit records for vLLM and OpenAI-compatible servers."""

from __future__ import annotations

import typing

__version__ = "0.1.0"

if typing.TYPE_CHECKING:
    from vllm_audit.middleware import AuditMiddleware

__all__ = ["AuditMiddleware", "__version__"]


def __getattr__(name: str) -> typing.Any:
    # Lazy so that `import vllm_audit` (e.g. for the CLI's --version) stays cheap.
    if name == "AuditMiddleware":
        from vllm_audit.middleware import AuditMiddleware

        return AuditMiddleware
    raise AttributeError(f"module 'vllm_audit' has no attribute {name!r}")
