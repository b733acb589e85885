"""Packed sequences (cu_seqlens, document masking) in ring attention and TokenRing.

1. Index arithmetic (no processes): over every (Q owner, K/V owner) pair the pieces of
   ringattn.documents cover exactly the (query, key) pairs the block-diagonal (causal) mask
   allows, each once, for both layouts, W = 1..4, even and uneven lengths.
2. Real gloo processes at W = 1..4: both algorithms x causal x layout x MHA/GQA x batch 1/2 x
   document patterns (short documents, one long document spanning every rank, every token its own
   document) x fp32/bf16, forward (out, lse) and backward (dq, dk, dv, random upstream gradient)
   against a float64 reference with the document mask, tolerances of test_sequence_parallel; the
   bytes each rank moved against predict_comm_bytes(cu_seqlens=...) (TokenRing skips pairs that
   share no document).
   Per-row packings (one cu_seqlens row per batch row, e.g. padding or a collator that packs each
   row on its own): the same checks, each row against its own mask.
3. Bad cu_seqlens: the same ValueError on every rank, the group still usable.
"""
import math
import random
import time

import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp
from ringattn.accounting import comm_stats
from ringattn.documents import Piece
from ringattn.layout import RingPlan, SequenceLayout
from test_sequence_parallel import positions, tolerance


def doc_ids(cu, L):
    ids = torch.empty(L, dtype=torch.long)
    for d in range(len(cu) - 1):
        ids[cu[d]:cu[d + 1]] = d
    return ids


def allowed(cu, L, causal):
    """(L, L) bool: query p may attend key t; per-row packings (a list of rows): (B, 1, L, L)."""
    if not isinstance(cu[0], int):
        return torch.stack([allowed(r, L, causal) for r in cu]).unsqueeze(1)
    ids = doc_ids(cu, L)
    m = ids[:, None] == ids[None, :]
    if causal:
        m &= torch.ones(L, L, dtype=torch.bool).tril()
    return m


