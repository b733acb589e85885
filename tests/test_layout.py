"""ringattn.layout: chunk tables (even and uneven), the causal block rule against a brute-force
mask, and shard_sequence / gather_sequence (exact inverses, autograd) on real gloo ranks."""
import pytest
import torch
import torch.distributed as dist

from ringattn import layout as L


def test_split_sizes_earlier_chunks_take_the_extra_tokens():
    assert L.split_sizes(13, 4) == [4, 3, 3, 3]
    assert L.split_sizes(15, 4) == [4, 4, 4, 3]
    assert L.split_sizes(8, 4) == [2, 2, 2, 2]


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3, 4, 5))
def test_segments_partition_the_sequence(layout, world):
    for seq_len in range(L.min_seq_len(world, layout), 4 * world + 3):
        lay = L.SequenceLayout.build(seq_len, world, layout)
        pos = torch.cat([lay.positions(r) for r in range(world)])
        assert sorted(pos.tolist()) == list(range(seq_len))  # every token exactly once
        sizes = lay.chunk_sizes
        assert max(sizes) - min(sizes) <= 1 and list(sizes) == sorted(sizes, reverse=True)
        for r in range(world):
            p = lay.positions(r)
            assert bool((p[1:] > p[:-1]).all()), "local order must be global order (diagonal causal mask)"
            assert len(p) == lay.local_len(r) == lay.local_lengths[r]


def test_zigzag_pairs_first_and_last_chunks():
    lay = L.SequenceLayout.build(13, 2, "zigzag")  # chunks 4, 3, 3, 3 -> r0 = c0 + c3, r1 = c1 + c2
    assert lay.segments(0) == [(0, 4), (10, 3)]
    assert lay.segments(1) == [(4, 3), (7, 3)]
    assert lay.local_lengths == (7, 6)


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_too_short_sequences_raise_naming_the_minimum(layout):
    need = 3 if layout == "contiguous" else 6
    with pytest.raises(ValueError, match=f"at least {need} tokens"):
        L.SequenceLayout.build(need - 1, 3, layout)
    L.SequenceLayout.build(need, 3, layout)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        L.SequenceLayout.build(10, 2, "striped")


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3, 4))
@pytest.mark.parametrize("causal", (False, True))
def test_attention_block_is_exactly_the_unmasked_part(layout, world, causal):
    """For every (Q owner, K/V owner) pair, the block covers exactly the (query, key) pairs the
    global mask allows: nothing visible is left out, and only fully masked rows/cols are cut."""
    for seq_len in (L.min_seq_len(world, layout), 7 * world - 1, 6 * world):
        lay = L.SequenceLayout.build(seq_len, world, layout)
        for i in range(world):
            for j in range(world):
                pi, pj = lay.positions(i), lay.positions(j)
                visible = pj[None, :] <= pi[:, None] if causal else torch.ones(len(pi), len(pj), dtype=torch.bool)
                blk = L.attention_block(lay, i, j, causal)
                if blk is None:
                    assert not visible.any(), (seq_len, i, j)
                    continue
                inside = torch.zeros_like(visible)
                sub = inside[blk.q_start:blk.q_start + blk.q_len, blk.kv_start:blk.kv_start + blk.kv_len]
                if blk.causal:
                    assert blk.q_len == blk.kv_len and i == j
                    sub.copy_(torch.ones(blk.q_len, blk.kv_len, dtype=torch.bool).tril())
                else:
                    sub.fill_(True)
                assert torch.equal(inside, visible), (layout, seq_len, i, j, blk)


