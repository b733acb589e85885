import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dist_pool import DistPool  # noqa: E402

# JIT-built extensions (DeepSpeed's CPU shared-memory comm op) go to a directory of this checkout
# and torch version, not the shared ~/.cache/torch_extensions/py311_cu130: there CI's torch 2.14
# and 2.11 legs rebuilt each other's op inside the rank processes, and a rank pool killed by its
# timeout mid-build left the build `lock` behind, which hung every later DeepSpeed start on every
# rank (2026-12-02). Set before any rank process is spawned, so ranks inherit it.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    import torch as _torch

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "torch_extensions",
        "torch-" + _torch.__version__.replace("+", "_"))

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


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """Build DeepSpeed's JIT ops that its CPU accelerator loads at init_distributed (the shared-
    memory comm op, ~1 min on 2 cores) once, here, before rank processes need them: a build inside
    ranks counts against their timeout, and a rank killed mid-build leaves a stale lock (above).
    A lock in this session's private directory older than 10 min is such a leftover: removed."""
    try:
        from deepspeed.comm.torch import build_shm_op  # what TorchBackend.__init__ calls
    except Exception:  # noqa: BLE001 - not installed, or a broken accelerator probe
        return
    import ringattn.integrations.deepspeed as rds

    for lock in rds.stale_jit_locks(max_age_s=600):
        os.remove(lock)
    build_shm_op()  # None where the accelerator has no such op (CUDA)
