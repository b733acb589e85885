import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dist_pool import DistPool  # noqa: E402

_pools: dict[int, DistPool] = {}


def get_pool(world_size: int) -> DistPool:
    """One pool of real gloo processes per world size, shared by the whole test session."""
    if world_size not in _pools:
        _pools[world_size] = DistPool(world_size)
    return _pools[world_size]


@pytest.fixture(scope="session")
def dist_pool():
    return get_pool


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