def patterns(L, seed):
    """Named document boundaries of a sequence of L tokens."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, L), min(L - 1, max(1, L // 4))))
    return {
        "random": [0] + cuts + [L],
        "long+short": [0, L - 2, L] if L > 2 else [0, L],
        "tokens": list(range(L + 1)),          # every token its own document
        "one": [0, L],                          # a single document: the plain path
    }


# --- 1. pieces cover exactly the mask ---------------------------------------------------------
def expand_tiles(pieces):
    """Each tiled piece as its tiles (tile t: q rows q_off + t*q_len, k/v rows kv_off + t*kv_len)."""
    for p in pieces:
        for t in range(p.tiles):
            yield p._replace(q_off=p.q_off + t * p.q_len, kv_off=p.kv_off + t * p.kv_len, tiles=1)


def covered_pieces(plan, lay, world, label):
    """(piece, global query positions, global key positions) of every block's pieces; the
    diagonal block covers every row (TokenRing/ring initialise from it)."""
    for i in range(world):
        pi = lay.positions(i)
        for j in range(world):
            pj = lay.positions(j)
            blk = plan.block(i, j)
            if blk is None:
                continue
            if i == j:
                assert (blk.q_start, blk.q_len) == (0, lay.local_len(i)), (label, blk)
            for p in expand_tiles(blk.pieces or (Piece(0, blk.q_len, 0, blk.kv_len, blk.causal),)):
                qs = pi[blk.q_start + p.q_off: blk.q_start + p.q_off + p.q_len]
                ks = pj[blk.kv_start + p.kv_off: blk.kv_start + p.kv_off + p.kv_len]
                if p.causal and not p.flip:  # (flip: a sliding window's anti-causal square)
                    assert p.q_len == p.kv_len and torch.equal(qs, ks)
                yield p, qs, ks


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_pieces_cover_exactly_the_document_mask(layout, world, causal):
    for L in (4 * world, 4 * world + 3, 9 * world + 1):
        lay = SequenceLayout.build(L, world, layout)
        for name, cu in patterns(L, L * 7 + world).items():
            plan = RingPlan(None, 0, world, lay, causal, 1.0, "math", tuple(cu) if len(cu) > 2 else None)
            got = torch.zeros(L, L, dtype=torch.long)
            for p, qs, ks in covered_pieces(plan, lay, world, name):
                sub = torch.ones(p.q_len, p.kv_len, dtype=torch.long)
                got[qs[:, None], ks[None, :]] += sub.tril() if p.causal else sub
            want = allowed(cu, L, causal).long()
            assert torch.equal(got, want), (layout, world, causal, L, name, (got - want).nonzero()[:5].tolist())


def per_row_patterns(L, B, seed):
    """Per-row packings of B rows: a left-padding-like row, a right-padding-like row, random rows,
    one plain row, and two equal rows next to each other (which share their pieces)."""
    rng = random.Random(seed)
    rows = []
    for b in range(B):
        kind = (b + seed) % 5
        if kind == 0:
            rows.append([0, max(1, L // 3), L])
        elif kind == 1:
            rows.append([0, L - 1, L])
        elif kind == 2:
            rows.append([0] + sorted(rng.sample(range(1, L), max(1, L // 5))) + [L])
        elif kind == 3:
            rows.append([0, L])
        else:
            rows.append(list(rows[-1]) if rows else [0, 1, L])
    if all(r == rows[0] for r in rows):
        rows[-1] = [0, L - 1, L] if rows[0] != [0, L - 1, L] else [0, L]
    return rows


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_per_row_pieces_cover_exactly_each_rows_mask(layout, world, causal):
    from ringattn.documents import as_documents

    for L in (4 * world + 3, 9 * world + 1):
        lay = SequenceLayout.build(L, world, layout)
        for B in (2, 3, 5):
            rows = per_row_patterns(L, B, L + B + world)
            docs, problem = as_documents(rows)
            assert problem is None and isinstance(docs[0], tuple) and len(docs) == B, (rows, docs, problem)
            plan = RingPlan(None, 0, world, lay, causal, 1.0, "math", docs)
            got = torch.zeros(B, L, L, dtype=torch.long)
            for p, qs, ks in covered_pieces(plan, lay, world, rows):
                sub = torch.ones(p.q_len, p.kv_len, dtype=torch.long)
                for b in (range(B) if p.nb == 0 else range(p.b0, p.b0 + p.nb)):
                    got[b, qs[:, None], ks[None, :]] += sub.tril() if p.causal else sub
            want = allowed(rows, L, causal).squeeze(1).long()
            assert torch.equal(got, want), (layout, world, causal, L, rows, (got - want).nonzero()[:5].tolist())


def test_as_documents_per_row_forms():
    from ringattn.documents import as_documents, documents_tensor, packed

    rows = [[0, 3, 9], [0, 9], [0, 1, 2, 9]]
    docs, problem = as_documents(rows)
    assert problem is None and docs == ((0, 3, 9), (0, 9), (0, 1, 2, 9))
    padded = torch.tensor([[0, 3, 9, 9], [0, 9, 9, 9], [0, 1, 2, 9]])
    assert torch.equal(documents_tensor(docs), padded)
    assert as_documents(padded) == (docs, None)
    assert as_documents([torch.tensor(r) for r in rows]) == (docs, None)
    assert as_documents([[0, 4, 9], [0, 4, 9]]) == ((0, 4, 9), None)  # equal rows: one packing
    assert packed(as_documents([[0, 9], [0, 9]])[0]) is None          # one document per row: plain
    for bad, words in (([[0, 3, 9], [0, 8]], "end at different lengths"),
                       ([[0, 3, 9], [0, 5, 5, 9]], "cu_seqlens[1] must strictly increase"),
                       ([[0, 3, 9], 7], "one list/1-D tensor per batch row"),
                       (torch.zeros(2, 2, 2, dtype=torch.long), "1-D (one packing) or 2-D"),
                       ([], "at least 2 entries")):
        got, problem = as_documents(bad)
        assert got is None and problem is not None and words in problem, (bad, problem)


def test_single_process_helpers_check_cu_seqlens():
    with pytest.raises(ValueError, match="ends at 8, but seq_len is 9"):
        sp.predict_comm_bytes("token_ring", seq_len=9, world_size=2, batch=1, heads_q=2, heads_kv=2, head_dim=8,
                              cu_seqlens=[0, 3, 8])
    with pytest.raises(ValueError, match="strictly increase"):
        sp.choose_algorithm(seq_len=9, world_size=2, batch=1, heads_q=2, heads_kv=2, head_dim=8,
                            cu_seqlens=[0, 3, 3, 9])
    # auto on a packed sequence: bytes decide, and the reason says so
    kw = dict(seq_len=64, world_size=4, layout="contiguous", causal=True, batch=1, heads_q=8, heads_kv=8,
              head_dim=16)
    ch = sp.choose_algorithm(**kw, cu_seqlens=list(range(0, 65, 8)))  # documents inside each rank's chunk
    assert ch.algorithm == "ring" and "packed sequence" in ch.reason, ch  # a tie: ring
    assert ch.predicted_bytes["token_ring"] == 0  # no pair of ranks shares a document: nothing travels
    assert ch.predicted_bytes["ring"] == 0        # and KV rotation stops before its first step
    ch = sp.choose_algorithm(**kw, cu_seqlens=[0, 20, 64])  # documents across chunks: both move bytes
    assert ch.predicted_bytes["ring"] > 0 and ch.predicted_bytes["token_ring"] > 0, ch
    plain = sp.choose_algorithm(**kw, cu_seqlens=[0, 64])  # one document == no cu_seqlens
    assert plain == sp.choose_algorithm(**kw)


# --- 2. against float64 on real processes -----------------------------------------------------
def reference(q, k, v, mask, scale, sinks=None):
    """Masked softmax attention; sinks (Hq,): one extra logit per head in every row's softmax,
    written as gpt-oss's eager attention does it (a column appended, then dropped)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, -1)
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), torch.logsumexp(s, -1)


