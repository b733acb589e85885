"""Bad inputs to the sequence-parallel entry points, one test each.

Ranks that disagree (shapes, dtypes, heads, causal, layout, algorithm, scale, lengths, ...) must
all raise the SAME ValueError naming the disagreement, within seconds (one metadata all_gather,
no ring step runs), and leave the group usable: each scenario ends with a correct call on the
same group. Local problems (a rank's q on another device than its k, a backend that cannot run)
are reported by every rank too, so no rank is left waiting in a collective.
"""
import re
import time

import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp


def _inputs(rank, *, B=1, n=None, hq=4, hkv=2, D=8, dtype=torch.float32, seed=0):
    n = n if n is not None else 5 + (rank == 0)  # contiguous over 2 ranks of 11 tokens: [6, 5]
    g = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(B, n, hq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, n, hkv, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _scenario(name, rank):
    """(fn, args, kwargs) of this rank's call in scenario `name`."""
    fn, kw = sp.sequence_parallel_attention, dict(causal=True, algorithm="ring")
    q, k, v = _inputs(rank)
    if name == "head_dim":
        q, k, v = _inputs(rank, D=8 if rank == 0 else 16)
    elif name == "dtype":
        q, k, v = _inputs(rank, dtype=torch.float32 if rank == 0 else torch.bfloat16)
    elif name == "v_head_dim":  # MLA-style v head dims (may differ from q/k's), but not across ranks
        v = torch.randn(*v.shape[:3], 4 if rank == 0 else 12)
    elif name == "v_heads":
        if rank == 1:
            v = v[:, :, :1]
    elif name == "heads_q":
        q, k, v = _inputs(rank, hq=4 if rank == 0 else 2)
    elif name == "heads_kv":
        q, k, v = _inputs(rank, hkv=2 if rank == 0 else 1)
    elif name == "batch":
        q, k, v = _inputs(rank, B=1 if rank == 0 else 2)
    elif name == "causal":
        kw["causal"] = rank == 0
    elif name == "layout":
        kw["layout"] = "contiguous" if rank == 0 else "zigzag"
    elif name == "algorithm":
        fn, kw = (sp.ring_attention if rank == 0 else sp.token_ring_attention), dict(causal=True)
    elif name == "softmax_scale":
        kw["softmax_scale"] = 0.3 if rank == 0 else None
    elif name == "requires_grad":
        q.requires_grad_(rank == 0)
    elif name == "lse_grad":
        kw.update(return_lse=True, lse_grad=rank == 0)
    elif name == "lengths_vs_layout":
        q, k, v = _inputs(rank, n=5 + (rank == 1))  # [5, 6] but 11 tokens contiguous is [6, 5]
    elif name == "too_short":
        q, k, v = _inputs(rank, n=1)
        kw["layout"] = "zigzag"  # 2 tokens over 2 ranks zigzag: 4 chunks, needs >= 4 tokens
    elif name == "q_k_lengths":
        if rank == 1:
            k, v = k[:, :4], v[:, :4]
    elif name == "heads_not_multiple":
        q, k, v = _inputs(rank, hq=3, hkv=2)
    elif name == "devices":
        if rank == 1:
            k = k.to("meta")
    elif name == "backend":
        kw["backend"] = "flash"  # a CUDA kernel; these are CPU tensors
    elif name == "unknown_layout":
        kw["layout"] = "zigzag" if rank == 0 else "striped"
    elif name == "not_4d":
        if rank == 1:
            q = q[0]
    elif name == "integer":
        if rank == 0:
            q = q.to(torch.int32)
    elif name == "bad_scale":
        kw["softmax_scale"] = -1.0
    elif name == "softcap":
        kw["softcap"] = 30.0 if rank == 0 else None
    elif name == "bad_softcap":
        kw["softcap"] = float("nan") if rank == 1 else 2.0
    return fn, (q, k, v), kw


def _attempt(name):
    rank = dist.get_rank()
    fn, args, kw = _scenario(name, rank)
    t0 = time.monotonic()
    try:
        fn(*args, **kw)
        outcome = ("no error", "")
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        outcome = (type(e).__name__, str(e))
    elapsed = time.monotonic() - t0
    # The group must still work: a correct call right after.
    q, k, v = _inputs(rank, seed=9)
    out = sp.sequence_parallel_attention(q, k, v, causal=True)
    return outcome + (elapsed, tuple(out.shape))


def _check(dist_pool, name, *must_contain, same_on_every_rank=True):
    results = dist_pool(2).run(_attempt, name, timeout=60)
    for rank, (kind, msg, elapsed, shape) in enumerate(results):
        assert kind == "ValueError", (rank, kind, msg)
        for word in must_contain:
            assert word in msg, (rank, word, msg)
        assert elapsed < 10, f"rank {rank} took {elapsed:.1f} s to raise"
        assert shape == (1, 6 - rank, 4, 8)
    if same_on_every_rank:
        assert results[0][1] == results[1][1], results
    return results[0][1]


def test_disagree_head_dim(dist_pool):
    _check(dist_pool, "head_dim", "ranks disagree on head_dim", "rank 0: 8", "rank 1: 16")


def test_disagree_dtype(dist_pool):
    _check(dist_pool, "dtype", "ranks disagree on dtype")


def test_disagree_heads_q(dist_pool):
    _check(dist_pool, "heads_q", "ranks disagree on heads_q", "rank 0: 4", "rank 1: 2")


def test_disagree_heads_kv(dist_pool):
    _check(dist_pool, "heads_kv", "ranks disagree on heads_kv", "rank 0: 2", "rank 1: 1")


def test_disagree_batch(dist_pool):
    _check(dist_pool, "batch", "ranks disagree on batch size")


def test_disagree_causal(dist_pool):
    _check(dist_pool, "causal", "ranks disagree on causal", "rank 0: True", "rank 1: False")


def test_disagree_layout(dist_pool):
    _check(dist_pool, "layout", "ranks disagree on layout", "rank 0: contiguous", "rank 1: zigzag")


def test_disagree_algorithm(dist_pool):
    _check(dist_pool, "algorithm", "ranks disagree on algorithm", "rank 0: ring", "rank 1: token_ring")


def test_disagree_softmax_scale(dist_pool):
    _check(dist_pool, "softmax_scale", "ranks disagree on softmax_scale", "rank 0: 0.3", "rank 1: 0.353553")


def test_disagree_softcap(dist_pool):
    _check(dist_pool, "softcap", "ranks disagree on softcap", "rank 0: 30", "rank 1: none")


def test_bad_softcap_on_one_rank(dist_pool):
    _check(dist_pool, "bad_softcap", "rank 1: softcap must be None, 0 (off) or a finite number > 0")


def test_disagree_requires_grad(dist_pool):
    # One rank would run a backward the other never joins: refuse up front.
    _check(dist_pool, "requires_grad", "whether a backward follows")


def test_disagree_lse_grad(dist_pool):
    # TokenRing's backward payload depends on it (lse's gradient travels with Q): refused up front.
    _check(dist_pool, "lse_grad", "ranks disagree on lse_grad", "rank 0: True", "rank 1: False")


def test_local_lengths_do_not_match_the_layout(dist_pool):
    _check(dist_pool, "lengths_vs_layout", "ranks hold [5, 6] tokens", "[6, 5]")


def test_sequence_too_short(dist_pool):
    _check(dist_pool, "too_short", "ranks hold [1, 1] tokens", "at least 4 tokens")


def test_q_and_k_hold_different_lengths(dist_pool):
    _check(dist_pool, "q_k_lengths", "rank 1: q and k/v must agree on batch and seq_local")


def test_disagree_v_head_dim(dist_pool):
    # v's head dim may differ from q/k's (MLA), so it is agreed on by itself: a rank whose v is
    # narrower would otherwise attend to zero-padded columns of its peers' v (silently wrong)
    _check(dist_pool, "v_head_dim", "ranks disagree on v's head_dim", "rank 0: 4", "rank 1: 12")


def test_k_and_v_with_different_heads(dist_pool):
    _check(dist_pool, "v_heads", "rank 1: k and v must agree on batch, seq_local and heads_kv")


def test_heads_q_not_a_multiple_of_heads_kv(dist_pool):
    _check(dist_pool, "heads_not_multiple", "rank 0: heads_q must be a positive multiple of heads_kv",
           "rank 1: heads_q must be")


def test_tensors_on_different_devices(dist_pool):
    _check(dist_pool, "devices", "rank 1: q, k and v must be on the same device")


def test_backend_cannot_run_inputs(dist_pool):
    msg = _check(dist_pool, "backend", "rank 0: the requested block-attention backend cannot run",
                 "rank 1: the requested", "cpu")
    assert "head_dim 8" in msg


def test_unknown_layout_on_one_rank(dist_pool):
    _check(dist_pool, "unknown_layout", "rank 1: unknown layout")


def test_not_4d_on_one_rank(dist_pool):
    _check(dist_pool, "not_4d", "rank 1: q, k and v must be 4-D")


def test_integer_tensor_on_one_rank(dist_pool):
    _check(dist_pool, "integer", "rank 0: q, k and v must be floating point")


def test_invalid_softmax_scale(dist_pool):
    _check(dist_pool, "bad_scale", "softmax_scale must be a finite number > 0")


# --- the documented fallback: non-contiguous inputs are accepted (copied once) -----------------
def _non_contiguous():
    rank = dist.get_rank()
    q, k, v = _inputs(rank, B=2)
    res = []
    for alg in ("ring", "token_ring"):
        want = sp.sequence_parallel_attention(q, k, v, causal=True, algorithm=alg)
        # (B, H, S, D) storage seen as (B, S, H, D): what an HF attention module hands over.
        qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not qt.is_contiguous()
        qt.requires_grad_()
        got = sp.sequence_parallel_attention(qt, kt, vt, causal=True, algorithm=alg)
        got.sum().backward()
        res.append((torch.equal(got, want), qt.grad is not None and qt.grad.shape == q.shape))
    return res


def test_non_contiguous_inputs_are_accepted(dist_pool):
    for per_rank in dist_pool(2).run(_non_contiguous, timeout=60):
        assert all(ok and grad_ok for ok, grad_ok in per_rank), per_rank


# --- a process outside the group ----------------------------------------------------------------
def _outside_group():
    group = dist.new_group([1])
    q, k, v = _inputs(0)
    if dist.get_rank() == 1:
        return tuple(sp.ring_attention(q, k, v, group=group).shape)  # a world of one
    try:
        sp.ring_attention(q, k, v, group=group)
    except ValueError as e:
        return str(e)
    return "no error"


def test_rank_outside_the_group(dist_pool):
    msg, shape = dist_pool(2).run(_outside_group, timeout=60)
    assert "not a member" in msg, msg
    assert shape == (1, 6, 4, 8)


def test_unknown_algorithm_single_process():
    q, k, v = _inputs(0)
    with pytest.raises(ValueError, match="unknown algorithm"):
        sp.sequence_parallel_attention(q, k, v, algorithm="striped")


# --- ranks that pass different groups (or call in a different order) -----------------------------
# No collective can compare groups that never meet, so the signature exchange times out instead
# (RINGATTN_SYNC_TIMEOUT_S, set short here): a RuntimeError naming the group, never a hang.
def _different_groups(scenario):
    import os

    os.environ["RINGATTN_SYNC_TIMEOUT_S"] = "3"
    rank = dist.get_rank()
    alone = dist.new_group([1])      # collective: every rank makes both groups
    same_ranks = dist.new_group([0, 1])  # the world's ranks, another communicator
    q, k, v = _inputs(rank)
    if scenario == "one_rank_alone":
        order = [None] if rank == 0 else [alone]
    else:  # "swapped_order": both groups span both ranks, called in opposite orders
        order = [same_ranks, None] if rank == 0 else [None, same_ranks]
    t0 = time.monotonic()
    try:
        for group in order:
            if group is alone:
                q1, k1, v1 = _inputs(rank, n=11)  # a world of one holds the whole sequence
                shape = tuple(sp.ring_attention(q1, k1, v1, group=group).shape)
            else:
                sp.ring_attention(q, k, v, group=group)
                shape = None
        return "no error", shape, time.monotonic() - t0
    except RuntimeError as e:
        return str(e), None, time.monotonic() - t0
    finally:
        del os.environ["RINGATTN_SYNC_TIMEOUT_S"]


@pytest.mark.parametrize("scenario", ["one_rank_alone", "swapped_order"])
def test_ranks_passing_different_groups_raise_instead_of_hanging(dist_pool, scenario):
    try:
        results = dist_pool(2).run(_different_groups, scenario, timeout=60)
    finally:
        dist_pool(2).close(kill=True)  # an abandoned collective stays posted: start a fresh world
    stuck = [0] if scenario == "one_rank_alone" else [0, 1]
    for rank, (msg, shape, elapsed) in enumerate(results):
        if rank not in stuck:  # rank 1 asked for a world of one and got it
            assert msg == "no error" and shape == (1, 11, 4, 8), results[rank]
            continue
        assert re.search(r"waited 3 s in the metadata exchange of call #\d+ on the group", msg), msg
        assert "not every rank of that group joined" in msg and "SAME group" in msg, msg
        assert "global ranks [0, 1]" in msg, msg
        assert 3 <= elapsed < 10, f"rank {rank} raised after {elapsed:.1f} s"


def test_sync_timeout_must_be_positive(monkeypatch):
    monkeypatch.setenv("RINGATTN_SYNC_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="RINGATTN_SYNC_TIMEOUT_S must be > 0"):
        sp.sync_timeout_s()
    monkeypatch.setenv("RINGATTN_SYNC_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="must be a number of seconds"):
        sp.sync_timeout_s()