# --- shard / gather on real ranks ---------------------------------------------------------------
def _shard_gather(seq_lens):
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for layout in L.LAYOUTS:
        for n in seq_lens:
            if n < L.min_seq_len(world, layout):
                continue
            for dim in (1, -2, 0):
                shape = [2, 3, 4]
                shape[dim] = n
                gen = torch.Generator().manual_seed(n)
                x = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
                loc = L.shard_sequence(x, dim=dim, layout=layout)
                want_rows = L.SequenceLayout.build(n, world, layout).positions(rank)
                if not torch.equal(loc, x.detach().index_select(dim, want_rows)):
                    failures.append(f"shard {layout} n={n} dim={dim}")
                full = L.gather_sequence(loc, dim=dim, layout=layout)
                if not torch.equal(full, x.detach()):
                    failures.append(f"gather(shard(x)) != x {layout} n={n} dim={dim}")
                if not torch.equal(L.shard_sequence(full, dim=dim, layout=layout), loc.detach()):
                    failures.append(f"shard(gather(x_local)) != x_local {layout} n={n} dim={dim}")
                # Autograd, sum convention: loss = sum over ranks of <full, w_rank>.
                w = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
                (full * w).sum().backward()
                w_sum = w.clone()
                dist.all_reduce(w_sum)
                want = torch.zeros_like(w_sum)
                want.index_copy_(dim, want_rows, w_sum.index_select(dim, want_rows))
                if not torch.allclose(x.grad, want, atol=1e-12):
                    failures.append(f"grad {layout} n={n} dim={dim}")
    return failures


@pytest.mark.parametrize("world", (2, 3, 4))
def test_shard_gather_round_trip_and_autograd(dist_pool, world):
    lens = (world, 2 * world, 2 * world + 1, 7 * world - 1, 8 * world)
    failures = [f for r in dist_pool(world).run(_shard_gather, lens, timeout=120) for f in r]
    assert not failures, failures


def test_shard_gather_single_process_world():
    x = torch.arange(10.0).view(1, 10)
    assert torch.equal(L.gather_sequence(L.shard_sequence(x, dim=1, layout="zigzag"), dim=1, layout="zigzag"), x)


def _gather_mismatch():
    rank = dist.get_rank()
    x = torch.zeros(2, 5, 3 + rank)  # ranks disagree on a non-sequence dim
    try:
        L.gather_sequence(x, dim=1)
    except ValueError as e:
        return str(e)
    return "no error"


def test_gather_rejects_mismatched_shapes_on_every_rank(dist_pool):
    msgs = dist_pool(2).run(_gather_mismatch, timeout=30)
    assert msgs[0] == msgs[1] and "disagree" in msgs[0], msgs


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_kv_hops_of_plain_masks_written_from_the_chunk_table(layout):
    """RingPlan.kv_hops without windows / documents: non-causal, every hop carries the whole
    chunk. Causal contiguous: a block travels whole while a rank after it is still ahead (hop h
    reaches j+h <= W-1), then nothing (the earlier ranks see none of it). Causal zigzag: K/V go
    the other way (direction -1, W > 2), earlier ranks (need all of a block) first, then the
    later ones, which see only its first chunk: hop h of block j (to j-h) whole while h <= j."""
    for W in range(1, 6):
        for n_tok in (2 * W, 2 * W + 1, 7 * W + 3):
            lay = L.SequenceLayout.build(n_tok, W, layout)
            for causal in (False, True):
                plan = L.RingPlan(None, 0, W, lay, causal, 1.0, "auto")
                assert plan.ring_steps == W - 1
                for j in range(W):
                    n = lay.local_len(j)
                    if not causal:
                        want = ((0, n),) * (W - 1)
                    elif layout == "contiguous":
                        want = tuple((0, n) if j + h <= W - 1 else (0, 0) for h in range(1, W))
                    else:
                        assert plan.direction == (-1 if causal and W > 2 else 1)
                        want = tuple((0, n) if h <= j else (0, lay.first_len(j)) for h in range(1, W))
                    assert plan.kv_hops[j] == want, (W, n_tok, causal, j, plan.kv_hops[j])
                    assert plan.kv_ranges[j] == (want[0] if want else (0, 0))