def band(L, w):
    """(L, L) bool: the causal sliding window, query p sees key t iff 0 <= p - t < w."""
    d = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    return (d >= 0) & (d < w)


def run_doc_case(c, device="cpu"):
    """One case (a dict: alg, causal, layout, seq_len, cu (None: one sequence), optional window,
    hq, hkv, batch, head_dim, dtype, lse_grad, as_tensor, seed, optional tiles: how tiled pieces
    run, documents.TILE_MODE; optional sinks: a dtype, then attention sinks of that dtype (their
    gradient summed over ranks is checked too)) against float64; None or the failure."""
    import ringattn.documents as rdoc

    before, rdoc.TILE_MODE = rdoc.TILE_MODE, c.get("tiles", "auto")
    try:
        return _run_doc_case(c, device)
    finally:
        rdoc.TILE_MODE = before


def _run_doc_case(c, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    B, L, Hq, Hkv, D, dtype = c["batch"], c["seq_len"], c["hq"], c["hkv"], c["head_dim"], c["dtype"]
    cu, w = c["cu"], c.get("window")
    mask = allowed(cu if cu is not None else [0, L], L, c["causal"])
    if w is not None:
        mask = mask & band(L, w)
    gen = torch.Generator().manual_seed(3000 + c["seed"])
    q, dout = (torch.randn(B, L, Hq, D, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, L, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    dlse = torch.randn(B, Hq, L, generator=gen) if c["lse_grad"] else None
    sinks = (2 * torch.randn(Hq, generator=gen)).to(c["sinks"]) if c.get("sinks") else None
    scale = 1.0 / math.sqrt(D)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_sinks = sinks.double().requires_grad_() if sinks is not None else None
    ref_out, ref_lse = reference(*ref, mask, scale, ref_sinks)
    loss = (ref_out * dout.double()).sum() + ((ref_lse * dlse.double()).sum() if dlse is not None else 0)
    loss.backward()

    pos = positions(L, world, c["layout"], rank)
    loc = [t[:, pos].to(device).requires_grad_() for t in (q, k, v)]
    fn = {"ring": sp.ring_attention, "token_ring": sp.token_ring_attention,
          "auto": sp.sequence_parallel_attention, "ulysses": sp.ulysses_attention}[c["alg"]]
    if c["as_tensor"] and cu is not None:
        from ringattn.documents import as_documents, documents_tensor
        cu_arg = documents_tensor(as_documents(cu)[0])
    else:
        cu_arg = cu
    loc_sinks = sinks.to(device).requires_grad_() if sinks is not None else None
    with comm_stats() as st:
        out, lse = fn(*loc, causal=c["causal"], layout=c["layout"], return_lse=True, lse_grad=c["lse_grad"],
                      cu_seqlens=cu_arg, sliding_window=w, **({"sinks": loc_sinks} if sinks is not None else {}))
        loss = ((out * dout[:, pos].to(device)).sum()
                + ((lse * dlse[:, :, pos].to(device)).sum() if dlse is not None else 0))
        loss.backward()
    atol, rtol = tolerance(dtype, world)
    errors = []
    pairs = [("out", out, ref_out[:, pos]), ("lse", lse, ref_lse[:, :, pos])]
    pairs += [(f"d{n}", t.grad, r.grad[:, pos]) for n, t, r in zip("qkv", loc, ref)]
    if sinks is not None:
        # each rank's sink gradient covers its own rows: summed over the group (as a parameter's;
        # every rank joins the all_reduce, a missing gradient counting as a failure, not a hang)
        g_s = loc_sinks.grad
        if g_s is None or g_s.dtype != sinks.dtype:
            errors.append(f"dsinks: {None if g_s is None else g_s.dtype}, expected a {sinks.dtype} gradient")
        d_sinks = g_s.detach().float().cpu().clone() if g_s is not None else torch.zeros(Hq)
        dist.all_reduce(d_sinks)
        pairs.append(("dsinks", d_sinks, ref_sinks.grad))
    for name, got, want in pairs:
        if got is None or got.shape != want.shape:
            errors.append(f"{name}: shape {None if got is None else tuple(got.shape)} != {tuple(want.shape)}")
            continue
        err = (got.detach().cpu().double() - want).abs()
        ratio = (err / (atol + rtol * want.abs())).max().item()
        if not ratio <= 1.0:
            errors.append(f"{name}: max abs err {err.max().item():.3g} ({ratio:.2f}x the bound)")
    kw = dict(seq_len=L, world_size=world, layout=c["layout"], causal=c["causal"], batch=B, heads_q=Hq,
              heads_kv=Hkv, head_dim=D, dtype=dtype, cu_seqlens=cu, sliding_window=w)
    alg = c["alg"] if c["alg"] != "auto" else sp.choose_algorithm(**kw, device=loc[0].device).algorithm
    want_bytes = sp.predict_comm_bytes(alg, **kw, backward=True, lse_grad=c["lse_grad"])[rank]
    got_bytes = {ch: (st.sent_by_channel[ch], st.recv_by_channel[ch])
                 for ch in set(st.sent_by_channel) | set(st.recv_by_channel)}
    nz = lambda d: {ch: b for ch, b in d.items() if b != (0, 0)}  # noqa: E731
    if nz(got_bytes) != nz(want_bytes):
        errors.append(f"bytes {got_bytes} != formula {want_bytes}")
    if errors:
        shown = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in c.items()}
        return f"rank {rank} {shown}: " + "; ".join(errors)
    return None


def doc_cases(world):
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for alg in ("ring", "token_ring"):
            for causal in (False, True):
                for layout in ("contiguous", "zigzag"):
                    for L in (6 * world, 7 * world - 1):
                        pats = patterns(L, 100 * world + i)
                        names = ("random", "long+short", "tokens") if dtype == torch.float32 else ("random",)
                        for name in names:
                            hq, hkv = ((4, 2), (4, 4), (2, 1))[i % 3]
                            cases.append(dict(alg=alg, causal=causal, layout=layout, seq_len=L, cu=pats[name],
                                              pattern=name, hq=hq, hkv=hkv, batch=1 + i % 2, head_dim=8,
                                              dtype=dtype, lse_grad=i % 4 == 1, as_tensor=i % 2 == 0, seed=i,
                                              tiles=("batched", "per_tile")[i % 3 == 0]))
                            i += 1
    # per-row packings: batch 2 and 3, both algorithms, causal and not, both layouts
    for j, (alg, causal, layout, B) in enumerate((("ring", True, "zigzag", 2), ("token_ring", True, "zigzag", 3),
                                                 ("token_ring", False, "contiguous", 2),
                                                 ("ring", True, "contiguous", 3), ("auto", True, "zigzag", 2))):
        L = (6, 7)[j % 2] * world - j % 2
        cases.append(dict(alg=alg, causal=causal, layout=layout, seq_len=L, cu=per_row_patterns(L, B, j + world),
                          pattern="per-row", hq=(4, 2)[j % 2], hkv=2, batch=B, head_dim=8,
                          dtype=(torch.float32, torch.bfloat16)[j % 2], lse_grad=j == 1, as_tensor=j % 2 == 0,
                          seed=500 + j))
    # auto, and a single document (the plain path) through cu_seqlens
    L = 7 * world - 1
    cases.append(dict(cases[0], alg="auto", seq_len=L, cu=patterns(L, 5)["random"], seed=i + 1))
    cases.append(dict(cases[1], alg="token_ring", seq_len=L, cu=[0, L], pattern="one", seed=i + 2))
    return cases


def _run_docs(world):
    return [f for c in doc_cases(world) if (f := run_doc_case(c)) is not None]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_sequences_against_float64_reference(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_docs, world, timeout=300) for f in r]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:30])


