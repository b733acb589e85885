"""ringattn.block_attention: every backend against a float64 einsum reference, forward and backward.

CPU tier (always): the math backend (and auto, which is math on CPU) in fp64 / fp32 / bf16, with
the query-row chunking forced on; causal in both alignments with Sq != Sk; empty rows; GQA/MQA;
odd sizes; a K/V split into two blocks merged with ringattn.ops.merge_attn_states (forward) and
summed (backward); accumulate-into; input validation; the flash_attn signature adapter against
fakes of the 2.6 and 2.7+ interfaces.
GPU tier (@pytest.mark.gpu, skipped without CUDA): cudnn / flash / efficient / flash_attn / auto
against the fp64 reference with flash-attention's rule: error at most 2x the error of the same
computation done naively in the input precision by PyTorch (+ a small absolute slack).
"""
from __future__ import annotations

import math

import pytest
import torch

from ringattn import block_attention as ba
from ringattn.block_attention import (
    available_backends,
    block_attn_backward,
    block_attn_forward,
    select_backend,
)

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------
# Reference


def reference(q, k, v, causal=False, softmax_scale=None, compute_dtype=torch.float64, softcap=None):
    """Naive attention in `compute_dtype` (fp64: the ground truth; the input dtype: "what plain
    PyTorch gets in that precision"). Returns (out (B,Sq,Hq,D), lse (B,Hq,Sq)); empty rows give
    out 0 and lse -inf without NaNs, so autograd through it is clean."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(g, dim=2)
    vc = v.to(compute_dtype).repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    if softcap:  # logit softcapping (Gemma 2), before the mask
        s = softcap * torch.tanh(s / softcap)
    alignment = ba._normalize_causal(causal)
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if alignment is not None:
        offset = 0 if alignment == "top_left" else Sk - Sq
        visible = (torch.arange(Sk, device=q.device)[None, :]
                   <= torch.arange(Sq, device=q.device)[:, None] + offset)
    empty = ~visible.any(-1)[:, None]  # Sq, 1
    s = s.masked_fill(~visible, NEG_INF).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vc)
    lse = torch.logsumexp(s.float() if compute_dtype != torch.float64 else s, dim=-1)
    lse = lse.masked_fill(empty[:, 0], NEG_INF)
    return out, lse


def reference_grads(q, k, v, dout, causal=False, softmax_scale=None, compute_dtype=torch.float64, softcap=None):
    """(out, lse, dq, dk, dv) of `reference` by autograd (dk/dv summed over GQA groups)."""
    leaves = [x.detach().to(compute_dtype).requires_grad_() for x in (q, k, v)]
    out, lse = reference(*leaves, causal=causal, softmax_scale=softmax_scale, compute_dtype=compute_dtype,
                         softcap=softcap)
    out.backward(dout.to(compute_dtype))
    return (out.detach(), lse.detach()) + tuple(x.grad for x in leaves)


def make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D), mk(B, Sq, Hq, D)


def assert_close_finite(actual, expected, **tol):
    """assert_close where -inf must match -inf exactly (lse of empty rows)."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected.to(actual.dtype)))
    fin = torch.isfinite(expected)
    torch.testing.assert_close(actual.double()[fin], expected.double()[fin], **tol)


# (B, Sq, Sk, Hq, Hkv, D, causal): square / rectangular, both alignments, empty rows
# (bottom_right with Sq > Sk), GQA, MQA, odd sizes, a single query row.
CASES = [
    (2, 37, 37, 4, 4, 16, False),
    (1, 33, 50, 6, 2, 24, "top_left"),
    (1, 33, 50, 6, 2, 24, "bottom_right"),
    (1, 50, 33, 6, 3, 8, "top_left"),
    (1, 50, 33, 6, 3, 8, "bottom_right"),  # first 17 rows see nothing
    (2, 17, 64, 8, 1, 32, "bottom_right"),  # MQA
    (1, 29, 29, 4, 2, 40, True),
    (1, 1, 9, 2, 1, 8, "bottom_right"),
    (1, 23, 11, 3, 1, 5, False),
]
CASE_IDS = ["x".join(map(str, c[:6])) + f"-{c[6]}" for c in CASES]

# Tolerances for the math backend vs the fp64 reference, inputs identical (bf16/fp32 values are
# exact in fp64):
#  fp64: same math in another summation order -> ~1e-14; 1e-10 leaves room.
#  fp32: fp32 matmuls over <= 64 terms of O(1) values and exp/log -> a few 1e-6 (grads are sums
#        over up to 64 rows, hence the larger atol there).
#  bf16: computed in fp32, then ONE rounding of out/grads to bf16 (unit roundoff 2^-8 relative);
#        lse stays fp32.
FWD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5)}
BWD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=5e-5),
           torch.bfloat16: dict(rtol=2 ** -8, atol=5e-5)}
LSE_TOL = {torch.float64: dict(rtol=0, atol=1e-5),  # lse is returned in fp32 whatever the input
           torch.float32: dict(rtol=0, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=1e-5)}


@pytest.fixture(params=["one_chunk", "row_chunks"])
def math_chunking(request, monkeypatch):
    """Run each math test with the default chunk and with chunks of a few query rows, so that the
    chunk boundaries, the per-chunk causal key limit and the skipped empty chunks are exercised."""
    if request.param == "row_chunks":
        monkeypatch.setattr(ba, "_MATH_CHUNK_ELEMS", 300)
    return request.param


