"""The control group: where each call's metadata collectives run (comm.control_group).

On an NCCL-only group the signature exchange would be an NCCL all_gather plus a device-to-host
copy -- a host synchronisation per call. ringattn runs it on a gloo twin of the group instead.
No NCCL here (CPU CI), so RINGATTN_CONTROL_GROUP=gloo makes the twin for gloo groups too, and the
tests check that calls then go through the twin (counted) and still compute the same thing,
raise the same errors on every rank, and that sub-groups use a registered twin or themselves."""
import os

import pytest
import torch
import torch.distributed as dist

import ringattn.comm as comm
import ringattn.sequence_parallel as sp
from ringattn.layout import gather_sequence, shard_sequence


def _with_twin():
    os.environ["RINGATTN_CONTROL_GROUP"] = "gloo"
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        g = torch.Generator().manual_seed(5)
        full = [torch.randn(2, 11, 4, 8, generator=g) for _ in range(3)]
        loc = [shard_sequence(t, 1, layout="zigzag") for t in full]
        before = comm.CONTROL_TWIN_USES[("WORLD",)]
        out = sp.sequence_parallel_attention(*loc, causal=True, layout="zigzag", algorithm="token_ring")
        used = comm.CONTROL_TWIN_USES[("WORLD",)] - before
        twin = comm._CONTROL_GROUPS[("WORLD",)][1]
        os.environ["RINGATTN_CONTROL_GROUP"] = "group"
        plain = sp.sequence_parallel_attention(*loc, causal=True, layout="zigzag", algorithm="token_ring")
        os.environ["RINGATTN_CONTROL_GROUP"] = "gloo"
        gathered = gather_sequence(out, 1, layout="zigzag")
        # a disagreement is still the same error on every rank, through the twin
        try:
            sp.ring_attention(*loc, causal=rank == 0)
            err = "no error"
        except ValueError as e:
            err = str(e)
        # the 2-D mode's group factory registers a twin for each ring group (here: U = 1, the ring
        # group spans the world, but is not the default group)
        from ringattn.integrations.deepspeed import make_ulysses_ring_groups
        _, ring = make_ulysses_ring_groups(1)
        n0 = comm.CONTROL_TWIN_USES[comm._group_key(ring)]
        sp.ring_attention(*loc, causal=True, group=ring, layout="zigzag")
        ring_uses = comm.CONTROL_TWIN_USES[comm._group_key(ring)] - n0
        # a sub-group: itself unless a twin is registered (registration is every rank's setup call)
        sub_ranks = list(range(world - 1)) if world > 2 else list(range(world))
        sub = dist.new_group(sub_ranks)
        sub_twin = dist.new_group(sub_ranks, backend="gloo")
        res = {"used": used, "twin_is_world": twin is dist.GroupMember.WORLD or twin is None,
               "equal": torch.equal(out, plain), "gathered_ok": gathered.shape[1] == 11, "error": err,
               "ring_uses": ring_uses}
        if rank in sub_ranks:
            key = comm._group_key(sub)
            x = [t[:, :len(sub_ranks) * 3] for t in full]
            xl = [shard_sequence(t, 1, group=sub) for t in x]
            n0 = comm.CONTROL_TWIN_USES[key]
            sp.ring_attention(*xl, causal=True, group=sub)
            res["sub_unregistered_uses"] = comm.CONTROL_TWIN_USES[key] - n0
            comm.register_control_group(sub, sub_twin)
            sp.ring_attention(*xl, causal=True, group=sub)
            res["sub_registered_uses"] = comm.CONTROL_TWIN_USES[key] - n0
            if len(sub_ranks) < world:  # a twin over other ranks is refused
                try:
                    comm.register_control_group(sub, dist.GroupMember.WORLD)
                    res["bad_register"] = "no error"
                except ValueError as e:
                    res["bad_register"] = str(e)
        return res
    finally:
        os.environ.pop("RINGATTN_CONTROL_GROUP", None)


@pytest.mark.parametrize("world", [2, 3])
def test_metadata_exchange_runs_on_the_gloo_twin(dist_pool, world):
    results = dist_pool(world).run(_with_twin, timeout=120)
    for rank, r in enumerate(results):
        assert r["used"] >= 1 and not r["twin_is_world"], (rank, r)
        assert r["equal"] and r["gathered_ok"], (rank, r)
        assert "ranks disagree on causal" in r["error"], (rank, r)
        assert r["ring_uses"] == 1, (rank, r)
        if "sub_unregistered_uses" in r:
            sub_world = world - 1 if world > 2 else world
            # another group gets a twin only when one is registered (even one spanning the world)
            assert r["sub_unregistered_uses"] == 0, (rank, r)
            assert r["sub_registered_uses"] >= r["sub_unregistered_uses"] + 1, (rank, r)
            if sub_world < world:
                assert "same ranks" in r["bad_register"], (rank, r)
    assert len({r["error"] for r in results}) == 1


def test_control_group_mode_is_checked(monkeypatch):
    monkeypatch.setenv("RINGATTN_CONTROL_GROUP", "nccl")
    with pytest.raises(ValueError, match="RINGATTN_CONTROL_GROUP must be auto, group or gloo"):
        comm.control_group(None, torch.device("cpu"))
