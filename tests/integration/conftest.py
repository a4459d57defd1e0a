"""Fixtures shared by the integration tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from launcher.stack import start_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server per test module, on a free port, stopped after it. No key prefix of its
    own: each test uses its own prefix (or its own keys), so tests of a module share it safely. A
    module that needs a fresh server per test defines its own ``redis_url``."""
    proc, url = start_redis(workdir=tmp_path_factory.mktemp("redis"), key_prefix=None)
    yield url
    proc.stop()
