"""Fixtures shared with the collector tests."""

from tests.collect.conftest import pg_prefix

__all__ = ["pg_prefix"]