def run_cases_over_ipc(kind, all_cases, pick):
    """Cases over the CUDA-IPC transport: "host-sim" (CPU, in CI) or "cuda" (ranks sharing one GPU
    under MPS, scripts/gpu_check.sh; the bf16 cases). pick(i, case) -> whether to run it."""
    from test_sequence_parallel import ipc_transports

    # 5 slots: with lse_grad TokenRing's bwd.q sends 5 tensors per peer and step
    with ipc_transports(kind, slots=5) as device:
        cases = [c for c in all_cases if (c["dtype"] == torch.bfloat16) == (kind == "cuda")]
        cases = [c for i, c in enumerate(cases) if pick(i, c)]
        failures = [f for c in cases if (f := run_doc_case(c, device=device)) is not None]
    return failures, len(cases)


def _run_docs_over_ipc(kind):
    step = 2 if kind == "cuda" else 7  # a sample, and every per-row packing of this dtype
    return run_cases_over_ipc(kind, doc_cases(dist.get_world_size()),
                              lambda i, c: i % step == 0 or c["pattern"] == "per-row")


def assert_over_ipc(runner, kind, world, min_cases, dist_pool=None):
    """Run runner(kind) on `world` ranks -- the session's gloo pool for "host-sim", a fresh pool of
    ranks sharing the GPU for "cuda" -- and assert every rank ran >= min_cases cases, all passing."""
    if kind == "cuda":
        from dist_pool import DistPool

        pool = DistPool(world, pg_timeout_s=120)
        try:
            results = pool.run(runner, "cuda", timeout=150)
        finally:
            pool.close()
    else:
        results = dist_pool(world).run(runner, "host-sim", timeout=180)
    failures = [f for fails, _ in results for f in fails]
    assert not failures and results[0][1] >= min_cases, (results[0][1], failures[:30])


