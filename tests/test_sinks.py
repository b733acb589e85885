"""Attention sinks (sinks=: one logit per query head in every row's softmax, gpt-oss; ringattn.sinks).

1. apply_sinks against the appended-column softmax in float64, rows no key reaches, sinks = -inf.
2. Real gloo processes at W = 1..4: both algorithms and auto x both layouts x causal / not x
   sliding windows x packed documents x MHA/GQA/MQA x fp32/bf16 (sinks in fp32 and in the input
   dtype) x lse_grad on/off: out, lse (the sink included), dq, dk, dv and the rank-summed sink
   gradient against float64 with random upstream gradients (test_documents.run_doc_case), and the
   bytes each rank moved against predict_comm_bytes (a sink adds none: the same messages).
3. torch.compile(fullgraph=True): one op forward and backward, the same out and gradients as eager.
4. sharded_kv_attention(sinks=): against float64 over every rank's cache keys, bitwise the same on
   every rank.
5. Bad sinks: the same ValueError on every rank, the group still usable afterwards.
"""
import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp
from ringattn.sinks import apply_sinks
from test_documents import assert_same_error_on_every_rank, bad_call, patterns, run_doc_case
from test_sequence_parallel import positions, tolerance


# --- 1. the rescale itself ------------------------------------------------------------------------
def test_apply_sinks_equals_the_softmax_with_an_appended_column():
    g = torch.Generator().manual_seed(0)
    B, S, H, D, K = 2, 5, 3, 4, 7
    x = torch.randn(B, H, S, K, generator=g, dtype=torch.float64)           # scores
    vals = torch.randn(B, K, H, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(H, generator=g, dtype=torch.float64) * 3
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(x, -1), vals)
    lse = torch.logsumexp(x, -1)
    full = torch.cat([x, sinks.view(1, H, 1, 1).expand(B, H, S, 1)], -1)
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(full, -1)[..., :-1], vals)
    got_out, got_lse = apply_sinks(out, lse, sinks)
    # (the rescale runs in fp32, as on the ring's fp32 lse)
    assert torch.allclose(got_out, want, atol=1e-6, rtol=1e-6), (got_out - want).abs().max()
    assert torch.allclose(got_lse.double(), torch.logsumexp(full, -1), atol=1e-5)
    # rows no key reaches: out 0, lse = the sink; a sink of -inf changes nothing
    empty = torch.full((B, H, S), float("-inf"))
    o, l = apply_sinks(torch.zeros(B, S, H, D), empty, sinks.float())
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(l, sinks.float().view(1, H, 1).expand(B, H, S))
    o, l = apply_sinks(out.float(), lse.float(), torch.full((H,), float("-inf")))
    assert torch.equal(o, out.float()) and torch.equal(l, lse.float())
    o, l = apply_sinks(torch.zeros(B, S, H, D), empty, torch.full((H,), float("-inf")))
    assert not torch.isnan(o).any() and torch.isneginf(l).all()


# --- 2. against float64 on real processes ---------------------------------------------------------
def sink_cases(world):
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for alg in ("ring", "token_ring", "auto"):
            for layout in ("contiguous", "zigzag"):
                for mask in ("causal", "full", "window", "documents"):
                    L = (6 * world, 7 * world - 1)[i % 2]
                    hq, hkv = ((4, 2), (4, 4), (4, 1))[i % 3]
                    cases.append(dict(alg=alg, causal=mask != "full", layout=layout, seq_len=L,
                                      cu=patterns(L, 40 + i)["random"] if mask == "documents" else None,
                                      window=max(1, L // 3) if mask in ("window", "documents") and i % 2 else None,
                                      mask=mask, hq=hq, hkv=hkv, batch=1 + i % 2, head_dim=8, dtype=dtype,
                                      lse_grad=i % 3 == 1, as_tensor=i % 2 == 0, seed=700 + i,
                                      sinks=(torch.float32, dtype)[i % 2]))
                    i += 1
    return cases


def _run_sinks(world):
    return [f for c in sink_cases(world) if (f := run_doc_case(c)) is not None]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sinks_against_float64_reference(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_sinks, world, timeout=300) for f in r]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:30])