# ------------------------------------------------------------------------------------------
# CPU: math (auto == math on CPU)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case, dtype, math_chunking):
    B, Sq, Sk, Hq, Hkv, D, causal = case
    q, k, v, _ = make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype)
    out, lse = block_attn_forward(q, k, v, causal=causal)
    ref_out, ref_lse = reference(q, k, v, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq) and lse.is_contiguous()
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[dtype])
    assert_close_finite(lse, ref_lse, **LSE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_reference(case, dtype, math_chunking):
    B, Sq, Sk, Hq, Hkv, D, causal = case
    q, k, v, dout = make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=1)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal)
    # The backward gets the reference's (final) out and lse, as the ring code will: lse in fp32
    # (fp64 for the fp64 run, which would otherwise measure the fp32 rounding of lse).
    lse = ref_lse if dtype == torch.float64 else ref_lse.float()
    dq, dk, dv = block_attn_backward(dout, q, k, v, ref_out, lse, causal=causal)
    for name, got, want, like in (("dq", dq, ref_dq, q), ("dk", dk, ref_dk, k), ("dv", dv, ref_dv, v)):
        assert got.shape == like.shape and got.dtype == dtype and got.is_contiguous(), name
        torch.testing.assert_close(got.double(), want, **BWD_TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_empty_rows_are_zero_with_neg_inf_lse():
    # bottom_right with Sq > Sk: query rows 0..Sq-Sk-1 see no key at all.
    q, k, v, dout = make_inputs(2, 12, 5, 4, 2, 8, torch.float32)
    out, lse = block_attn_forward(q, k, v, causal="bottom_right")
    assert torch.all(out[:, :7] == 0) and torch.all(lse[:, :, :7] == NEG_INF)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 7:]).all()
    dq, dk, dv = block_attn_backward(dout, q, k, v, out, lse, causal="bottom_right")
    assert torch.all(dq[:, :7] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_empty_key_block():
    q, k, v, dout = make_inputs(1, 6, 0, 2, 1, 8, torch.float32)
    out, lse = block_attn_forward(q, k, v)
    assert torch.all(out == 0) and torch.all(lse == NEG_INF) and lse.shape == (1, 2, 6)
    dq, dk, dv = block_attn_backward(dout, q, k, v, out, lse)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


def test_causal_true_is_top_left_and_alignments_agree_when_square():
    q, k, v, _ = make_inputs(1, 19, 31, 4, 2, 8, torch.float64)
    assert torch.equal(block_attn_forward(q, k, v, causal=True)[0],
                       block_attn_forward(q, k, v, causal="top_left")[0])
    q, k, v, _ = make_inputs(1, 19, 19, 4, 2, 8, torch.float64)
    for a, b in zip(block_attn_forward(q, k, v, causal="top_left"),
                    block_attn_forward(q, k, v, causal="bottom_right")):
        assert torch.equal(a, b)


def test_softmax_scale_is_used():
    q, k, v, dout = make_inputs(1, 9, 13, 2, 2, 8, torch.float64)
    out, lse = block_attn_forward(q, k, v, softmax_scale=0.3)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, softmax_scale=0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    grads = block_attn_backward(dout, q, k, v, ref_out, ref_lse, softmax_scale=0.3)
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got, want)


@pytest.fixture
def score_sizes(monkeypatch):
    """The element count of every score tile the math path builds, in order."""
    sizes = []
    real = ba._math_scores

    def spy(*args, **kwargs):
        s = real(*args, **kwargs)
        sizes.append(s.numel())
        return s

    monkeypatch.setattr(ba, "_math_scores", spy)
    return sizes


def test_math_chunking_bounds_score_memory(monkeypatch, score_sizes):
    """A (B=1, H=2, 64 x 64) block with a 512-element budget runs in 4-row chunks: the math path
    never builds the whole (Sq, Sk) score matrix (a 4k x 4k block per head stays ~64 MiB)."""
    assert ba._math_rows_per_chunk(1, 32, 4096) * 32 * 4096 <= ba._MATH_CHUNK_ELEMS
    monkeypatch.setattr(ba, "_MATH_CHUNK_ELEMS", 512)
    sizes = score_sizes
    q, k, v, _ = make_inputs(1, 64, 64, 2, 1, 8, torch.float32)
    out, _ = block_attn_forward(q, k, v, causal=True)
    assert len(sizes) == 16 and max(sizes) <= 512
    torch.testing.assert_close(out.double(), reference(q, k, v, True)[0], **FWD_TOL[torch.float32])


