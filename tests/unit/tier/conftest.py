"""Fixtures for the tier tests: stores on real files under tmp_path."""

from __future__ import annotations

import logging

import pytest

from sgl_kvtier.tier import ChunkStore, StoreConfig
from sgl_kvtier.tier._log import forget_logged


@pytest.fixture(autouse=True)
def _log_once_per_test():
    """Each test sees its own first occurrence of every logged-once problem."""
    forget_logged()
    yield
    forget_logged()


@pytest.fixture
def open_store(tmp_path):
    """Factory of stores under ``tmp_path/tier`` that are closed when the test ends."""
    stores = []

    def _open(**overrides) -> ChunkStore:
        settings = {"root": tmp_path / "tier", "capacity_bytes": 1 << 30, "admission": "always",
                    **overrides}
        store = ChunkStore(StoreConfig(**settings))
        stores.append(store)
        return store

    yield _open
    for store in stores:
        store.close()


@pytest.fixture
def tier_log(caplog):
    caplog.set_level(logging.INFO, logger="sgl_kvtier")
    return caplog