def _sinks_matter():
    """The sinks change the output (else test 2 would not see them dropped): a ring call with
    sinks of 0 differs from one without."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=g) for _ in range(3))
    pos = positions(12, world, "zigzag", rank)
    a = sp.ring_attention(*(t[:, pos] for t in (q, k, v)), causal=True, layout="zigzag")
    b = sp.ring_attention(*(t[:, pos] for t in (q, k, v)), causal=True, layout="zigzag", sinks=torch.zeros(2))
    return (a - b).abs().max().item()


def test_sinks_change_the_output(dist_pool):
    assert all(d > 1e-3 for d in dist_pool(2).run(_sinks_matter, timeout=60))


# --- 3. torch.compile -----------------------------------------------------------------------------
def _run_compiled():
    import ringattn.compiled as rc

    rank = dist.get_rank()
    failures = []
    for i, (alg, layout, window) in enumerate((("ring", "zigzag", None), ("token_ring", "contiguous", 5),
                                                ("auto", "zigzag", None))):
        g = torch.Generator().manual_seed(900 + i)
        L = 13
        q, go = (torch.randn(2, L, 4, 8, generator=g) for _ in range(2))
        k, v = (torch.randn(2, L, 2, 8, generator=g) for _ in range(2))
        sinks = torch.randn(4, generator=g)
        pos = positions(L, 2, layout, rank)

        def call(q, k, v, s):
            return sp.sequence_parallel_attention(q, k, v, causal=True, layout=layout, algorithm=alg,
                                                  sliding_window=window, sinks=s)

        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        res = {}
        for mode, f in (("compiled", compiled), ("eager", call)):
            loc = [t[:, pos].clone().requires_grad_() for t in (q, k, v)] + [sinks.clone().requires_grad_()]
            before = dict(rc.CALLS)
            out = f(*loc)
            out.backward(go[:, pos])
            ran = [rc.CALLS[n] - before.get(n, 0) for n in ("sp_attention", "sp_attention_backward")]
            res[mode] = ([out.detach()] + [t.grad for t in loc], ran)
        if res["compiled"][1] != [1, 1]:
            failures.append(f"rank {rank} {alg}: compiled call ran the ops {res['compiled'][1]} times (want 1, 1)")
        for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), res["compiled"][0], res["eager"][0]):
            if not torch.allclose(a, b, atol=1e-6, rtol=1e-6):
                failures.append(f"rank {rank} {alg}: {name} compiled != eager ({(a - b).abs().max().item():.3g})")
    return failures


def test_sinks_compiled(dist_pool):
    failures = [f for r in dist_pool(2).run(_run_compiled, timeout=300) for f in r]
    assert not failures, "\n".join(failures)


# --- 4. sharded KV cache (serving) ----------------------------------------------------------------
def _run_decode(world):
    from ringattn.decode import sharded_kv_attention

    rank = dist.get_rank()
    results = []
    for i, (dtype, hq, hkv, tq, new) in enumerate(((torch.float32, 4, 2, 1, True), (torch.bfloat16, 4, 4, 3, True),
                                                   (torch.float32, 4, 1, 2, False))):
        g = torch.Generator().manual_seed(40 + i)
        B, D, L = 2, 16, 11
        q = torch.randn(B, tq, hq, D, generator=g).to(dtype)
        k, v = (torch.randn(B, L, hkv, D, generator=g).to(dtype) for _ in range(2))
        kn, vn = ((torch.randn(B, tq, hkv, D, generator=g).to(dtype) for _ in range(2)) if new else (None, None))
        sinks = 2 * torch.randn(hq, generator=g)
        lens = [L // world + (r < L % world) for r in range(world)]
        s0 = sum(lens[:rank])
        with torch.no_grad():
            out, lse = sharded_kv_attention(q, k[:, s0:s0 + lens[rank]], v[:, s0:s0 + lens[rank]], k_new=kn,
                                            v_new=vn, softmax_scale=0.25, return_lse=True, sinks=sinks)
        # float64 reference: every key (the new ones causal) and the sink column
        kk, vv = (k, v) if kn is None else (torch.cat([k, kn], 1), torch.cat([v, vn], 1))
        mask = torch.ones(tq, kk.shape[1], dtype=torch.bool)
        if kn is not None:
            mask[:, L:] = torch.ones(tq, tq, dtype=torch.bool).tril()
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double().repeat_interleave(hq // hkv, 2)) * 0.25
        s = torch.cat([s.masked_fill(~mask, float("-inf")), sinks.double().view(1, hq, 1, 1).expand(B, hq, tq, 1)], -1)
        ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1)[..., :-1], vv.double().repeat_interleave(hq // hkv, 2))
        both = torch.cat([out.float().flatten(), lse.flatten()])
        gathered = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(gathered, both)
        results.append(dict(dtype=dtype, out=(out.double() - ref).abs().max().item(),
                            lse=(lse.double() - torch.logsumexp(s, -1)).abs().max().item(),
                            same=all(torch.equal(x, both) for x in gathered)))
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_kv_attention_with_sinks(dist_pool, world):
    for rank, results in enumerate(dist_pool(world).run(_run_decode, world, timeout=120)):
        for r in results:
            atol, _ = tolerance(r["dtype"], world)
            assert r["out"] <= atol and r["lse"] <= 1e-4 and r["same"], (rank, r)


# --- 5. bad sinks ---------------------------------------------------------------------------------
def _bad(scenario):
    rank = dist.get_rank()
    sinks = {"wrong_length": torch.zeros(3),                       # 2 query heads
             "one_rank_only": torch.zeros(2) if rank == 0 else None,
             "lengths_disagree": torch.zeros(2) if rank == 0 else torch.zeros(3),
             "two_d": torch.zeros(1, 2),
             "integer": torch.zeros(2, dtype=torch.long),
             "not_a_tensor": [0.0, 0.0]}[scenario]
    return bad_call(causal=True, sinks=sinks, recover=dict(sinks=torch.zeros(2)))


@pytest.mark.parametrize("scenario, words", [
    ("wrong_length", ("rank 0: sinks must be", "rank 1: sinks must be")),
    ("one_rank_only", ("ranks disagree on sinks", "rank 0: 2, rank 1: -1")),
    ("lengths_disagree", ("rank 1: sinks must be",)),
    ("two_d", ("rank 0: sinks must be",)),
    ("integer", ("rank 0: sinks must be",)),
    ("not_a_tensor", ("rank 1: sinks must be",)),
])
def test_bad_sinks_raise_on_every_rank(dist_pool, scenario, words):
    assert_same_error_on_every_rank(dist_pool(2).run(_bad, scenario, timeout=60), words)


def _bad_decode():
    from ringattn.decode import sharded_kv_attention

    rank = dist.get_rank()
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 3, 2, 8)
    msgs = []
    for sinks in (torch.zeros(4) if rank == 0 else None, torch.zeros(5)):
        try:
            with torch.no_grad():
                sharded_kv_attention(q, k, k, sinks=sinks)
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    with torch.no_grad():
        ok = sharded_kv_attention(q, k, k, sinks=torch.zeros(4))  # the group still works
    return msgs, tuple(ok.shape)


def test_bad_decode_sinks_raise_on_every_rank(dist_pool):
    results = dist_pool(2).run(_bad_decode, timeout=60)
    for msgs, shape in results:
        assert "ranks disagree on sinks" in msgs[0], msgs[0]
        assert "sinks must be None or a 1-D floating tensor" in msgs[1], msgs[1]
        assert shape == (1, 1, 4, 8)
    assert results[0][0][0] == results[1][0][0]  # (the second names each rank's own detail too)


def test_sinks_on_another_device_are_named():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="sinks must be None or a 1-D floating tensor") as e:
        sp.ring_attention(q, q, q, sinks=torch.zeros(2, device="meta"))
    assert "sinks is on meta, q on cpu" in str(e.value.__cause__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", (None, 128))
@pytest.mark.parametrize("alg", ("ring", "token_ring"))
def test_gpu_sinks_with_the_fused_kernels(alg, window):
    """Sinks through the CUDA block kernels backend="auto" picks (the sinked output as the
    backward's out, for delta), a world of one, bf16 against float64, causal, with and without a
    window; dsinks too."""
    from test_documents import band, reference

    gen = torch.Generator().manual_seed(78)
    L, Hq = 512, 8
    q, go = (torch.randn(1, L, Hq, 128, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, L, 2, 128, generator=gen).bfloat16() for _ in range(2))
    sinks = 2 * torch.randn(Hq, generator=gen)
    mask = band(L, window if window else L)
    ref = [t.double().requires_grad_() for t in (q, k, v)] + [sinks.double().requires_grad_()]
    ro, _ = reference(*ref[:3], mask, 128 ** -0.5, ref[3])
    (ro * go.double()).sum().backward()
    loc = [t.cuda().requires_grad_() for t in (q, k, v)] + [sinks.cuda().requires_grad_()]
    fn = sp.ring_attention if alg == "ring" else sp.token_ring_attention
    out = fn(*loc[:3], causal=True, sliding_window=window, sinks=loc[3])
    (out.float() * go.cuda()).sum().backward()
    atol, rtol = tolerance(torch.bfloat16, 1)
    assert ((out.double().cpu() - ro).abs() <= atol + rtol * ro.abs()).all()
    for name, t, r in zip(("q", "k", "v", "sinks"), loc, ref):
        err = (t.grad.double().cpu() - r.grad).abs()
        scale = 1.0 if name != "sinks" else max(1.0, r.grad.abs().max().item())  # a sum over L rows
        assert (err <= (atol + rtol * r.grad.abs()) * scale).all(), (name, err.max().item())


# --- 6. precision regressions (found by tests/test_fuzz_sequence_parallel.py's campaign) -----------
def test_bf16_sinks_gradient_is_rounded_once():
    """bf16 sinks with lse_grad: the sinks' gradient arrives along two paths (through out' and
    through lse'); they must add in fp32 and round to bf16 once. Rounded separately and added in
    bf16 (before the fix) the two large, nearly cancelling shares left 14 bf16 ulps of error here."""
    import math
    gen = torch.Generator().manual_seed(10_000 + 314496)
    B, L, H, D = 2, 2, 1, 64
    q = torch.randn(B, L, H, D, generator=gen) * 2.5                      # (B, L, Hq, D) fp32
    k, v = (torch.randn(B, L, H, D, generator=gen) for _ in range(2))
    dout, dlse = torch.randn(B, L, H, D, generator=gen), torch.randn(B, H, L, generator=gen)
    sinks = torch.tensor([0.8246]).bfloat16()
    s64 = sinks.double().requires_grad_()
    sc = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D)
    sc = sc.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    sc = torch.cat([sc, s64.view(1, H, 1, 1).expand(B, H, L, 1)], -1)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1)[..., :L], v.double())
    ((o * dout.double()).sum() + (torch.logsumexp(sc, -1) * dlse.double()).sum()).backward()
    want = s64.grad.item()
    ulp = 2.0 ** (math.floor(math.log2(abs(want))) - 7)
    for fn in (sp.ring_attention, sp.token_ring_attention, sp.ulysses_attention):
        s = sinks.clone().requires_grad_()
        out, lse = fn(q, k, v, causal=True, sinks=s, return_lse=True, lse_grad=True)
        ((out * dout).sum() + (lse * dlse).sum()).backward()
        assert s.grad.dtype == torch.bfloat16
        assert abs(s.grad.item() - want) <= ulp, (fn.__name__, s.grad.item(), want)


def _rounded_once():
    """bf16 inputs with sinks at W = 2: the returned out' must be the fp32 merged rows rescaled and
    rounded ONCE -- bitwise the rescale of the algorithm's own fp32 result (before the fix the rows
    were rounded to bf16, rescaled and rounded again)."""
    from ringattn.ring_attention import ring_forward
    from ringattn.sinks import rescale
    from ringattn.token_ring import reply_for, token_ring_forward

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(348746)
    L = 8 * world
    q = (torch.randn(1, L, 4, 8, generator=g) * 2.5).bfloat16()
    k, v = (torch.randn(1, L, 1, 8, generator=g).bfloat16() for _ in range(2))
    sinks = torch.tensor([2.2208, 2.8807, 2.8328, float("-inf")])
    pos = positions(L, world, "contiguous", rank)
    loc = [t[:, pos] for t in (q, k, v)]
    bad = []
    for name, fn in (("ring", sp.ring_attention), ("token_ring", sp.token_ring_attention)):
        got = fn(*loc, causal=True, sinks=sinks, softmax_scale=1.0)
        plan, *qkv, _ = sp._prepare("test", *loc, algorithm=name, causal=True, softmax_scale=1.0, group=None,
                                    layout="contiguous", backend="auto")
        if name == "ring":
            out32, lse = ring_forward(plan, *qkv, torch.float32)
        else:
            out32, lse = token_ring_forward(plan, *qkv, reply_for(plan, q.device), torch.float32)
        want = rescale(out32, lse, sinks).bfloat16()
        if not torch.equal(got, want):
            bad.append(f"{name}: {(got.float() - want.float()).ne(0).sum().item()} elements differ")
    return bad


def test_sinked_output_is_rounded_once(dist_pool):
    results = dist_pool(2).run(_rounded_once, timeout=120)
    assert all(not b for b in results), results