def test_packed_sequences_over_the_cuda_ipc_host_simulation(dist_pool):
    assert_over_ipc(_run_docs_over_ipc, "host-sim", 3, 8, dist_pool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", (2, 4))
def test_gpu_packed_sequences_ranks_sharing_one_gpu(world):
    assert_over_ipc(_run_docs_over_ipc, "cuda", world, 4)


def compiled_vs_eager(compiled, fn, full, extra, label):
    """Failures of one compiled call against the eager one: full = [q, k, v, dout] global (B, L, H, D),
    zigzag over 2 ranks; extra = fn's arguments after q, k, v. The compiled call must run the op
    once and give bitwise the eager out, dq, dk, dv (also returned, eager's, for other checks)."""
    import ringattn.compiled as rc
    rank = dist.get_rank()
    pos = positions(full[0].shape[1], 2, "zigzag", rank)
    res = {}
    for mode, f in (("compiled", compiled), ("eager", fn)):
        loc = [t[:, pos].clone().requires_grad_() for t in full[:3]]
        before = rc.CALLS["sp_attention"]
        out = f(*loc, *extra)
        out.backward(full[3][:, pos])
        res[mode] = [out.detach()] + [t.grad for t in loc] + [rc.CALLS["sp_attention"] - before]
    failures = []
    if res["compiled"][-1] != 1:
        failures.append(f"rank {rank} {label}: the compiled call ran sp_attention {res['compiled'][-1]} times")
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["compiled"], res["eager"]):
        if not torch.equal(a, b):
            failures.append(f"rank {rank} {label}: {name} compiled != eager")
    return failures, res["eager"][:4]


