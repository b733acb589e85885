"""perf/peers.py: the peer libraries the sweep measures next to ringattn, and the flash_attn shim.

A comparison is only worth something if the peers compute the right answer on the sweep's
inputs, so:
- the shim (perf/flash_attn_shim) against float64 in one process: flash-attn 2.7's forward and
  backward contract (bottom-right causal with Sq != Sk, GQA, dq/dk/dv written into the caller's
  strided buffers, softmax_d), and its refusals (fp32, dropout, windows, varlen);
- every peer (ring-flash-attn, yunchang USP, DeepSpeed-Ulysses, PyTorch's ring engine) on real
  gloo ranks at W = 2 and 4, both layouts, causal and not, MHA and GQA, in bf16, forward and
  backward against float64 on the same rounded inputs, with ringattn's bf16 bound
  (tests/test_sequence_parallel.tolerance);
- problem(): what each peer refuses, with the reason;
- a small sweep with the peers: their rows carry the kernel and configuration, small errors, and
  refused configurations become "unsupported:" rows printed as n/a.
The peers are pip packages (scripts/setup_env.sh installs ring-flash-attn and yunchang; deepspeed
is a test dependency already). Missing ones skip these tests locally and fail them in CI.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.path.join(ROOT, "perf")
if PERF not in sys.path:
    sys.path.insert(0, PERF)

import peers  # noqa: E402
import ringattn  # noqa: E402
from test_sequence_parallel import reference, tolerance  # noqa: E402

_MISSING = [m for m in ("ring_flash_attn", "yunchang", "deepspeed") if importlib.util.find_spec(m) is None]
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI: peer packages missing {_MISSING} (scripts/setup_env.sh installs them)")
needs_peers = pytest.mark.skipif(bool(_MISSING), reason=f"peer packages not installed: {_MISSING}")


def _shim():
    peers.flash_attn_kernel("cpu")
    from flash_attn import flash_attn_interface as fa
    return fa


def test_shim_forward_backward_match_float64():
    fa = _shim()
    gen = torch.Generator().manual_seed(0)
    B, Sq, Sk, Hq, Hkv, D = 2, 24, 40, 4, 2, 16
    for causal in (False, True):
        q, dout = (torch.randn(B, Sq, Hq, D, generator=gen).bfloat16() for _ in range(2))
        k, v = (torch.randn(B, Sk, Hkv, D, generator=gen).bfloat16() for _ in range(2))
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        g = Hq // Hkv
        s = torch.einsum("bqhd,bkhd->bhqk", ref[0], ref[1].repeat_interleave(g, 2)) * D ** -0.5
        if causal:  # bottom-right: query i sees keys j <= i + Sk - Sq
            s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(Sk - Sq + 1), float("-inf"))
        want_lse = torch.logsumexp(s, -1)
        want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), ref[2].repeat_interleave(g, 2))
        want.backward(dout.double())
        out, lse, _, _ = fa._flash_attn_forward(q, k, v, 0.0, D ** -0.5, causal, -1, -1, 0.0, None, False)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
        atol, rtol = tolerance(torch.bfloat16, 1)
        assert ((out.double() - want).abs() <= atol + rtol * want.abs()).all()
        assert torch.allclose(lse.double(), want_lse, atol=1e-4)
        # ring-flash-attn hands views of bigger buffers: dq_buffer[:, :Sq] etc.
        bufs = [torch.full((B, n + 5, h, D), 7.0, dtype=torch.bfloat16) for n, h in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv))]
        views = [b[:, :n] for b, n in zip(bufs, (Sq, Sk, Sk))]
        d = fa._flash_attn_backward(dout, q, k, v, out, lse, *views, 0.0, D ** -0.5, causal, -1, -1, 0.0, None, False, None)
        for got, r in zip(views, ref):
            assert ((got.double() - r.grad).abs() <= atol + rtol * r.grad.abs()).all()
        for b, n in zip(bufs, (Sq, Sk, Sk)):
            assert (b[:, n:] == 7.0).all()   # nothing written past the view
        assert torch.allclose(d, (dout.float() * out.float()).sum(-1).transpose(1, 2), atol=1e-5)


def test_shim_refuses_what_it_does_not_compute():
    fa = _shim()
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):   # as flash-attn; see the shim's _check
        fa._flash_attn_forward(q, q, q, 0.0, 0.25, False)
    qb = q.bfloat16()
    for kw, what in ((dict(dropout_p=0.1), "dropout"), (dict(window_size_left=4), "sliding window"),
                     (dict(softcap=1.0), "softcap")):
        args = dict(q=qb, k=qb, v=qb, dropout_p=0.0, softmax_scale=0.25, causal=False)
        args.update(kw)
        with pytest.raises(NotImplementedError, match=what):
            fa._flash_attn_forward(**args)
    with pytest.raises(NotImplementedError, match="varlen"):
        fa._flash_attn_varlen_forward(qb, qb, qb)


def test_problem_names_what_each_peer_refuses():
    base = dict(seq_len=64, heads_q=4, heads_kv=2, causal=True, layout="zigzag", dtype="bfloat16", transport="gloo")
    ok = lambda alg, **kw: peers.problem(alg, dict(base, **kw), 4)  # noqa: E731
    assert ok("rfa") is None and ok("usp") is None and ok("torch_ring") is None
    assert "seq_len % 8" in ok("rfa", seq_len=63)                 # no uneven shards
    assert "causal" in ok("rfa", causal=False)                    # its zigzag asserts causal
    assert "fp16/bf16" in ok("rfa", dtype="float32")
    assert ok("torch_ring", dtype="float32") is None              # its op is ringattn's kernel
    assert "contiguous only" in ok("ds_ulysses")
    assert "heads_kv=2" in ok("ds_ulysses", layout="contiguous")  # W=4 cannot split 2 KV heads
    assert ok("ds_ulysses", layout="contiguous", heads_kv=4) is None
    assert "sliding windows" in ok("rfa", window=16)
    assert peers.usp_degrees(4, 4, 2, transport="gloo") == (2, 2)
    assert peers.usp_degrees(2, 4, 4, transport="gloo") == (1, 2)     # gloo: ring degree >= 2
    assert peers.usp_degrees(2, 4, 4, transport="nccl") == (2, 1)
    assert "sends to itself" in peers.problem("usp", dict(base, usp_ulysses=2), 2)


def _cases(world):
    out, i = [], 0
    for alg in peers.PEERS:
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                for hq, hkv in ((4, 4), (4, 2)):
                    c = dict(alg=alg, seq_len=16 * world, heads_q=hq, heads_kv=hkv, causal=causal, layout=layout,
                             dtype="bfloat16", transport="gloo", batch=1 + i % 2, seed=i)
                    i += 1
                    if peers.problem(alg, c, world) is None:
                        out.append(c)
    return out


def _peer_worker():
    """Every runnable case on this rank: a list of failure strings (empty: all passed)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    atol, rtol = tolerance(torch.bfloat16, world)
    for c in _cases(world):
        B, L, Hq, Hkv, D = c["batch"], c["seq_len"], c["heads_q"], c["heads_kv"], 16
        gen = torch.Generator().manual_seed(900 + c["seed"])
        q, dout = (torch.randn(B, L, Hq, D, generator=gen).bfloat16() for _ in range(2))
        k, v = (torch.randn(B, L, Hkv, D, generator=gen).bfloat16() for _ in range(2))
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        want, _ = reference(*ref, c["causal"], D ** -0.5)
        want.backward(dout.double())
        pos = peers.positions(c["alg"], c, world, rank, "cpu")
        loc = [t[:, pos].clone().requires_grad_() for t in (q, k, v)]
        out = peers.make_fn(c["alg"], c)(*loc)
        out.backward(dout[:, pos])
        for name, got, w in [("out", out, want[:, pos])] + [(f"d{n}", t.grad, r.grad[:, pos])
                                                             for n, t, r in zip("qkv", loc, ref)]:
            err = (got.detach().double() - w.detach()).abs()
            ratio = (err / (atol + rtol * w.detach().abs())).max().item()
            if not ratio <= 1.0:
                failures.append(f"rank {rank} {c}: {name} max abs err {err.max().item():.3g} ({ratio:.2f}x bound)")
    return failures, len(_cases(world))


