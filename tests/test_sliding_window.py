"""Causal sliding-window attention (sliding_window=w: 0 <= q - k < w) in ring attention and TokenRing.

1. Index arithmetic (no processes): documents.window_pieces covers exactly the band of every
   (rows x keys) rectangle, each pair once, by brute force over small ranges; and over every
   (Q owner, K/V owner) pair of both layouts at W = 1..4 the plan's pieces cover exactly the band
   (and the band inside documents with cu_seqlens, and per-row packings).
2. Real gloo processes at W = 1..4: both algorithms and auto x both layouts x windows from 1 to
   beyond the sequence x MHA/GQA/MQA x batch 1/2 x fp32/bf16 x even/uneven lengths (with packed
   documents and lse_grad in some), forward (out, lse) and backward (dq, dk, dv with random
   upstream gradients) against a float64 reference under the band mask, tolerances of
   test_sequence_parallel; the bytes each rank moved against predict_comm_bytes(sliding_window=)
   (TokenRing sends Q rows only to ranks holding keys inside their window).
3. torch.compile: the traced op equals the eager call.
4. Bad sliding_window: the same ValueError on every rank, the group still usable.
"""
import math

import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp
from ringattn.documents import as_documents, window_pieces
from ringattn.layout import RingPlan, SequenceLayout
from test_documents import (allowed, assert_over_ipc, assert_same_error_on_every_rank, bad_call, band,
                            compiled_vs_eager, covered_pieces, patterns, per_row_patterns, reference,
                            run_cases_over_ipc, run_doc_case)
from test_sequence_parallel import positions


def piece_mask(p):
    sub = torch.ones(p.q_len, p.kv_len, dtype=torch.long)
    if p.flip:
        return sub.triu()   # anti-causal square: row i sees keys j >= i
    return sub.tril() if p.causal else sub


# --- 1. pieces cover exactly the band ---------------------------------------------------------
def test_window_pieces_cover_exactly_the_band_brute_force():
    for a in range(0, 7):
        for n in range(1, 6):
            for c in range(0, 7):
                for m in range(1, 6):
                    for w in range(1, 10):
                        got = torch.zeros(n, m, dtype=torch.long)
                        for pa, pn, pc, pm, causal, flip in window_pieces(a, n, c, m, w):
                            assert a <= pa and pa + pn <= a + n and c <= pc and pc + pm <= c + m
                            if causal:
                                assert pn == pm  # squares only: every backend runs them
                            sub = torch.ones(pn, pm, dtype=torch.long)
                            sub = sub.triu() if flip else sub.tril() if causal else sub
                            got[pa - a:pa - a + pn, pc - c:pc - c + pm] += sub
                        qq = torch.arange(a, a + n)[:, None]
                        kk = torch.arange(c, c + m)[None, :]
                        want = ((qq - kk >= 0) & (qq - kk < w)).long()
                        assert torch.equal(got, want), (a, n, c, m, w, got, want)


