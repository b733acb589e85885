"""Sharded-KV attention (ringattn.decode, serving): real gloo ranks at W = 1..4, the same queries on
every rank against a KV cache split unevenly across them (ranks with no keys, caches given as
several pieces), with and without the queries' own causal keys, MHA/GQA/MQA, Tq 1 and 3, fp32 and
bf16: out and lse against a float64 reference over all the keys, and bitwise the same on every
rank. Bad input: the same ValueError on every rank, and the group still usable afterwards."""
import pytest
import torch
import torch.distributed as dist

from ringattn.decode import sharded_kv_attention, sharded_kv_comm_bytes
from test_sequence_parallel import tolerance

HEADS = ((4, 4), (4, 2), (4, 1))


def reference(q, k, v, k_new, v_new, scale, softcap=None):
    """float64: q (B,Tq,Hq,D) over cache keys k (B,L,Hkv,D) (all visible) + new keys (causal);
    softcap: scores -> softcap * tanh(scores / softcap)."""
    q, k, v = q.double(), k.double(), v.double()
    tq = q.shape[1]
    mask = torch.ones(tq, k.shape[1], dtype=torch.bool)
    if k_new is not None:
        k, v = torch.cat([k, k_new.double()], 1), torch.cat([v, v_new.double()], 1)
        mask = torch.cat([mask, torch.ones(tq, tq, dtype=torch.bool).tril()], 1)
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows with no key: 0
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


