"""algorithm="ulysses" (ringattn.ulysses) on real gloo processes against float64.

1. The matrix at W = 1..4 (test_sequence_parallel.run_case): causal / not x both layouts x
   MHA (Hq = Hkv = 2W), GQA with W | Hkv, KV heads shared by W/Hkv ranks (Hkv = 1, and 2 at W = 4)
   x even / uneven lengths x batch 1/2 x fp32/bf16: out, lse, dq, dk, dv against float64 with a
   random upstream gradient, and every rank's bytes per channel against ulysses_comm_bytes.
2. Masks at W = 2..4 (test_documents.run_doc_case): packed documents (one packing and one per
   batch row), sliding windows, sinks (the rank-summed sink gradient), lse_grad -- against float64,
   bytes against the formula.
3. The all-to-alls over CudaIpcTransport's host simulation (the CPU stand-in of ranks sharing one
   GPU): every message goes through it, same results.
4. torch.compile(fullgraph=True): one traced op forward and one backward (head-layout tensors
   kept in buffers sized at trace time), bitwise the eager values.
5. Bad input: heads the group cannot split, ranks that disagree on the algorithm: the same
   ValueError on every rank, the group still usable. The GPU run (ranks sharing the H100 over
   CUDA IPC) is test_gpu_ulysses_ranks_sharing_one_gpu, in scripts/gpu_check.sh.
"""
import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp
from ringattn.ulysses import head_blocks, heads_problem
from test_documents import patterns, per_row_patterns, run_doc_case
from test_sequence_parallel import ipc_transports, run_case


def heads_for(world):
    """(Hq, Hkv): MHA, GQA with W | Hkv, and KV heads shared by W/Hkv ranks."""
    out = [(2 * world, 2 * world), (2 * world, world), (2 * world, 1)]
    if world == 4:
        out.append((8, 2))  # each KV head on 2 ranks
    return out


def ulysses_cases(world):
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for layout in ("contiguous", "zigzag"):
                for hq, hkv in heads_for(world):
                    for L in (6 * world, 7 * world - 1):
                        for batch in (1, 2):
                            cases.append(dict(alg="ulysses", causal=causal, layout=layout, hq=hq, hkv=hkv, seq_len=L,
                                              batch=batch, dtype=dtype, head_dim=8 if i % 3 else 16,
                                              return_lse=i % 2 == 0, seed=3000 + i))
                            i += 1
    return cases


def _run_matrix(world):
    return [f for c in ulysses_cases(world) if (f := run_case(c)) is not None], len(ulysses_cases(world))


@pytest.mark.parametrize("world", (1, 2, 3, 4))
def test_ulysses_matrix_against_float64(dist_pool, world):
    results = dist_pool(world).run(_run_matrix, world, timeout=300)
    failures = [f for fails, _ in results for f in fails]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:30])
    assert results[0][1] >= 96


def mask_cases(world):
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "zigzag"):
            for mask in ("documents", "per-row", "window", "sinks", "all"):
                L = (6 * world, 7 * world - 1)[i % 2]
                B = 2 if mask == "per-row" else 1 + i % 2
                hq, hkv = heads_for(world)[i % 3]
                cu = None
                if mask in ("documents", "all"):
                    cu = patterns(L, 60 + i)["random"]
                elif mask == "per-row":
                    cu = per_row_patterns(L, B, 80 + i)
                causal = mask != "documents" or i % 4 != 0   # documents also without causality
                window = max(1, L // 3) if mask in ("window", "all") else None
                sinks = (torch.float32, dtype)[i % 2] if mask in ("sinks", "all") else None
                cases.append(dict(alg="ulysses", causal=causal, layout=layout, seq_len=L, cu=cu, window=window,
                                  mask=mask, hq=hq, hkv=hkv, batch=B, head_dim=8, dtype=dtype,
                                  lse_grad=i % 3 != 2, as_tensor=i % 2 == 0, seed=3500 + i, sinks=sinks))
                i += 1
    return cases


def _run_masks(world):
    return [f for c in mask_cases(world) if (f := run_doc_case(c)) is not None]


@pytest.mark.parametrize("world", (2, 3, 4))
def test_ulysses_masks_against_float64(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_masks, world, timeout=300) for f in r]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:30])


def _run_over_ipc():
    from ringattn.accounting import comm_stats

    with ipc_transports("host-sim") as device:
        cases = ulysses_cases(dist.get_world_size())[::7]
        with comm_stats() as st:
            failures = [f for c in cases if (f := run_case(c, device=device)) is not None]
    return failures, len(cases), sum(st.sent_by_channel[ch] for ch in ("fwd.a2a", "fwd.out", "bwd.dout", "bwd.dqkv"))


