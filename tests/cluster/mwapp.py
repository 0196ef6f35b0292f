"""A middleware-mode replica for the cluster test: an ASGI app wrapped in ``AuditMiddleware`` the way
vLLM's ``--middleware`` wraps its own FastAPI app (no arguments: the configuration comes from
``VLLM_AUDIT_CONFIG`` and ``VLLM_AUDIT_OVERRIDES``). The app is the demo engine, not vLLM.

Run: ``python -m uvicorn tests.cluster.mwapp:create_app --factory``.
"""

from __future__ import annotations

from vllm_audit.config import config_from_env
from vllm_audit.demo import DemoEngine
from vllm_audit.middleware import AuditMiddleware


def create_app() -> AuditMiddleware:
    config = config_from_env()
    return AuditMiddleware(DemoEngine(config.gateway))