def test_window_pieces_count_is_about_two_per_window_of_rows():
    # an 8k chunk against itself with a 4k window: 2 squares per tile of w-1 rows, plus the start
    ps = window_pieces(0, 8192, 0, 8192, 4096)
    assert len(ps) <= 2 * math.ceil(8192 / 4095) + 2, len(ps)
    assert sum(p[1] * p[3] for p in ps if not p[4]) + sum(p[1] * (p[1] + 1) // 2 for p in ps if p[4]) > 0


def test_band_tiles_into_a_few_batched_pieces():
    """documents.tile_pieces: the band's equal squares along the diagonal become one piece each
    (the causal ones, the anti-causal ones), so a block costs a few block-attention calls
    whatever its length; the tiles cover what the untiled pieces covered."""
    from ringattn.documents import tile_pieces

    for L, w in ((8192, 512), (131072, 4096), (64, 4)):
        plan = RingPlan(None, 0, 1, SequenceLayout.build(L, 1, "contiguous"), True, 1.0, "math", None, w)
        ps = plan.block(0, 0).pieces
        assert len(ps) <= 6, (L, w, ps)
        assert max(p.tiles for p in ps) >= (L - w) // (w - 1) - 1, ps
        raw = window_pieces(0, L, 0, L, w)
        expanded = sorted((p.q_off + t * p.q_len, p.q_len, p.kv_off + t * p.kv_len, p.kv_len, p.causal, p.flip)
                          for p in ps for t in range(p.tiles))
        assert expanded == sorted(raw), (L, w)
    # pieces that do not line up stay apart: a gap, another shape, another mask
    assert tile_pieces([(0, 2, 0, 2, True, False), (3, 2, 3, 2, True, False)]) == \
        [(0, 2, 0, 2, True, False, 1), (3, 2, 3, 2, True, False, 1)]
    assert tile_pieces([(0, 2, 0, 2, True, False), (2, 3, 2, 3, True, False)])[1][6] == 1
    assert tile_pieces([(0, 2, 0, 2, True, False), (2, 2, 2, 2, False, False)])[1][6] == 1
    assert tile_pieces([(0, 2, 0, 2, True, False), (2, 2, 2, 2, True, False), (4, 2, 4, 2, True, False)]) == \
        [(0, 2, 0, 2, True, False, 3)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_pieces_cover_exactly_the_band(layout, world):
    for L in (4 * world, 4 * world + 3, 9 * world + 1):
        lay = SequenceLayout.build(L, world, layout)
        for w in sorted({1, 2, 3, 5, max(1, L // (2 * world)), L // 2, L - 1}):
            for name, cu in (("plain", None), *list(patterns(L, L + w).items())[:2]):
                docs = tuple(cu) if cu is not None and len(cu) > 2 else None
                plan = RingPlan(None, 0, world, lay, True, 1.0, "math", docs, w)
                got = torch.zeros(L, L, dtype=torch.long)
                for p, qs, ks in covered_pieces(plan, lay, world, name):
                    got[qs[:, None], ks[None, :]] += piece_mask(p)
                want = band(L, w) & (allowed(cu, L, True) if cu is not None else True)
                assert torch.equal(got, want.long()), (layout, world, L, w, name,
                                                       (got - want.long()).nonzero()[:5].tolist())


def test_per_row_packings_with_a_window_cover_each_rows_band():
    world, layout = 3, "zigzag"
    L, B, w = 31, 3, 4
    lay = SequenceLayout.build(L, world, layout)
    rows = per_row_patterns(L, B, 7)
    docs, _ = as_documents(rows)
    plan = RingPlan(None, 0, world, lay, True, 1.0, "math", docs, w)
    got = torch.zeros(B, L, L, dtype=torch.long)
    for p, qs, ks in covered_pieces(plan, lay, world, rows):
        for b in (range(B) if p.nb == 0 else range(p.b0, p.b0 + p.nb)):
            got[b, qs[:, None], ks[None, :]] += piece_mask(p)
    want = (allowed(rows, L, True).squeeze(1) & band(L, w)).long()
    assert torch.equal(got, want)


def test_far_blocks_are_skipped_and_tokenring_sends_less():
    # contiguous, window inside one chunk: only the diagonal and the previous rank's block remain
    lay = SequenceLayout.build(64, 4, "contiguous")
    plan = RingPlan(None, 0, 4, lay, True, 1.0, "math", None, 5)
    live = {(i, j) for i in range(4) for j in range(4) if plan.block(i, j) is not None}
    assert live == {(i, i) for i in range(4)} | {(i, i - 1) for i in range(1, 4)}, live
    # the previous rank's block keeps only the window's reach: 4 query rows x 4 key rows
    blk = plan.block(2, 1)
    assert (blk.q_start, blk.q_len, blk.kv_start, blk.kv_len) == (0, 4, 12, 4), blk
    kw = dict(seq_len=64, world_size=4, layout="contiguous", causal=True, batch=1, heads_q=8, heads_kv=8,
              head_dim=16)
    full = sp.predict_comm_bytes("token_ring", **kw)
    win = sp.predict_comm_bytes("token_ring", **kw, sliding_window=5)
    assert all(win[r]["fwd.q"][0] < full[r]["fwd.q"][0] for r in range(1, 4)), (win, full)
    assert win[1]["fwd.q"][0] == 1 * 4 * 8 * 16 * 2  # rank 1 sends its first 4 rows to rank 0 (bf16)
    ch = sp.choose_algorithm(**kw, sliding_window=5, candidates=sp.ALGORITHMS)  # between the rings
    assert ch.algorithm == "token_ring" and "sliding window 5" in ch.reason, ch
    # KV rotation stops after one step (no rank needs keys from two ranks back): K/V move one
    # hop, the dK/dV sums two (one step, then home), instead of W - 1 and W; and only the rows
    # the next rank's window reaches travel: the last 4 of each chunk, none of the last rank's
    plan = RingPlan(None, 0, 4, lay, True, 1.0, "math", None, 5)
    assert plan.ring_steps == 1 and plan.kv_ranges == ((12, 4), (12, 4), (12, 4), (0, 0))
    ring_full = sp.predict_comm_bytes("ring", **kw)
    ring_win = sp.predict_comm_bytes("ring", **kw, sliding_window=5)
    e, per = 2, 2 * 1 * 8 * 16  # bf16; k and v of one token
    m = (4, 4, 4, 0)
    for r in range(4):
        assert ring_win[r]["fwd.kv"] == (per * e * m[r], per * e * m[r - 1]), ring_win[r]
        assert ring_win[r]["bwd.dkv"] == (per * 4 * (m[r] + m[r - 1]),) * 2, ring_win[r]
        # no window, causal contiguous: a block stops after rank W-1 -- rank r < 3 forwards blocks
        # 0..r, rank 3 nothing (rank 0 sees none of it); rank r receives blocks 0..r-1
        assert ring_full[r]["fwd.kv"] == (per * e * 16 * (r + 1 if r < 3 else 0), per * e * 16 * r), ring_full[r]
    zig = RingPlan(None, 0, 4, SequenceLayout.build(64, 4, "zigzag"), True, 1.0, "math", None, 5)
    assert zig.ring_steps == 3  # zigzag: each late chunk needs the next rank's late chunk (distance W-1)
    # a window reaching the whole sequence is plain causal attention
    assert sp.choose_algorithm(**kw, sliding_window=64) == sp.choose_algorithm(**kw)
    assert sp.predict_comm_bytes("token_ring", **kw, sliding_window=1000) == full
    with pytest.raises(ValueError, match="needs causal=True"):
        sp.predict_comm_bytes("ring", **dict(kw, causal=False), sliding_window=5)
    with pytest.raises(ValueError, match="int >= 1"):
        sp.choose_algorithm(**kw, sliding_window=0)


# --- 2. against float64 on real processes (test_documents.run_doc_case with a window) ---------
def window_cases(world):
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for alg in ("ring", "token_ring"):
            for layout in ("contiguous", "zigzag"):
                for L in (6 * world, 7 * world - 1):
                    chunk = L // (world if layout == "contiguous" else 2 * world)
                    windows = (1, 3, chunk + 2, L - 2) if dtype == torch.float32 else (chunk + 1,)
                    for w in windows:
                        hq, hkv = ((4, 2), (4, 4), (2, 1))[i % 3]
                        cases.append(dict(alg=alg, causal=True, layout=layout, seq_len=L, cu=None, window=w,
                                          hq=hq, hkv=hkv, batch=1 + i % 2, head_dim=8, dtype=dtype,
                                          lse_grad=i % 5 == 1, as_tensor=False, seed=7000 + i,
                                          tiles=("batched", "per_tile")[i % 2]))
                        i += 1
    L = 7 * world - 1
    # auto; a window beyond the sequence (plain causal); documents inside the window; per-row packings
    cases.append(dict(cases[0], alg="auto", seq_len=L, window=4, seed=7001 + i))
    cases.append(dict(cases[1], alg="token_ring", seq_len=L, window=L + 5, seed=7002 + i))
    cases.append(dict(cases[2], alg="ring", layout="zigzag", seq_len=L, window=5, cu=patterns(L, 3)["random"],
                      as_tensor=True, seed=7003 + i))
    cases.append(dict(cases[3], alg="token_ring", layout="contiguous", seq_len=L, window=3, batch=2,
                      cu=per_row_patterns(L, 2, world), lse_grad=True, seed=7004 + i))
    # long bands: many tiles per tiled piece (batch 2: the tiles are copied into batch rows)
    for tiles in ("batched", "per_tile"):
        cases.append(dict(cases[0], alg="ring", layout="contiguous", seq_len=16 * world, window=4, batch=2, hq=4,
                          hkv=2, lse_grad=True, seed=7005 + i, tiles=tiles))
        cases.append(dict(cases[0], alg="token_ring", layout="zigzag", seq_len=16 * world + 1, window=3, batch=2,
                          hq=2, hkv=1, seed=7006 + i, tiles=tiles))
    return cases


def _run_windows(world):
    return [f for c in window_cases(world) if (f := run_doc_case(c)) is not None]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sliding_window_against_float64_reference(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_windows, world, timeout=300) for f in r]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:30])


def _run_windows_over_ipc(kind):
    """A sample of the cases over the CUDA-IPC transport: "host-sim" (CPU) or "cuda" (GPU, bf16)."""
    return run_cases_over_ipc(kind, window_cases(dist.get_world_size()),
                              lambda i, c: kind == "cuda" or i % 3 == 0)


def test_sliding_window_over_the_cuda_ipc_host_simulation(dist_pool):
    assert_over_ipc(_run_windows_over_ipc, "host-sim", 3, 5, dist_pool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", (2, 4))
def test_gpu_sliding_window_ranks_sharing_one_gpu(world):
    assert_over_ipc(_run_windows_over_ipc, "cuda", world, 4)


# --- 3. torch.compile -------------------------------------------------------------------------
def _run_compiled_window():
    rank = dist.get_rank()
    torch._dynamo.reset()
    L, w = 13, 4
    fn = lambda q, k, v: sp.sequence_parallel_attention(q, k, v, causal=True, layout="zigzag",  # noqa: E731
                                                         algorithm="token_ring", sliding_window=w)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(1, L, 2, 8, generator=g) for _ in range(4)]
    failures, (out, *_) = compiled_vs_eager(compiled, fn, full, (), f"window {w}")
    # and the eager call is the windowed attention, not plain causal
    want = reference(*(t.double() for t in full[:3]), band(L, w), 1 / math.sqrt(8))[0][:, positions(L, 2, "zigzag", rank)]
    if not torch.allclose(out.double(), want, atol=1e-5):
        failures.append(f"rank {rank}: eager windowed output differs from the reference")
    return failures


def test_sliding_window_compiled(dist_pool):
    failures = [f for r in dist_pool(2).run(_run_compiled_window, timeout=180) for f in r]
    assert not failures, "\n".join(failures)


# --- 4. bad sliding_window --------------------------------------------------------------------
def _bad(scenario):
    rank = dist.get_rank()
    w = {"not_causal": 4, "zero": 0, "negative": -2, "float": 4.0, "bool": True,
         "disagree": 4 if rank == 0 else 5, "one_rank_none": 4 if rank == 0 else None}[scenario]
    return bad_call(causal=scenario != "not_causal", sliding_window=w, recover=dict(sliding_window=3))


@pytest.mark.parametrize("scenario, words", [
    ("not_causal", ("rank 0: sliding_window", "rank 1: sliding_window", "causal=True")),
    ("zero", ("rank 0: sliding_window",)),
    ("negative", ("rank 1: sliding_window",)),
    ("float", ("rank 0: sliding_window",)),
    ("bool", ("rank 0: sliding_window",)),
    ("disagree", ("ranks disagree on sliding_window", "rank 0: 4, rank 1: 5")),
    ("one_rank_none", ("ranks disagree on sliding_window", "rank 1: -1")),
])
def test_bad_sliding_window_raises_on_every_rank(dist_pool, scenario, words):
    assert_same_error_on_every_rank(dist_pool(2).run(_bad, scenario, timeout=60), words)