@pytest.mark.parametrize("world", (2, 3))
def test_ulysses_over_the_cuda_ipc_host_simulation(dist_pool, world):
    results = dist_pool(world).run(_run_over_ipc, timeout=180)
    failures = [f for fails, _, _ in results for f in fails]
    assert not failures, "\n".join(failures[:20])
    assert results[0][1] >= 10 and all(sent > 0 for _, _, sent in results)


def _compiled_cases(world):
    """Explicit algorithm="ulysses" under torch.compile(fullgraph=True): uneven lengths, both
    layouts, KV heads shared by W/Hkv ranks, lse_grad, sinks, packed documents (a tensor),
    a sliding window, batch 2, bf16, a call without grad, and inductor."""
    L = 5 * world + 1
    base = dict(hq=2 * world, hkv=world, L=L, layout="zigzag", causal=True, batch=1, dtype=torch.float32)
    return [base, dict(base, layout="contiguous", causal=False, hkv=1, batch=2),
            dict(base, lse_grad=True), dict(base, sinks=True, hkv=1),
            dict(base, cu_seqlens=(0, L // 3, L)), dict(base, window=3, layout="contiguous"),
            dict(base, dtype=torch.bfloat16), dict(base, no_grad=True), dict(base, backend="inductor")]


def _compiled_case(c):
    """One case compiled (fullgraph; aot_eager unless the case names inductor) and eager: the traced ops ran once each, and out,
    lse and every gradient are bitwise the eager ones (the same code behind the op)."""
    import ringattn.compiled as rc

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(c["L"] * 7 + c["hkv"])
    B, L, D = c["batch"], c["L"], 8
    q, dout = (torch.randn(B, L, c["hq"], D, generator=g).to(c["dtype"]) for _ in range(2))
    k, v = (torch.randn(B, L, c["hkv"], D, generator=g).to(c["dtype"]) for _ in range(2))
    dlse = torch.randn(B, c["hq"], L, generator=g)
    sinks = torch.randn(c["hq"], generator=g).requires_grad_() if c.get("sinks") else None
    pos = sp.SequenceLayout.build(L, world, c["layout"]).positions(rank)
    kw = dict(causal=c["causal"], layout=c["layout"], return_lse=True, lse_grad=c.get("lse_grad", False),
              sinks=sinks, sliding_window=c.get("window"),
              cu_seqlens=torch.tensor(c["cu_seqlens"]) if c.get("cu_seqlens") else None)
    res = {}
    for mode in ("compiled", "eager"):
        torch._dynamo.reset()
        call = lambda a, b_, c_: sp.ulysses_attention(a, b_, c_, **kw)  # noqa: E731
        f = torch.compile(call, fullgraph=True, backend=c.get("backend", "aot_eager")) if mode == "compiled" else call
        loc = [t[:, pos].clone().requires_grad_(not c.get("no_grad")) for t in (q, k, v)]
        if sinks is not None:
            sinks.grad = None
        before = dict(rc.CALLS)
        out, lse = f(*loc)
        if not c.get("no_grad"):
            loss = (out.float() * dout[:, pos].float()).sum() + ((lse * dlse[:, :, pos]).sum() if kw["lse_grad"] else 0)
            loss.backward()
        ran = tuple(rc.CALLS[n] - before.get(n, 0) for n in ("ulysses_attention", "ulysses_attention_backward"))
        res[mode] = ([out.detach(), lse.detach()] + [t.grad for t in loc]
                     + ([sinks.grad.clone()] if sinks is not None else []), ran)
    errors = []
    want_ran = (1, 0) if c.get("no_grad") else (1, 1)
    if res["compiled"][1] != want_ran or res["eager"][1] != (0, 0):
        errors.append(f"traced ops ran {res['compiled'][1]} compiled (want {want_ran}), {res['eager'][1]} eager")
    for name, a_, b_ in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), res["compiled"][0], res["eager"][0]):
        if (a_ is None) != (b_ is None) or (a_ is not None and not torch.equal(a_, b_)):
            errors.append(f"{name}: compiled != eager")
    return f"rank {rank} {c}: " + "; ".join(errors) if errors else None


def _run_compiled(world):
    return [f for c in _compiled_cases(world) if (f := _compiled_case(c)) is not None]


@pytest.mark.parametrize("world", (2, 3))
def test_ulysses_under_torch_compile_is_one_traced_op(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_compiled, world, timeout=400) for f in r]
    assert not failures, "\n".join(failures[:20])