def split_lengths(L, world, seed):
    """Uneven split of L cache tokens over the ranks, some ranks possibly empty."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, L + 1, (world - 1,), generator=g).tolist())
    bounds = [0] + cuts + [L]
    return [bounds[i + 1] - bounds[i] for i in range(world)]


def _run_matrix(world):
    rank = dist.get_rank()
    results = []
    case = 0
    for dtype in (torch.float32, torch.bfloat16):
        for hq, hkv in HEADS:
            for tq in (1, 3):
                for new in (False, True):
                    for L in (0, 13) if new else (13,):
                        case += 1
                        g = torch.Generator().manual_seed(100 + case)
                        B, D = 2, 16
                        Dv = (16, 24, 8)[case % 3]  # v's head dim: q/k's, or MLA-style wider / narrower
                        q = torch.randn(B, tq, hq, D, generator=g).to(dtype)
                        k = torch.randn(B, L, hkv, D, generator=g).to(dtype)
                        v = torch.randn(B, L, hkv, Dv, generator=g).to(dtype)
                        kn = torch.randn(B, tq, hkv, D, generator=g).to(dtype) if new else None
                        vn = torch.randn(B, tq, hkv, Dv, generator=g).to(dtype) if new else None
                        lens = split_lengths(L, world, case)
                        s0 = sum(lens[:rank])
                        mine_k, mine_v = k[:, s0:s0 + lens[rank]], v[:, s0:s0 + lens[rank]]
                        if case % 2 and lens[rank] >= 2:  # as two pieces (a prefill shard + later tokens)
                            h = lens[rank] // 2
                            mine_k, mine_v = (mine_k[:, :h], mine_k[:, h:]), (mine_v[:, :h], mine_v[:, h:])
                        scale = 0.3
                        cap = 0.8 if case % 4 == 1 else None  # logit softcapping in a quarter of the cases
                        with torch.no_grad():
                            out, lse = sharded_kv_attention(q, mine_k, mine_v, k_new=kn, v_new=vn,
                                                            softmax_scale=scale, return_lse=True, softcap=cap)
                        ref_out, ref_lse = reference(q, k, v, kn, vn, scale, cap)
                        # the same on every rank, bitwise
                        both = torch.cat([out.float().flatten(), lse.flatten()])
                        gathered = [torch.empty_like(both) for _ in range(world)]
                        dist.all_gather(gathered, both)
                        same = all(torch.equal(torch.nan_to_num(x, neginf=-1e30), torch.nan_to_num(both, neginf=-1e30))
                                   for x in gathered)
                        finite = torch.isfinite(ref_lse)
                        err_lse = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
                        lse_inf_ok = bool(torch.isneginf(lse[~finite]).all())
                        results.append(dict(case=(str(dtype), hq, hkv, tq, new, L, lens), dtype=dtype,
                                            out=(out.double() - ref_out).abs().max().item(), lse=err_lse,
                                            same=same, lse_inf_ok=lse_inf_ok, shape=tuple(out.shape),
                                            want_shape=(B, tq, hq, Dv), out_dtype=out.dtype))
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_kv_attention_against_float64(dist_pool, world):
    bad = []
    for rank, results in enumerate(dist_pool(world).run(_run_matrix, world, timeout=180)):
        assert len(results) == 2 * 3 * 2 * 3
        for r in results:
            atol, _ = tolerance(r["dtype"], world)
            if not (r["out"] <= atol and r["lse"] <= atol and r["same"] and r["lse_inf_ok"]
                    and r["out_dtype"] == r["dtype"] and r["shape"] == r["want_shape"]):
                bad.append(f"rank {rank} {r['case']}: out {r['out']:.2e} lse {r['lse']:.2e} same {r['same']} "
                           f"-inf rows {r['lse_inf_ok']} dtype {r['out_dtype']}")
    assert not bad, "\n".join(bad)


def _run_bad():
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same q and cache piece on every rank
    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 5, 2, 16)
    msgs = {}

    def attempt(name, fn):
        try:
            with torch.no_grad() if name != "grad" else torch.enable_grad():
                fn()
            msgs[name] = "no error"
        except ValueError as e:
            msgs[name] = str(e)

    attempt("tq_disagree", lambda: sharded_kv_attention(torch.randn(1, 1 + rank, 4, 16), k, k))
    attempt("dtype_one_rank", lambda: sharded_kv_attention(q, k.double() if rank == 1 else k, k))
    attempt("grad", lambda: sharded_kv_attention(q.clone().requires_grad_(), k, k))
    attempt("k_new_alone", lambda: sharded_kv_attention(q, k, k, k_new=torch.randn(1, 1, 2, 16)))
    attempt("k_new_length", lambda: sharded_kv_attention(q, k, k, k_new=torch.randn(1, 2, 2, 16),
                                                         v_new=torch.randn(1, 2, 2, 16)))
    attempt("heads", lambda: sharded_kv_attention(torch.randn(1, 1, 3, 16), k, k))
    attempt("scale", lambda: sharded_kv_attention(q, k, k, softmax_scale=-1.0))
    attempt("v_head_dim", lambda: sharded_kv_attention(q, k, k[..., :8] if rank == 1 else k))  # MLA-style, not alike
    attempt("v_heads", lambda: sharded_kv_attention(q, k, k[:, :, :1]))
    attempt("softcap_disagree", lambda: sharded_kv_attention(q, k, k, softcap=2.0 if rank == 1 else None))
    attempt("softcap_bad", lambda: sharded_kv_attention(q, k, k, softcap=-2.0))
    with torch.no_grad():  # the group still works, and the result is right
        out = sharded_kv_attention(q, k, k)
        ref, _ = reference(q, torch.cat([k] * dist.get_world_size(), 1), torch.cat([k] * dist.get_world_size(), 1),
                           None, None, 0.25)
    msgs["after"] = (out.double() - ref).abs().max().item()
    return msgs


BAD = {
    "tq_disagree": ["ranks disagree on number of queries Tq: [1, 2]"],
    "dtype_one_rank": ["rank 1: every tensor must have q's dtype"],
    "grad": ["inference only (no backward)", "rank 0", "rank 1"],
    "k_new_alone": ["k_new and v_new go together"],
    "k_new_length": ["with Tq tokens"],
    "heads": ["heads_q must be a multiple of heads_kv"],
    "scale": ["softmax_scale must be a finite number > 0"],
    "v_head_dim": ["ranks disagree on v's head_dim: [16, 8]"],
    "v_heads": ["v_cache[0] (1, 5, 1, 16), expected (batch=1, seq, heads_kv=2, head_dim=16)"],
    "softcap_disagree": ["ranks disagree on softcap"],
    "softcap_bad": ["softcap must be None, 0 (off) or a finite number > 0"],
}


def test_bad_input_same_error_on_every_rank(dist_pool):
    results = dist_pool(2).run(_run_bad, timeout=120)
    for name, needles in BAD.items():
        texts = [m[name] for m in results]
        for rank, text in enumerate(texts):
            assert "nothing was computed" in text, (name, rank, text)
            for n in needles:
                assert n in text, (name, rank, n, text)
    for m in results:
        assert m["after"] < 1e-5, m["after"]


def test_comm_bytes_formula():
    # two all-reduces: the lse max (Tq*Hq fp32) and out*w | w (Tq*Hq*(D+1) fp32), per batch row
    assert sharded_kv_comm_bytes(batch=2, tq=1, heads_q=32, head_dim=128) == 2 * 32 * 4 * (1 + 129)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient"])
@pytest.mark.parametrize("tq", [1, 4])
def test_gpu_sharded_kv_attention_kernels(backend, tq):
    """One rank on the GPU: the block kernels with Tq << cache (decode shapes), two cache pieces and
    the new keys' causal block, bf16, against float64."""
    import ringattn

    if backend != "auto" and backend not in ringattn.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, D = 2, 32, 8, 128
    q = torch.randn(B, tq, Hq, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, 3000, Hkv, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, 3000, Hkv, D, device="cuda", generator=g).bfloat16()
    kn = torch.randn(B, tq, Hkv, D, device="cuda", generator=g).bfloat16()
    vn = torch.randn(B, tq, Hkv, D, device="cuda", generator=g).bfloat16()
    try:
        with torch.no_grad():
            out, lse = sharded_kv_attention(q, (k[:, :2000], k[:, 2000:]), (v[:, :2000], v[:, 2000:]), k_new=kn,
                                            v_new=vn, backend=backend, return_lse=True)
    except ValueError as e:
        if "cannot run these inputs" in str(e):
            pytest.skip(f"{backend}: {e}")
        raise
    ref_out, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), kn.cpu(), vn.cpu(), D ** -0.5)
    assert (out.cpu().double() - ref_out).abs().max().item() < 2e-2
    assert (lse.cpu().double() - ref_lse).abs().max().item() < 2e-2