@needs_peers
@pytest.mark.parametrize("world", (2, 4))
def test_peers_match_float64_reference(dist_pool, world):
    results = dist_pool(world).run(_peer_worker, timeout=400)
    failures = [f for fails, _ in results for f in fails]
    assert not failures, "\n".join(failures[:20])
    n = results[0][1]
    # every peer ran some cases (refusals are problem()'s, tested above)
    assert n >= (18 if world == 2 else 16), n


def _ds_scope_worker():
    """ds_ulysses' all-to-alls are counted in its own forward and backward only: a second
    DistributedAttention on the same deepspeed module (as ringattn's 2-D DeepSpeed path uses it)
    records nothing. Returns (bytes in the call, bytes outside it, expected)."""
    from deepspeed.sequence.layer import DistributedAttention

    import ringattn

    world = dist.get_world_size()
    c = dict(alg="ds_ulysses", seq_len=8 * world, heads_q=4, heads_kv=4, causal=True, layout="contiguous",
             dtype="bfloat16", transport="gloo", batch=1, seed=0)
    x = [torch.randn(1, 8, 4, 16).bfloat16().requires_grad_() for _ in range(3)]   # (B, L/W, H, D)
    fn = peers.make_fn("ds_ulysses", c)
    with ringattn.comm_stats() as inside:
        fn(*x).float().sum().backward()
    other = DistributedAttention(lambda q, k, v, *a, **kw: q + k + v, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    with ringattn.comm_stats() as outside:
        other(*x, 0).float().sum().backward()
    fn(*x).float().sum().backward()   # and again after it: still counted (the proxy stays installed)
    local = 8 * 4 * 16 * 2
    return inside.sent_by_channel[peers.COLLECTIVE_CHANNEL], outside.sent_bytes, 8 * local * (world - 1) // world


@needs_peers
def test_ds_ulysses_all_to_alls_are_counted_in_its_call_only(dist_pool):
    for got, outside, want in dist_pool(2).run(_ds_scope_worker, timeout=120):
        assert got == want, (got, want)
        assert outside == 0, outside


class _Counting:
    """A transport proxy counting what a peer's RingComm posts through it (CudaIpcTransport's
    host simulation underneath: the same code path as ranks sharing one GPU, on CPU)."""

    def __init__(self, inner):
        self.inner, self.slots, self.sent, self.recvd, self.largest, self.reserved = inner, inner.slots, 0, 0, 0, 0

    def reserve(self, nbytes):
        self.reserved = max(self.reserved, nbytes)
        self.inner.reserve(nbytes)

    def batch_isend_irecv(self, ops):
        for op in ops:
            is_send = op.op in (dist.isend, dist.send)
            self.sent += is_send
            self.recvd += not is_send
            self.largest = max(self.largest, op.tensor.numel() * op.tensor.element_size())
        return self.inner.batch_isend_irecv(ops)


def _routed_worker():
    """rfa and usp (U = 1) with their ring batches on a CudaIpcTransport (host simulation): results
    vs float64, every message through the transport (none through torch.distributed), within the
    reserved size. Returns failure strings."""
    from ringattn.transport import CudaIpcTransport

    rank, world = dist.get_rank(), dist.get_world_size()
    failures, made = [], []
    atol, rtol = tolerance(torch.bfloat16, world)

    def factory(group, channel):
        t = _Counting(CudaIpcTransport(group=group, slots=4, _backend="host-sim", timeout_s=60))
        made.append((channel, t))
        return t

    for i, (alg, layout, causal) in enumerate([("rfa", "zigzag", True), ("rfa", "contiguous", False),
                                               ("usp", "zigzag", True), ("usp", "contiguous", True)]):
        c = dict(seq_len=12 * world, heads_q=4, heads_kv=2, causal=causal, layout=layout, dtype="bfloat16",
                 transport="ipc", batch=2, head_dim=8)
        assert peers.problem(alg, c, world) is None, peers.problem(alg, c, world)
        gen = torch.Generator().manual_seed(40 + i)
        q, dout = (torch.randn(2, c["seq_len"], 4, 8, generator=gen).bfloat16() for _ in range(2))
        k, v = (torch.randn(2, c["seq_len"], 2, 8, generator=gen).bfloat16() for _ in range(2))
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        want, _ = reference(*ref, causal, 8 ** -0.5)
        want.backward(dout.double())
        made.clear()
        fn = peers.make_fn(alg, c, transport_factory=factory)
        pos = peers.positions(alg, c, world, rank, "cpu")
        loc = [t[:, pos].clone().requires_grad_() for t in (q, k, v)]
        fn(*loc).backward(dout[:, pos])
        (channel, t), = made
        # forward: K,V for W-1 steps; backward: K,V for W-1 steps, dK,dV for W steps
        if channel != "peer.ring" or t.sent != 6 * world - 4 or t.recvd != 6 * world - 4:
            failures.append(f"{alg} {layout}: {channel} sent {t.sent} recvd {t.recvd}, want {6 * world - 4}")
        if not 0 < t.largest <= t.reserved == peers.ipc_message_bytes(alg, c, world):
            failures.append(f"{alg} {layout}: largest message {t.largest}, reserved {t.reserved}")
        for name, got, w in zip("qkv", loc, ref):
            err = (got.grad.double() - w.grad[:, pos]).abs()
            if not (err <= atol + rtol * w.grad[:, pos].abs()).all():
                failures.append(f"{alg} {layout}: d{name} max err {err.max().item():.3g}")
        peers.make_fn(alg, c)   # no factory: that group's ring goes back to torch.distributed
        t.inner.close()
    return failures


@needs_peers
@pytest.mark.parametrize("world", (2, 3))
def test_peer_ring_messages_route_over_the_ipc_transport(dist_pool, world):
    results = dist_pool(world).run(_routed_worker, timeout=300)
    failures = [f for fails in results for f in fails]
    assert not failures, "\n".join(failures[:20])


@needs_peers
def test_sweep_runs_the_peers(tmp_path):
    out = tmp_path / "peers.csv"
    r = subprocess.run([sys.executable, os.path.join(PERF, "sweep.py"), "--no-progress", "--worlds", "2",
                        "--seqs", "128", "--heads", "4/4", "--head-dim", "16", "--dtype", "bfloat16", "--causal", "1",
                        "--pass", "fwd_bwd", "--layout", "contiguous", "--algorithms", "ring,rfa,usp,ds_ulysses,torch_ring",
                        "--warmup", "1", "--iters", "1", "--overlap-iters", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["algorithm"]: row for row in csv.DictReader(open(out, newline=""))}
    for alg in peers.PEERS:
        row = rows[alg]
        assert not row["error"], (alg, row["error"])
        assert float(row["max_abs_err"]) < 0.05, (alg, row["max_abs_err"])
        assert "math" in row["block_backend"], row["block_backend"]   # the same kernel as ringattn's rows
        assert row["peer_config"], row
    # rfa's and usp's (U = 1) ring messages are counted (ringattn.comm_stats, channel peer.ring):
    # K,V (bf16) for W-1 steps forward and again backward, dK,dV (fp32) for W steps
    kv = 1 * (128 // 2) * 4 * 16 * 2
    for alg in ("rfa", "usp"):
        assert int(rows[alg]["sent_bytes_max"]) == int(rows[alg]["recv_bytes_max"]) == (4 * 1 + 4 * 2) * kv, rows[alg]
    # torch_ring (channel peer.collective): K,V all-gathered once forward and once backward, the
    # fp32 dK,dV permuted to the next rank at each of the W steps -- the same total here
    assert int(rows["torch_ring"]["sent_bytes_max"]) == int(rows["torch_ring"]["recv_bytes_max"]) == \
        (2 * 1 + 2 * 1 + 2 * 2 * 2) * kv, rows["torch_ring"]
    # ds_ulysses (channel peer.collective): q, k, v, out forward and their gradients backward, each
    # all-to-all sending 1/W of a (1, 64, 4, 16) bf16 tensor to the other rank; counted only while
    # its call runs (ringattn's own all-to-alls go through the same deepspeed module global)
    assert int(rows["ds_ulysses"]["sent_bytes_max"]) == int(rows["ds_ulysses"]["recv_bytes_max"]) == 8 * kv // 2
    assert rows["ring"]["block_backend"] == "math" and float(rows["ring"]["max_abs_err"]) < 0.05
    assert "U=1 R=2" in rows["usp"]["peer_config"]
    # W = 4, zigzag: ringattn's 2-D mode next to yunchang's USP (same U x R = 2 x 2 split, same
    # token rule); non-causal zigzag is refused up front for the peers (an "unsupported:" row, n/a
    # in the table) while ringattn's runs it
    out2 = tmp_path / "w4.csv"
    r = subprocess.run([sys.executable, os.path.join(PERF, "sweep.py"), "--no-progress", "--worlds", "4",
                        "--seqs", "128", "--heads", "4/4", "--head-dim", "16", "--dtype", "bfloat16", "--causal", "1,0",
                        "--pass", "fwd_bwd", "--layout", "zigzag", "--algorithms", "ulysses_ring,usp,rfa", "--no-single",
                        "--warmup", "1", "--iters", "1", "--out", str(out2)], capture_output=True, text=True, timeout=200,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(row["algorithm"], row["causal"]): row for row in csv.DictReader(open(out2, newline=""))}
    for alg in ("ulysses_ring", "usp", "rfa"):
        row = rows[(alg, "True")]
        assert not row["error"] and float(row["max_abs_err"]) < 0.05, (alg, row["error"], row["max_abs_err"])
    assert "U=2 R=2" in rows[("ulysses_ring", "True")]["peer_config"] and "U=2 R=2" in rows[("usp", "True")]["peer_config"]
    # bytes: each all-to-all moves half of a (1, 32, 4, 16) bf16 tensor (2 KiB): q, k, v, out forward
    # and their gradients backward = 16 KiB on both; then the ring over R = 2 on (1, 64, 2, 16):
    # yunchang's K,V + fp32 dK,dV (12 x 4 KiB) against ringattn's ring (predict_comm_bytes)
    a2a = 8 * 2048
    assert int(rows[("usp", "True")]["sent_bytes_max"]) == int(rows[("usp", "True")]["recv_bytes_max"]) == a2a + 12 * 4096
    ring = max(sum(s for s, _ in ch.values()) for ch in ringattn.predict_comm_bytes(
        "ring", seq_len=128, world_size=2, layout="zigzag", causal=True, batch=1, heads_q=2, heads_kv=2, head_dim=16,
        dtype=torch.bfloat16, backward=True))
    assert int(rows[("ulysses_ring", "True")]["sent_bytes_max"]) == a2a + ring < a2a + 12 * 4096
    assert not rows[("ulysses_ring", "False")]["error"] and float(rows[("ulysses_ring", "False")]["max_abs_err"]) < 0.05
    assert rows[("rfa", "False")]["error"].startswith("unsupported: rfa: its zigzag ring asserts causal=True")
    assert rows[("usp", "False")]["error"].startswith("unsupported: usp: yunchang's zigzag ring asserts causal=True")
    assert "n/a" in r.stdout