def test_ulysses_op_buffers_hold_any_global_length():
    """The head-layout buffers' rows (known at trace time from the local shard) cover every global
    length consistent with that shard, in both layouts (uneven chunks differ by one token)."""
    from ringattn.compiled import ulysses_rows

    for W in range(1, 9):
        for layout in ("contiguous", "zigzag"):
            for L in range(2 * W, 12 * W + 3):
                lay = sp.SequenceLayout.build(L, W, layout)
                assert all(ulysses_rows(n, W) >= L for n in lay.local_lengths), (W, layout, L)


def _bad(scenario):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    hq, hkv = (3, 3) if scenario == "heads_q" else (6, 3) if scenario == "heads_kv" else (4, 2)
    q = torch.randn(1, 6, hq, 8, generator=g)
    k, v = (torch.randn(1, 6, hkv, 8, generator=g) for _ in range(2))
    try:
        if scenario == "disagree":  # rank 0 asks for Ulysses, rank 1 for the ring
            alg = "ulysses" if rank == 0 else "ring"
            sp.sequence_parallel_attention(q, k, v, causal=True, algorithm=alg)
        else:
            sp.ulysses_attention(q, k, v, causal=True)
        got = ("no error", "")
    except ValueError as e:
        got = ("ValueError", str(e))
    good = torch.randn(1, 6, 2, 8, generator=g)
    out = sp.ulysses_attention(good, good, good, causal=True)  # the group still works
    return got + (tuple(out.shape),)


@pytest.mark.parametrize("scenario,words", [
    ("heads_q", ["heads_q=3 must be a multiple of the group size 2"]),
    ("heads_kv", ["heads_kv=3 must divide or be a multiple of the group size 2"]),
    ("disagree", ["ranks disagree on algorithm", "rank 0: ulysses", "rank 1: ring"]),
])
def test_ulysses_bad_input_same_error_on_every_rank(dist_pool, scenario, words):
    results = dist_pool(2).run(_bad, scenario, timeout=60)
    for kind, msg, shape in results:
        assert kind == "ValueError" and all(w in msg for w in words), (kind, msg)
        assert shape == (1, 6, 2, 8)
    assert results[0][1] == results[1][1]


def test_head_blocks_and_the_rule():
    assert head_blocks(8, 4, 4) == [(0, 2, 0, 1), (2, 4, 1, 2), (4, 6, 2, 3), (6, 8, 3, 4)]
    assert head_blocks(8, 2, 4) == [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]  # 2 ranks per KV head
    assert head_blocks(8, 1, 4) == [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 0, 1), (6, 8, 0, 1)]
    assert heads_problem(8, 8, 4) is None and heads_problem(8, 2, 4) is None and heads_problem(12, 12, 4) is None
    assert "heads_q=6" in heads_problem(6, 6, 4) and "heads_kv=3" in heads_problem(12, 3, 4)
    with pytest.raises(ValueError, match="heads_q=6"):
        sp.predict_comm_bytes("ulysses", seq_len=16, world_size=4, batch=1, heads_q=6, heads_kv=6, head_dim=8)
    # bytes: MHA, even, W = 4: each all-to-all keeps 1/W of what it moves
    L, W, B, H, D = 64, 4, 1, 8, 16
    per = sp.predict_comm_bytes("ulysses", seq_len=L, world_size=W, batch=B, heads_q=H, heads_kv=H, head_dim=D,
                                dtype=torch.bfloat16, backward=True)
    local = B * (L // W) * H * D * 2                      # one (B, L/W, H, D) bf16 tensor
    for r in range(W):
        assert per[r]["fwd.a2a"] == (3 * local * 3 // 4,) * 2                       # q, k, v
        assert per[r]["fwd.out"] == ((local + B * (L // W) * H * 4) * 3 // 4,) * 2  # out + fp32 lse
        assert per[r]["bwd.dout"] == (local * 3 // 4,) * 2
        assert per[r]["bwd.dqkv"] == (3 * local * 3 // 4,) * 2


def _run_over_ipc_cuda():
    with ipc_transports("cuda") as device:
        cases = [c for c in ulysses_cases(dist.get_world_size()) if c["dtype"] == torch.bfloat16][::4]
        return [f for c in cases if (f := run_case(c, device=device)) is not None], len(cases)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", (2, 4))
def test_gpu_ulysses_ranks_sharing_one_gpu(world):
    from dist_pool import DistPool

    pool = DistPool(world, pg_timeout_s=120)
    try:
        results = pool.run(_run_over_ipc_cuda, timeout=150)  # below pytest-timeout (180 s in gpu_check)
    finally:
        pool.close()
    failures = [f for fails, _ in results for f in fails]
    assert not failures and results[0][1] >= 10, f"{len(failures)} failing:\n" + "\n".join(failures[:30])