def test_math_causal_chunks_skip_the_masked_triangle(score_sizes):
    """Causal with few heads over a long sequence (Ulysses' world-1 attention: Hq/W heads x L):
    the score budget alone would make it ONE chunk and compute the whole L x L square, twice the
    causal work. The rows are split in 8, so the scores built are 9/16 of the square (the exact
    triangle is 1/2); non-causal stays one chunk. Forward and backward still equal the reference."""
    sizes = score_sizes
    L = 2048
    q, k, v, dout = make_inputs(1, L, L, 1, 1, 8, torch.float32)
    assert ba._math_rows_per_chunk(1, 1, L) >= L  # the budget alone: one chunk
    out, lse = block_attn_forward(q, k, v, causal=True)
    assert len(sizes) == 8 and sum(sizes) == L * L * 9 // 16, sizes
    sizes.clear()
    block_attn_forward(q, k, v, causal=False)
    assert sizes == [L * L]
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal=True)
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
    sizes.clear()
    grads = block_attn_backward(dout, q, k, v, out, lse, causal=True)
    assert len(sizes) == 8 and sum(sizes) == L * L * 9 // 16, sizes
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got.double(), want, **BWD_TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_split_keys_merge_equals_full_attention(causal, heads):
    """Attention over K/V split into two blocks, merged, equals attention over all of K/V; the
    backward given the FINAL out/lse, summed (dq) / concatenated (dk, dv) over the blocks,
    equals the full gradient. With a square causal mask and keys split at s, block 0 (keys < s)
    is top_left-causal and block 1 (keys >= s, Sq != Sk) is bottom_right-causal, and its first
    s rows are empty -- the case ring attention produces."""
    from ringattn.ops import merge_attn_states

    Hq, Hkv = heads
    S, s = 40, 15
    q, k, v, dout = make_inputs(2, S, S, Hq, Hkv, 16, torch.float32, seed=3)
    blocks = [(slice(0, s), "top_left" if causal else False),
              (slice(s, S), "bottom_right" if causal else False)]
    parts = [block_attn_forward(q, k[:, sl], v[:, sl], causal=c) for sl, c in blocks]
    if causal:
        assert torch.all(parts[1][1][:, :, :s] == NEG_INF)
    out, lse = merge_attn_states(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal)
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOL[torch.float32])

    grads = [block_attn_backward(dout, q, k[:, sl], v[:, sl], out, lse, causal=c) for sl, c in blocks]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1)
    for got, want in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(got.double(), want, **BWD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_accumulates_into_outputs(dtype):
    q, k, v, dout = make_inputs(1, 21, 17, 4, 2, 8, dtype, seed=4)
    out, lse = block_attn_forward(q, k, v, causal="bottom_right")
    dq, dk, dv = block_attn_backward(dout, q, k, v, out, lse, causal="bottom_right")
    accs = [torch.ones(x.shape, dtype=torch.float32) for x in (q, k, v)]
    for _ in range(2):
        res = block_attn_backward(dout, q, k, v, out, lse, causal="bottom_right",
                                  dq_out=accs[0], dk_out=accs[1], dv_out=accs[2])
        assert all(r is a for r, a in zip(res, accs))
    # fp32 accumulators skip the rounding to q.dtype, so they differ from the returned g by that
    # rounding (bf16: unit roundoff 2^-8, relative to g) plus fp32 noise.
    tol = dict(rtol=2 ** -8, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for acc, g in zip(accs, (dq, dk, dv)):
        torch.testing.assert_close((acc - 1) / 2, g.float(), **tol)
    # Mixed: only dk accumulated; the others returned.
    acc_k = torch.zeros(k.shape, dtype=torch.float64)
    rq, rk, rv = block_attn_backward(dout, q, k, v, out, lse, causal="bottom_right", dk_out=acc_k)
    assert rk is acc_k and rq.dtype == dtype and rv.dtype == dtype


# v's head dim Dv differs from q/k's D (MLA: DeepSeek's 192 / 128): math computes it as is.
MLA_CASES = [(1, 33, 50, 6, 2, 24, 16, "bottom_right"), (2, 21, 21, 4, 4, 8, 20, True),
             (1, 50, 33, 6, 3, 16, 8, "bottom_right"), (1, 9, 30, 4, 1, 12, 32, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MLA_CASES, ids=["x".join(map(str, c[:7])) + f"-{c[7]}" for c in MLA_CASES])
def test_v_head_dim_differs_from_qk(case, dtype, math_chunking):
    B, Sq, Sk, Hq, Hkv, D, Dv, causal = case
    q, k, _, _ = make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=5)
    _, _, v, dout = make_inputs(B, Sq, Sk, Hq, Hkv, Dv, dtype, seed=6)
    out, lse = block_attn_forward(q, k, v, causal=causal)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal)
    assert out.shape == (B, Sq, Hq, Dv) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[dtype])
    assert_close_finite(lse, ref_lse, **LSE_TOL[dtype])
    lse_in = ref_lse if dtype == torch.float64 else ref_lse.float()
    grads = block_attn_backward(dout, q, k, v, ref_out, lse_in, causal=causal)
    accs = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
    block_attn_backward(dout, q, k, v, ref_out, lse_in, causal=causal, dq_out=accs[0], dk_out=accs[1],
                        dv_out=accs[2])
    for name, got, acc, want, like in zip(("dq", "dk", "dv"), grads, accs, (ref_dq, ref_dk, ref_dv), (q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, **BWD_TOL[dtype], msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(acc, want, **BWD_TOL[dtype], msg=lambda m: f"{name} (accumulated): {m}")


def test_v_head_dim_bad_shapes():
    q, k, v, dout = make_inputs(1, 8, 8, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k and v must agree on \(B, Sk, Hkv\)"):
        block_attn_forward(q, k, v[:, :, :1, :8])
    v8 = v[..., :8].contiguous()
    out, lse = block_attn_forward(q, k, v8)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 8, 4, 8\)"):
        block_attn_backward(dout, q, k, v8, out, lse)  # dout has q's head dim, not v's
    with pytest.raises(ValueError, match=r"dv_out must have shape \(1, 8, 2, 8\)"):
        block_attn_backward(out, q, k, v8, out, lse, dv_out=torch.zeros(k.shape))


def test_non_contiguous_inputs():
    # q/k/v as views of packed tensors (B, S, 3, H, D) and of a head-major buffer.
    qkv = torch.randn(2, 19, 3, 4, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(2, 4, 19, 16, dtype=torch.float64).transpose(1, 2)
    out, lse = block_attn_forward(q, k, v, causal=True)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, True)
    torch.testing.assert_close(out, ref_out)
    grads = block_attn_backward(dout, q, k, v, ref_out.transpose(1, 2).contiguous().transpose(1, 2),
                                ref_lse, causal=True)
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got, want)


def test_cpu_selection():
    q, k, v, _ = make_inputs(1, 8, 8, 2, 1, 8, torch.bfloat16)
    assert available_backends("cpu") == ["math"]
    assert select_backend(q, k, v, causal=True) == "math"
    assert set(ba.BACKENDS) == {"math", "cudnn", "flash", "efficient", "flash_attn"}
    for backend in ("cudnn", "flash", "efficient", "flash_attn"):
        with pytest.raises(ValueError, match=rf"backend='{backend}'.*(CUDA|flash_attn)"):
            block_attn_forward(q, k, v, backend=backend)


# ------------------------------------------------------------------------------------------
# Input validation


def _qkv(Sq=8, Sk=8, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    return make_inputs(1, Sq, Sk, Hq, Hkv, D, dtype)[:3]


BAD_FORWARD = [
    ("q 3-D", lambda q, k, v: ((q[0], k, v), {}), r"q must be 4-D"),
    ("k 5-D", lambda q, k, v: ((q, k[None], v), {}), r"k must be 4-D"),
    ("v shape", lambda q, k, v: ((q, k, v[:, :4]), {}), r"k and v must agree on \(B, Sk, Hkv\)"),
    ("batch", lambda q, k, v: ((q, torch.cat([k, k]), torch.cat([v, v])), {}), r"batch size mismatch"),
    ("head dim", lambda q, k, v: ((q, k[..., :4], v[..., :4]), {}), r"head dim mismatch.*D=8.*D=4"),
    ("heads", lambda q, k, v: ((q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)), {}),
     r"Hq=4 must be a multiple of .*Hkv=3"),
    ("dtype", lambda q, k, v: ((q, k.double(), v), {}), r"dtypes must be equal"),
    ("int", lambda q, k, v: ((q.long(), k, v), {}), r"q must be a floating-point"),
    ("device", lambda q, k, v: ((q, k.to("meta"), v), {}), r"one device"),
    ("scale 0", lambda q, k, v: ((q, k, v), {"softmax_scale": 0.0}), r"softmax_scale must be .*> 0"),
    ("scale nan", lambda q, k, v: ((q, k, v), {"softmax_scale": float("nan")}), r"softmax_scale"),
    ("causal", lambda q, k, v: ((q, k, v), {"causal": "diagonal"}), r"causal must be"),
    ("backend", lambda q, k, v: ((q, k, v), {"backend": "triton"}), r"backend='triton'.*unknown backend"),
]


@pytest.mark.parametrize("name,make,match", BAD_FORWARD, ids=[b[0] for b in BAD_FORWARD])
def test_forward_rejects_bad_input(name, make, match):
    args, kwargs = make(*_qkv())
    with pytest.raises(ValueError, match=match):
        block_attn_forward(*args, **kwargs)


BAD_BACKWARD = [
    ("dout shape", dict(dout=lambda t: t["dout"][:, :4]), r"dout must have shape \(1, 8, 4, 8\)"),
    ("out shape", dict(out=lambda t: t["out"][..., :2, :]), r"out must have shape"),
    ("lse shape", dict(lse=lambda t: t["lse"][..., None]), r"lse must have shape \(1, 4, 8\)"),
    ("lse int", dict(lse=lambda t: t["lse"].long()), r"lse must be a floating-point"),
    ("dq_out shape", dict(dq_out=lambda t: torch.zeros(1, 8, 2, 8)), r"dq_out must have shape"),
    ("dk_out device", dict(dk_out=lambda t: torch.zeros(1, 8, 2, 8, device="meta")), r"dk_out is on meta"),
    ("q heads", dict(q=lambda t: t["q"][:, :, :3]), r"multiple of"),
]


@pytest.mark.parametrize("name,change,match", BAD_BACKWARD, ids=[b[0] for b in BAD_BACKWARD])
def test_backward_rejects_bad_input(name, change, match):
    q, k, v = _qkv()
    out, lse = block_attn_forward(q, k, v)
    args = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse)
    for key, fn in change.items():
        args[key] = fn(args)
    kwargs = {key: args.pop(key) for key in list(args) if key.endswith("_out")}
    with pytest.raises(ValueError, match=match):
        block_attn_backward(args["dout"], args["q"], args["k"], args["v"], args["out"], args["lse"], **kwargs)