def _run_unchecked(world):
    torch.manual_seed(5)
    q, k, kn = torch.randn(2, 1, 4, 16), torch.randn(2, 6 * world, 2, 16), torch.randn(2, 1, 2, 16)
    r = dist.get_rank()
    with torch.no_grad():
        a = sharded_kv_attention(q, k[:, 6 * r:6 * r + 6], k[:, 6 * r:6 * r + 6], k_new=kn, v_new=kn)
        b = sharded_kv_attention(q, k[:, 6 * r:6 * r + 6], k[:, 6 * r:6 * r + 6], k_new=kn, v_new=kn, check=False)
    return torch.equal(a, b), (b.double() - reference(q, k, k, kn, kn, 0.25)[0]).abs().max().item()


@pytest.mark.parametrize("world", [1, 3])
def test_check_false_gives_the_same_result(dist_pool, world):
    for same, err in dist_pool(world).run(_run_unchecked, world, timeout=60):
        assert same and err < 1e-5, (same, err)


def _run_mixed_calls():
    """Rank 0 calls sharded_kv_attention while rank 1 calls ring_attention on the same group:
    both raise, naming the mismatch (not an all_gather of two sizes, not a hang)."""
    import ringattn

    torch.manual_seed(0)
    try:
        with torch.no_grad():
            if dist.get_rank() == 0:
                sharded_kv_attention(torch.randn(1, 1, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
            else:
                x = torch.randn(1, 4, 2, 8)
                ringattn.ring_attention(x, x, x)
        return "no error"
    except ValueError as e:
        return str(e)


def test_mixed_entry_points_name_the_mismatch(dist_pool):
    for rank, msg in enumerate(dist_pool(2).run(_run_mixed_calls, timeout=60)):
        assert "ranks disagree on the call" in msg, (rank, msg)