def _run_compiled_docs():
    """Under torch.compile(fullgraph=True): one op forward and backward, cu_seqlens a tensor input;
    equal to the eager call, and a second packing with as many documents runs without recompiling
    (another number of documents is another input shape: a recompile unless dynamic)."""
    rank = dist.get_rank()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (a pooled worker may have compiled other tests' functions)
    L = 13
    fn = lambda q, k, v, cu: sp.sequence_parallel_attention(q, k, v, causal=True, layout="zigzag",  # noqa: E731
                                                             algorithm="token_ring", cu_seqlens=cu)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    failures = []
    for seed, cu in enumerate(([0, 3, 9, 13], [0, 1, 12, 13])):
        g = torch.Generator().manual_seed(seed)
        full = [torch.randn(1, L, 2, 8, generator=g) for _ in range(4)]
        failures += compiled_vs_eager(compiled, fn, full, (torch.tensor(cu),), f"cu={cu}")[0]
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if frames != 1:
        failures.append(f"rank {rank}: {frames} graphs compiled for two packings of 3 documents (want 1: cu_seqlens is an input)")
    # per-row packings: a list of rows becomes one 2-D tensor input of the op (a new graph)
    g = torch.Generator().manual_seed(9)
    full = [torch.randn(2, L, 2, 8, generator=g) for _ in range(4)]
    failures += compiled_vs_eager(compiled, fn, full, ([[0, 4, 13], [0, 2, 11, 13]],), "per-row")[0]
    return failures


def test_packed_sequences_compiled(dist_pool):
    failures = [f for r in dist_pool(2).run(_run_compiled_docs, timeout=180) for f in r]
    assert not failures, "\n".join(failures)


# --- 3. bad cu_seqlens ------------------------------------------------------------------------
def bad_call(**kw):
    """On each of 2 ranks holding 6 - rank tokens (11, contiguous): a TokenRing call with `kw`
    (which must raise), then a good ring call with `recover` (the group still works). Returns
    (error type, message, seconds, the good call's out shape[1:])."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    batch = kw.pop("batch", 1)
    q, k, v = (torch.randn(batch, 6 - rank, 2, 8, generator=g) for _ in range(3))
    recover = kw.pop("recover")
    t0 = time.monotonic()
    try:
        sp.token_ring_attention(q, k, v, **kw)
        outcome = ("no error", "")
    except Exception as e:  # noqa: BLE001
        outcome = (type(e).__name__, str(e))
    out = sp.ring_attention(q, k, v, causal=True, **recover)  # the group still works
    return outcome + (time.monotonic() - t0, tuple(out.shape)[1:])


def assert_same_error_on_every_rank(results, words):
    for rank, (kind, msg, elapsed, shape) in enumerate(results):
        assert kind == "ValueError", (rank, kind, msg)
        for w in words:
            assert w in msg, (rank, w, msg)
        assert elapsed < 10 and shape == (6 - rank, 2, 8)
    assert results[0][1] == results[1][1], results


def _bad(scenario):
    rank = dist.get_rank()
    cu = {"wrong_end": [0, 4, 6],                       # the local length, not the global one
          "disagree": [0, 4, 11] if rank == 0 else [0, 5, 11],
          "decreasing_on_one_rank": [0, 4, 11] if rank == 0 else [0, 7, 4, 11],
          "float_tensor": torch.tensor([0.0, 4.0, 11.0]),
          "not_starting_at_zero": [1, 4, 11],
          "rows_not_batch": [[0, 4, 11], [0, 11], [0, 2, 11]],  # 3 rows for a batch of 1
          "rows_disagree": [[0, 4, 11], [0, 11]] if rank == 0 else [[0, 4, 11], [0, 5, 11]]}[scenario]
    return bad_call(causal=True, cu_seqlens=cu, batch=2 if scenario == "rows_disagree" else 1,
                    recover=dict(cu_seqlens=[0, 4, 11]))


@pytest.mark.parametrize("scenario, words", [
    ("wrong_end", ("cu_seqlens ends at 6", "11 tokens", "GLOBAL")),
    ("disagree", ("ranks disagree on cu_seqlens",)),
    ("decreasing_on_one_rank", ("rank 1: cu_seqlens must be the global document boundaries",)),
    ("float_tensor", ("rank 0: cu_seqlens", "rank 1: cu_seqlens")),
    ("not_starting_at_zero", ("rank 0: cu_seqlens",)),
    ("rows_not_batch", ("rank 0: cu_seqlens", "rank 1: cu_seqlens")),
    ("rows_disagree", ("ranks disagree on cu_seqlens",)),
])
def test_bad_cu_seqlens_raise_on_every_rank(dist_pool, scenario, words):
    assert_same_error_on_every_rank(dist_pool(2).run(_bad, scenario, timeout=60), words)