# ------------------------------------------------------------------------------------------
# Logit softcapping (Gemma 2): scores -> c * tanh(scores / c) before the mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1:6] + CASES[8:], ids=CASE_IDS[1:6] + CASE_IDS[8:])
def test_softcap_forward_and_backward_match_reference(case, dtype, math_chunking):
    """math with softcap against autograd through the capped float64 reference (empty rows and
    both alignments included), into fp32 accumulators too; and the cap changes the result."""
    B, Sq, Sk, Hq, Hkv, D, causal = case
    q, k, v, dout = make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=3)
    q = q * 2  # scores ~ N(0, 4): the tanh bends most of them
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal, softcap=1.5)
    out, lse = block_attn_forward(q, k, v, causal=causal, softcap=1.5)
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[dtype])
    assert_close_finite(lse, ref_lse, **LSE_TOL[dtype])
    plain, _ = reference(q, k, v, causal)
    assert (plain - ref_out).abs().max() > 0.05  # the cap matters here
    lse_in = ref_lse if dtype == torch.float64 else ref_lse.float()
    dq, dk, dv = block_attn_backward(dout, q, k, v, ref_out, lse_in, causal=causal, softcap=1.5)
    accs = [torch.zeros(t.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for t in (q, k, v)]
    block_attn_backward(dout, q, k, v, ref_out, lse_in, causal=causal, softcap=1.5,
                        dq_out=accs[0], dk_out=accs[1], dv_out=accs[2])
    for name, got, acc, want in zip(("dq", "dk", "dv"), (dq, dk, dv), accs, (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got.double(), want, **BWD_TOL[dtype], msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(acc.double(), want, **BWD_TOL[torch.float32 if dtype != torch.float64 else dtype],
                                   msg=lambda m: f"{name} (accumulated): {m}")
    # the lse-only backward goes through the cap as well (bf16 left out: block_lse_backward hands
    # dlse to the kernel through q's dtype, one more bf16 rounding than this bound allows)
    if dtype == torch.bfloat16:
        return
    dlse = torch.randn(lse.shape, dtype=torch.float64)
    leaves = [x.detach().double().requires_grad_() for x in (q, k)]
    _, l_ref = reference(leaves[0], leaves[1], v.double(), causal, softcap=1.5)
    (l_ref.masked_fill(torch.isinf(l_ref), 0) * dlse).sum().backward()
    dq_l, dk_l = ba.block_lse_backward(dlse if dtype == torch.float64 else dlse.float(), q, k, lse_in, causal=causal,
                                       softcap=1.5)
    torch.testing.assert_close(dq_l.double(), leaves[0].grad, **BWD_TOL[dtype])
    torch.testing.assert_close(dk_l.double(), leaves[1].grad, **BWD_TOL[dtype])


def test_softcap_arguments_and_backend_choice():
    q, k, v, _ = make_inputs(1, 5, 5, 2, 1, 8, torch.float32)
    for bad in (-1.0, float("inf"), float("nan"), "2", True):
        with pytest.raises(ValueError, match="softcap must be None, 0"):
            block_attn_forward(q, k, v, softcap=bad)
    a, _ = block_attn_forward(q, k, v, softcap=0)  # 0 and None: off
    b, _ = block_attn_forward(q, k, v)
    assert torch.equal(a, b)
    assert select_backend(q, k, v, softcap=2.0) == "math"
    # SDPA's kernels have no softcap: refused by name (the device is checked first, so this case is CUDA)
    case = ba._Case(torch.device("cuda", 0), torch.bfloat16, 64, 64, 8, 8, 64, None, 30.0)
    problem = ba._case_problem.__wrapped__
    import unittest.mock as um
    with um.patch.object(ba, "_device_problem", lambda *a: None):
        for backend in ("cudnn", "flash", "efficient"):
            assert "no logit softcapping" in problem(backend, case), backend
        assert problem("math", case) is None


# ------------------------------------------------------------------------------------------
# flash_attn adapter (the package itself needs CUDA; its signature handling is checked here with
# fakes of the two interface generations, computing with the math backend)


def _fake_fa_forward(q, k, v, softmax_scale, causal, softcap=0.0):
    out, lse = block_attn_forward(q, k, v, causal="bottom_right" if causal else False,
                                  softmax_scale=softmax_scale, backend="math", softcap=softcap)
    return out, torch.where(lse == NEG_INF, float("inf"), lse)  # FA2 marks empty rows +inf


def _fake_fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, softcap=0.0):
    grads = block_attn_backward(dout, q, k, v, out, softmax_lse, softmax_scale=softmax_scale,
                                causal="bottom_right" if causal else False, backend="math", softcap=softcap)
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(src)
    return None


class FakeFlashAttn26:
    """flash_attn 2.6: window_size tuple, forward returns 8 values."""

    @staticmethod
    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                            alibi_slopes, return_softmax):
        assert dropout_p == 0.0 and window_size == (-1, -1) and not return_softmax
        out, lse = _fake_fa_forward(q, k, v, softmax_scale, causal, softcap)
        return out, q, k, v, out, lse, None, None

    @staticmethod
    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                             causal, window_size, softcap, alibi_slopes, deterministic, rng_state=None):
        assert window_size == (-1, -1) and alibi_slopes is None and rng_state is None
        return _fake_fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, softcap)


