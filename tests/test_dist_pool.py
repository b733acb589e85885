"""The harness itself: results per rank, errors surface, hangs become failures."""
import pytest
import torch
import torch.distributed as dist

from dist_pool import DistFailure, DistPool


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _raise_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    return "ok"


def _hang_on_rank0():
    if dist.get_rank() == 0:
        import time

        time.sleep(60)
    return "ok"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_pool_runs_collectives(dist_pool, world_size):
    out = dist_pool(world_size).run(_allreduce_rank)
    total = sum(range(world_size))
    assert out == [(r, world_size, float(total)) for r in range(world_size)]


def test_pool_reports_rank_errors():
    pool = DistPool(2)
    try:
        with pytest.raises(DistFailure, match="(?s)rank 1 raised:.*boom from rank 1"):
            pool.run(_raise_on_rank1, timeout=30)
        # the pool respawns after a failure
        assert pool.run(_allreduce_rank)[1] == (1, 2, 1.0)
    finally:
        pool.close()


def test_pool_turns_hang_into_failure():
    pool = DistPool(2)
    try:
        pool.run(_allreduce_rank)  # start-up (imports) must not count against the 3 s below
        with pytest.raises(DistFailure, match=r"ranks \[0\] did not finish within 3 s"):
            pool.run(_hang_on_rank0, timeout=3)
    finally:
        pool.close(kill=True)