class _CustomOpLike:
    """Like torch.library.custom_op's CustomOpDef: callable, signature only on _init_fn."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


def _fa27_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                  softcap, alibi_slopes, return_softmax):
    assert (window_size_left, window_size_right) == (-1, -1)
    out, lse = _fake_fa_forward(q, k, v, softmax_scale, causal, softcap)
    return out, lse, None, None


def _fa27_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                   window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                   rng_state=None):
    assert (window_size_left, window_size_right) == (-1, -1) and not deterministic
    return _fake_fa_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, softcap)


class FakeFlashAttn27:
    """flash_attn 2.7/2.8: custom ops, window_size_left/right, forward returns 4 values."""

    _flash_attn_forward = _CustomOpLike(_fa27_forward)
    _flash_attn_backward = _CustomOpLike(_fa27_backward)


@pytest.mark.parametrize("fake", [FakeFlashAttn26, FakeFlashAttn27], ids=["2.6", "2.7"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_flash_attn_adapter(fake, causal, softcap):
    q, k, v, dout = make_inputs(1, 20, 12, 4, 2, 8, torch.float32, seed=5)
    case = ba._make_case(q, k, ba._normalize_causal(causal), softcap)  # (softcap: passed by name)
    out, lse = ba._flash_attn_forward(q, k, v, 0.25, case, interface=fake)
    if causal:  # the public wrapper turns the kernel's +inf empty-row lse into -inf
        lse[:, :, :8] = NEG_INF
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal, softmax_scale=0.25,
                                                               softcap=softcap or None)
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
    assert_close_finite(lse, ref_lse, **LSE_TOL[torch.float32])
    grads = ba._flash_attn_backward(dout, q, k, v, ref_out.float(), ref_lse.float(), 0.25, case,
                                    (None, None, None), interface=fake)
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got.double(), want, **BWD_TOL[torch.float32])


def test_flash_attn_adapter_rejects_unknown_signature():
    def fwd(q, k, v, dropout_p, softmax_scale, causal, sink_tokens):
        raise AssertionError("must not be called")

    with pytest.raises(RuntimeError, match="unknown required parameter 'sink_tokens'"):
        ba._fa_call(fwd, dict(q=1, k=2, v=3, dropout_p=0.0, softmax_scale=1.0, causal=False))
    with pytest.raises(RuntimeError, match="returned 5 values"):
        ba._fa_forward_outputs((1, 2, 3, 4, 5))


# ------------------------------------------------------------------------------------------
# GPU: every fused backend against fp64, with the "2x PyTorch's own error" rule

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ["cudnn", "flash", "efficient", "flash_attn", "auto"]
# (B, Sq, Sk, Hq, Hkv, D, causal, dtype)
GPU_CASES = [
    (2, 256, 256, 4, 4, 64, False, torch.bfloat16),
    (1, 256, 256, 8, 2, 128, True, torch.bfloat16),  # GQA, square causal
    (1, 128, 384, 4, 1, 64, "top_left", torch.float16),  # MQA, rectangular
    (1, 384, 128, 4, 2, 64, "bottom_right", torch.bfloat16),  # 256 empty rows
    (1, 128, 384, 4, 2, 64, "bottom_right", torch.bfloat16),
    (1, 77, 131, 6, 3, 72, False, torch.bfloat16),  # odd lengths, D % 8 == 0 but not % 16
    (1, 1, 200, 8, 2, 128, False, torch.bfloat16),  # a single query row with GQA
    (1, 200, 200, 2, 2, 256, True, torch.bfloat16),  # largest supported head dim
    (1, 100, 150, 4, 2, 64, "bottom_right", torch.float32),  # fp32: efficient / math only
]
GPU_CASE_IDS = ["x".join(map(str, c[:6])) + f"-{c[6]}-{str(c[7])[6:]}" for c in GPU_CASES]


def _gpu_inputs(case, packed=False):
    B, Sq, Sk, Hq, Hkv, D, causal, dtype = case
    q, k, v, dout = make_inputs(B, Sq, Sk, Hq, Hkv, D, dtype, device="cuda", seed=7)
    if packed and Sq == Sk and Hq == Hkv:
        # (B, S, 3, H, D) packed qkv: views with a non-standard sequence stride.
        q, k, v = torch.stack([q, k, v], dim=2).unbind(2)
    return q, k, v, dout


def _resolve_or_skip(backend, q, k, causal):
    """The backend to expect; None (after asserting it raises a clear ValueError) if unsupported."""
    if backend == "auto":
        return select_backend(q, k, k, causal=causal)
    case = ba._make_case(q, k, ba._normalize_causal(causal))
    if backend not in available_backends(q.device):
        pytest.skip(f"{backend} not available here: {ba._case_problem(backend, case)}")
    problem = ba._case_problem(backend, case)
    if problem is not None:
        with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run"):
            block_attn_forward(q, k, k, causal=causal, backend=backend)
        return None
    return backend


def _poison_cuda_cache():
    """Fill the caching allocator's free memory with NaN, so an output element a kernel leaves
    unwritten shows up as NaN instead of passing by luck with a fresh zero page."""
    torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # 0xFFFF... is NaN


def _err(a, b):
    fin = torch.isfinite(b)
    return (a.double()[fin] - b.double()[fin]).abs().max().item() if fin.any() else 0.0


def _assert_within_2x(name, got, ref, lowp, slack):
    err, base = _err(got, ref), _err(lowp, ref)
    assert err <= 2 * base + slack, f"{name}: error {err:.3g} > 2 x PyTorch-lowp error {base:.3g} + {slack}"


@gpu
@needs_cuda
@pytest.mark.parametrize("packed", [False, True], ids=["contig", "packed"])
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_CASE_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_reference(backend, case, packed):
    causal, dtype = case[6], case[7]
    q, k, v, dout = _gpu_inputs(case, packed)
    chosen = _resolve_or_skip(backend, q, k, causal)
    if chosen is None:
        return
    _poison_cuda_cache()
    out, lse = block_attn_forward(q, k, v, causal=causal, backend=backend)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, causal)
    lp_out, lp_lse, lp_dq, lp_dk, lp_dv = reference_grads(q, k, v, dout, causal, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape and lse.is_contiguous()
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows must have lse -inf"
    assert torch.all(out.transpose(1, 2)[torch.isneginf(ref_lse)] == 0), "empty rows must be 0"
    # Slack: fp32 kernels/refs are so close that the 2x rule alone would demand ~1e-7.
    _assert_within_2x(f"{chosen} out", out, ref_out, lp_out, 1e-5)
    _assert_within_2x(f"{chosen} lse", lse, ref_lse, lp_lse, 1e-4)
    # Backward from the fp64 FINAL out/lse (what a ring step receives).
    _poison_cuda_cache()
    dq, dk, dv = block_attn_backward(dout, q, k, v, ref_out.float(), ref_lse.float(), causal=causal,
                                     backend=backend)
    for name, got, ref, lowp, like in (("dq", dq, ref_dq, lp_dq, q), ("dk", dk, ref_dk, lp_dk, k),
                                       ("dv", dv, ref_dv, lp_dv, v)):
        assert got.shape == like.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"{chosen} {name} has non-finite values"
        _assert_within_2x(f"{chosen} {name}", got, ref, lowp, 1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_softcap(dtype):
    """softcap= on CUDA: auto takes flash_attn when installed, else math (SDPA's kernels have no
    softcap and refuse it by name); against the capped fp64 reference within 2x of plain PyTorch in
    that precision, forward and backward (into fp32 accumulators, as the rings do)."""
    q, k, v, dout = make_inputs(1, 200, 300, 8, 4, 128, dtype, device="cuda", seed=23)
    q = q * 4  # scores of O(4): the cap (Gemma 2's 50 scaled down to 2) bends them
    picked = select_backend(q, k, v, causal="bottom_right", softcap=2.0)
    assert picked in ("flash_attn", "math"), picked
    for backend in ("cudnn", "flash", "efficient"):
        with pytest.raises(ValueError, match="no logit softcapping"):
            block_attn_forward(q, k, v, causal="bottom_right", backend=backend, softcap=2.0)
    out, lse = block_attn_forward(q, k, v, causal="bottom_right", softcap=2.0)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, "bottom_right", softcap=2.0)
    lp = reference_grads(q, k, v, dout, "bottom_right", compute_dtype=dtype, softcap=2.0)
    _assert_within_2x(f"{picked} out", out, ref_out, lp[0], 1e-5)
    _assert_within_2x(f"{picked} lse", lse, ref_lse, lp[1], 1e-4)
    accs = [torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v)]
    block_attn_backward(dout, q, k, v, ref_out.to(dtype), ref_lse.float(), causal="bottom_right", softcap=2.0,
                        dq_out=accs[0], dk_out=accs[1], dv_out=accs[2])
    for name, got, ref, lowp in zip(("dq", "dk", "dv"), accs, (ref_dq, ref_dk, ref_dv), lp[2:]):
        _assert_within_2x(f"{picked} {name}", got, ref, lowp, 1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("dims", [(192, 128), (64, 128)], ids=["deepseek", "v_wider"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_v_head_dim_differs(backend, dims):
    """MLA head dims through each kernel (run zero-padded to max(D, Dv): exact) vs fp64, within 2x
    of plain PyTorch in bf16; gradients accumulated into fp32 buffers as the rings do."""
    D, Dv = dims
    q, k, _, _ = make_inputs(1, 200, 300, 8, 8, D, torch.bfloat16, device="cuda", seed=21)
    _, _, v, dout = make_inputs(1, 200, 300, 8, 8, Dv, torch.bfloat16, device="cuda", seed=22)
    wide = ba._make_case(q if D >= Dv else v, k if D >= Dv else v, "bottom_right")
    if backend != "auto" and (backend not in available_backends(q.device) or ba._case_problem(backend, wide)):
        pytest.skip(f"{backend} cannot run head dim {max(D, Dv)} here")
    out, lse = block_attn_forward(q, k, v, causal="bottom_right", backend=backend)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, "bottom_right")
    lp = reference_grads(q, k, v, dout, "bottom_right", compute_dtype=torch.bfloat16)
    assert out.shape == (1, 200, 8, Dv) and out.dtype == torch.bfloat16
    _assert_within_2x(f"{backend} out", out, ref_out, lp[0], 1e-5)
    _assert_within_2x(f"{backend} lse", lse, ref_lse, lp[1], 1e-4)
    accs = [torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v)]
    block_attn_backward(dout, q, k, v, ref_out.float(), ref_lse.float(), causal="bottom_right", backend=backend,
                        dq_out=accs[0], dk_out=accs[1], dv_out=accs[2])
    for name, got, ref, lowp in zip(("dq", "dk", "dv"), accs, (ref_dq, ref_dk, ref_dv), lp[2:]):
        _assert_within_2x(f"{backend} {name}", got, ref, lowp, 1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_split_keys_ring_step(backend):
    """Two K/V blocks (block 1 bottom_right-causal with empty rows), merged in fp32, vs full
    attention; backward from the final out/lse summed over blocks vs the full gradient. Uses a
    plain-PyTorch fp32 merge so that this test does not depend on the CUDA merge kernel."""
    dtype = torch.bfloat16
    S, s = 512, 192
    q, k, v, dout = make_inputs(1, S, S, 8, 2, 128, dtype, device="cuda", seed=11)
    blocks = [(slice(0, s), "top_left"), (slice(s, S), "bottom_right")]
    for sl, c in blocks:
        if backend != "auto":
            _resolve_or_skip(backend, q, k[:, sl], c)
            if ba._case_problem(backend, ba._make_case(q, k[:, sl], c)) is not None:
                pytest.skip(f"{backend} cannot do {c} with Sq != Sk")
    _poison_cuda_cache()
    parts = [block_attn_forward(q, k[:, sl], v[:, sl], causal=c, backend=backend) for sl, c in blocks]
    lse = torch.logaddexp(parts[0][1], parts[1][1])  # B, H, S
    w = [torch.exp(p[1] - lse).transpose(1, 2).unsqueeze(-1) for p in parts]  # B, S, H, 1
    out = w[0] * parts[0][0].float() + w[1] * parts[1][0].float()
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, dout, True)
    lp_out, lp_lse, lp_dq, lp_dk, lp_dv = reference_grads(q, k, v, dout, True, compute_dtype=dtype)
    _assert_within_2x("out", out, ref_out, lp_out, 1e-5)
    _assert_within_2x("lse", lse, ref_lse, lp_lse, 1e-4)
    acc = [torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v)]
    for sl, c in blocks:
        _poison_cuda_cache()
        block_attn_backward(dout, q, k[:, sl], v[:, sl], out, lse, causal=c, backend=backend,
                            dq_out=acc[0], dk_out=acc[1][:, sl], dv_out=acc[2][:, sl])
    for name, got, ref, lowp in (("dq", acc[0], ref_dq, lp_dq), ("dk", acc[1], ref_dk, lp_dk),
                                 ("dv", acc[2], ref_dv, lp_dv)):
        _assert_within_2x(name, got, ref, lowp, 1e-4)


@gpu
@needs_cuda
def test_gpu_auto_selection_and_clear_refusals():
    dev = "cuda"
    avail = available_backends(dev)
    assert avail[-1] == "math" and "efficient" in avail

    def pick(Sq, Sk, D, dtype, causal):
        q = torch.empty(1, Sq, 8, D, device=dev, dtype=dtype)
        k = torch.empty(1, Sk, 2, D, device=dev, dtype=dtype)
        return select_backend(q, k, k, causal=causal)

    first = lambda *names: next(n for n in names if n in avail)  # noqa: E731
    assert pick(256, 256, 128, torch.bfloat16, True) == first("cudnn", "flash", "flash_attn", "efficient")
    assert pick(128, 256, 128, torch.bfloat16, "top_left") == first("cudnn", "efficient")
    assert pick(128, 256, 128, torch.bfloat16, "bottom_right") == first("flash", "flash_attn", "efficient")
    assert pick(256, 256, 128, torch.float32, False) == "efficient"
    assert pick(256, 256, 128, torch.float64, False) == "math"
    assert pick(256, 256, 300, torch.bfloat16, False) == "math"
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        if "flash" in avail:
            assert pick(256, 256, 128, torch.bfloat16, True) == "flash"

    q = torch.zeros(1, 64, 8, 128, device=dev, dtype=torch.float32)
    k = torch.zeros(1, 32, 2, 128, device=dev, dtype=torch.float32)
    if "flash" in avail:
        with pytest.raises(ValueError, match=r"backend='flash'.*fp16 and bf16 only"):
            block_attn_forward(q, k, k, backend="flash")
        with pytest.raises(ValueError, match=r"backend='flash'.*bottom_right-aligned.*'top_left'"):
            block_attn_forward(q.half(), k.half(), k.half(), causal=True, backend="flash")
    if "cudnn" in avail:
        wide = torch.zeros(1, 64, 8, 300, device=dev, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"backend='cudnn'.*D=300"):
            block_attn_forward(wide, wide, wide, backend="cudnn")
        with pytest.raises(ValueError, match=r"backend='cudnn'.*top_left-aligned.*'bottom_right'"):
            block_attn_forward(q.bfloat16(), k.bfloat16(), k.bfloat16(), causal="bottom_right",
                               backend="cudnn")
