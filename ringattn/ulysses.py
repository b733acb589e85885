"""Ulysses (DeepSpeed-Ulysses' schedule) behind the sequence-parallel API: algorithm="ulysses".

Same inputs as ring attention and TokenRing (this rank's tokens of the global sequence in
`layout`, any length); W must divide heads_q, and heads_kv must divide or be divided by W.
Rank r of W, n_j = tokens of rank j, L = sum n_j, hq = Hq/W query heads per rank, KV heads
[lo_j, hi_j) for rank j (Hkv % W == 0: Hkv/W of them; W % Hkv == 0: the one KV head its query heads
share, sent to W/Hkv ranks -- K/V are never repeated per query head):

    fwd.a2a   send q[:, :, heads_j], k, v[:, :, kv_j] of my n_r tokens to every j != r; receive
              j's n_j tokens of my heads; one concatenation of every rank's chunks (mine from my
              own tensors) in global token order, zigzag included -> (B, L, hq, D), (B, L, hkv_r, D)
    attend    one attention over the whole sequence for my heads: the world-1 plan of the ring
              code (ring_forward), so causal / documents / windows mask exactly as in the rings;
              sinks (per head) rescale here, on my head block
    fwd.out   out (B, L, hq, D) and lse (B, hq, L) back to the token owners -> (B, n_r, Hq, D),
              (B, Hq, n_r) fp32
Backward (the head-layout q, k, v, out, lse were kept from the forward, as DeepSpeed keeps them):
    bwd.dout  dout (folded with the sinks on the token owner, as the rings do) [+ dlse with
              lse_grad] to the head owners; ring_backward of the world-1 plan
    bwd.dqkv  dq (input dtype), dk, dv (input dtype; fp32 when W/Hkv ranks share a KV head, whose
              partial gradients the token owner sums) back to the token owners

Every all-to-all is W-1 sends and W-1 receives of one P2PComm batch (one channel each), so it
runs over torch.distributed (NCCL/gloo) and the CUDA-IPC transport alike and is counted by
ringattn.comm_stats; ulysses_comm_bytes is the formula. Nothing is hidden behind compute: the
all-to-alls run before and after the attention (what DeepSpeed-Ulysses does too); the bytes per
rank do not grow with W, where a ring's do.
"""
from __future__ import annotations

import torch

from ringattn.comm import P2PComm
from ringattn.layout import RingPlan, SequenceLayout
from ringattn.ring_attention import ring_backward, ring_forward
from ringattn.sinks import rescale

_F32 = torch.float32


def heads_problem(heads_q: int, heads_kv: int, world: int) -> str | None:
    """Why Ulysses cannot split these heads over `world` ranks (None: it can)."""
    if heads_q % world:
        return (f"algorithm='ulysses' splits the heads over the group: heads_q={heads_q} must be a multiple of "
                f"the group size {world} (use 'ring' or 'token_ring')")
    if heads_kv % world and world % heads_kv:
        return (f"algorithm='ulysses' splits the heads over the group: heads_kv={heads_kv} must divide or be a "
                f"multiple of the group size {world} (use 'ring' or 'token_ring')")
    return None


def head_blocks(heads_q: int, heads_kv: int, world: int) -> list[tuple[int, int, int, int]]:
    """(q_lo, q_hi, kv_lo, kv_hi) of every rank: its query heads and the KV heads they use."""
    hq, g = heads_q // world, heads_q // heads_kv
    out = []
    for j in range(world):
        lo, hi = j * hq, (j + 1) * hq
        out.append((lo, hi, lo // g, (hi - 1) // g + 1))
    return out


def _global_order(lay: SequenceLayout) -> list[tuple[int, int, int, int]]:
    """(global start, rank, local offset, length) of every chunk, in global token order."""
    segs = []
    for j in range(lay.world_size):
        off = 0
        for start, n in lay.segments(j):
            segs.append((start, j, off, n))
            off += n
    return sorted(segs)


def _single(plan: RingPlan) -> RingPlan:
    """The world-1 plan over the whole sequence: the attention one head owner runs."""
    lay1 = SequenceLayout.build(plan.layout.seq_len, 1, "contiguous")
    return RingPlan(None, 0, 1, lay1, plan.causal, plan.softmax_scale, plan.backend, plan.documents, plan.window,
                    plan.softcap)


def _exchange(plan: RingPlan, channel: str, send, recv_shapes, device) -> list:
    """One all-to-all batch. send[j]: list of contiguous tensors for rank j != r; recv_shapes[j]:
    list of (shape, dtype) to receive from j != r. Returns recv[j] (list of tensors; [] for j = r:
    a rank's own block never travels)."""
    W, r = plan.world_size, plan.rank
    recv = [[torch.empty(s, dtype=dt, device=device) for s, dt in recv_shapes[j]] if j != r else []
            for j in range(W)]
    biggest = max([t.numel() * t.element_size() for j in range(W) if j != r for t in send[j] + recv[j]] or [0])
    comm = P2PComm(plan.group, channel, biggest)
    for step in range(1, W):  # pairwise order (r+s, r-s), the same on both ends of every pair
        to, frm = (r + step) % W, (r - step) % W
        for t in send[to]:
            if t.numel():
                comm.send(t, to)
        for t in recv[frm]:
            if t.numel():
                comm.recv(t, frm)
    comm.commit()
    comm.wait()
    return recv


def seq_dim(ndim: int) -> int:
    """The token dim of a (B, S, H, D) tensor (1) or an lse-like (B, H, S) one (2); the head dim is the other."""
    return 2 if ndim == 3 else 1


def _heads(t, lo, hi):
    """Heads lo:hi of a (B, n, H, D) / lse-like (B, H, n) tensor (a view)."""
    return t[:, lo:hi] if t.dim() == 3 else t[:, :, lo:hi]


def _empty(shape, dtype, device, alloc):
    return torch.empty(shape, dtype=dtype, device=device) if alloc is None else alloc(shape, dtype, device)


def _to_heads(plan: RingPlan, channel: str, tensors: list, blocks: list, alloc=None) -> list:
    """seq -> heads: each (B, n_r, H_i, D) / lse-like (B, H_i, n_r) tensor of this rank to its head
    block on every rank; returns (B, L, h, D) / (B, h, L) in global token order, assembled by ONE
    concatenation of every rank's chunks in token order (zigzag included: no reorder pass).
    blocks[i][j] = (lo, hi) of tensor i's heads for rank j. alloc(shape, dtype, device): where the
    results go (default torch.empty)."""
    W, r, lay = plan.world_size, plan.rank, plan.layout
    dev = tensors[0].device
    send = [[_heads(t, *blocks[i][j]).contiguous() for i, t in enumerate(tensors)] if j != r else []
            for j in range(W)]
    shapes = []
    for j in range(W):
        n = lay.local_len(j)
        row = []
        for i, t in enumerate(tensors):
            h = blocks[i][r][1] - blocks[i][r][0]
            row.append(((t.shape[0], h, n) if t.dim() == 3 else (t.shape[0], n, h, t.shape[3]), t.dtype))
        shapes.append(row)
    recv = _exchange(plan, channel, send, shapes, dev)
    order = _global_order(lay)
    out = []
    for i, t in enumerate(tensors):
        dim = seq_dim(t.dim())
        part = [recv[j][i] if j != r else _heads(t, *blocks[i][r]) for j in range(W)]
        shape = list(part[r].shape)
        shape[dim] = lay.seq_len
        x = _empty(shape, t.dtype, dev, alloc)
        torch.cat([part[j].narrow(dim, off, n) for _, j, off, n in order], dim=dim, out=x)
        out.append(x)
    return out


def _to_seq(plan: RingPlan, channel: str, tensors: list, blocks: list, wire_dtypes: list) -> list:
    """heads -> seq, the inverse of _to_heads: each (B, L, h, D) / (B, h, L) head-block tensor back
    to the token owners; this rank gets (B, n_r, H, D) / (B, H, n_r) with every rank's head
    blocks. Heads several ranks hold (a shared KV head) are summed in fp32. wire_dtypes[i]: the
    dtype tensor i travels in."""
    W, r, lay = plan.world_size, plan.rank, plan.layout
    dev = tensors[0].device

    def rows_of(x, j, dim):  # rank j's tokens of a global-order tensor (one chunk: a view)
        segs = [x.narrow(dim, start, n) for start, n in lay.segments(j)]
        return segs[0] if len(segs) == 1 else torch.cat(segs, dim=dim)

    parts = []
    for t, wd in zip(tensors, wire_dtypes):
        dim = seq_dim(t.dim())
        parts.append([rows_of(t, j, dim).to(wd) for j in range(W)])
    send = [[parts[i][j].contiguous() for i in range(len(tensors))] if j != r else [] for j in range(W)]
    n_r = lay.local_len(r)
    shapes = []
    for j in range(W):
        row = []
        for i, t in enumerate(tensors):
            h = blocks[i][j][1] - blocks[i][j][0]
            row.append(((t.shape[0], h, n_r) if t.dim() == 3 else (t.shape[0], n_r, h, t.shape[3]), wire_dtypes[i]))
        shapes.append(row)
    recv = _exchange(plan, channel, send, shapes, dev)
    out = []
    for i, t in enumerate(tensors):
        hdim = 3 - seq_dim(t.dim())
        got = [recv[j][i] if j != r else parts[i][r] for j in range(W)]
        if len(set(blocks[i])) == W:  # disjoint head blocks in rank order: one concatenation
            out.append(torch.cat(got, dim=hdim))
            continue
        H = max(b[1] for b in blocks[i])  # some heads live on several ranks: sum them in fp32
        shape = (t.shape[0], H, n_r) if t.dim() == 3 else (t.shape[0], n_r, H, t.shape[3])
        full = torch.zeros(shape, dtype=_F32, device=dev)
        for j in range(W):
            _heads(full, *blocks[i][j]).add_(got[j])
        out.append(full)
    return out


class _Saved:
    """What the backward needs, in head layout and global token order (kept from the forward)."""

    def __init__(self, q_h, k_h, v_h, out_h, lse_h, heads_kv: int):
        self.tensors = (q_h, k_h, v_h, out_h, lse_h)
        self.heads_kv = heads_kv  # the call's Hkv (k_h holds this rank's block of it)


def ulysses_forward(plan: RingPlan, q, k, v, sinks=None, alloc=None):
    """q: (B, n_r, Hq, D); k, v: (B, n_r, Hkv, D) contiguous. Returns out (B, n_r, Hq, D) in q's
    dtype (rescaled by `sinks` when given), lse (B, Hq, n_r) fp32 (without the sinks, as the rings
    return it), and the head-layout tensors the backward needs. alloc: where the head-layout q, k,
    v go (_to_heads; the traced op's padded buffers)."""
    W, r = plan.world_size, plan.rank
    Hq, Hkv = q.shape[2], k.shape[2]
    hb = head_blocks(Hq, Hkv, W)
    qb, kb = [(a, b) for a, b, _, _ in hb], [(c, d) for _, _, c, d in hb]
    q_h, k_h, v_h = _to_heads(plan, "fwd.a2a", [q, k, v], [qb, kb, kb], alloc)
    out_h, lse_h = ring_forward(_single(plan), q_h, k_h, v_h,   # (B, L, hq, D), (B, hq, L) fp32
                                _F32 if sinks is not None else None)
    if sinks is not None:  # on the fp32 rows: the output is rounded once
        out_h = rescale(out_h, lse_h, sinks[qb[r][0]:qb[r][1]]).to(q.dtype)
    out, lse = _to_seq(plan, "fwd.out", [out_h, lse_h], [qb, qb], [q.dtype, _F32])
    return out, lse, _Saved(q_h, k_h, v_h, out_h, lse_h, Hkv)


def ulysses_backward(plan: RingPlan, saved: _Saved, dout, dlse=None):
    """dout (B, n_r, Hq, D) (already folded with the sinks by the caller), dlse (B, Hq, n_r) or
    None. Returns dq, dk, dv of this rank's tokens in the input dtypes."""
    q_h, k_h, v_h, out_h, lse_h = saved.tensors
    W, Hq = plan.world_size, dout.shape[2]
    hb = head_blocks(Hq, saved.heads_kv, W)
    qb, kb = [(a, b) for a, b, _, _ in hb], [(c, d) for _, _, c, d in hb]
    ins = [dout.contiguous()] + ([dlse.contiguous()] if dlse is not None else [])
    got = _to_heads(plan, "bwd.dout", ins, [qb, qb][:len(ins)])
    dout_h, dlse_h = got[0], (got[1] if dlse is not None else None)
    shared_kv = len(set(kb)) < W  # W/Hkv ranks hold each KV head: their partial dK/dV are summed
    kv_wire = _F32 if shared_kv else k_h.dtype
    dq_h, dk_h, dv_h = ring_backward(_single(plan), dout_h, q_h, k_h, v_h, out_h, lse_h, dlse_h, kv_wire)
    dq, dk, dv = _to_seq(plan, "bwd.dqkv", [dq_h, dk_h, dv_h], [qb, kb, kb], [q_h.dtype, kv_wire, kv_wire])
    return dq, dk.to(k_h.dtype), dv.to(v_h.dtype)


class UlyssesAttention(torch.autograd.Function):
    """(q, k, v local shards, plan, lse_grad, sinks) -> (out, lse), as RingAttention."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, lse_grad: bool = False, sinks=None):
        out, lse, saved = ulysses_forward(plan, q, k, v, sinks)
        ctx.plan, ctx.saved, ctx.lse_grad = plan, saved, lse_grad
        ctx.save_for_backward(out, lse, sinks)
        ctx.set_materialize_grads(False)
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        from ringattn.layout import no_autocast
        from ringattn.sinks import attention_dout

        out, lse, sinks = ctx.saved_tensors
        if ctx.lse_grad and dlse is None:  # this rank's loss did not use lse, another's may have: the
            dlse = torch.zeros_like(lse)   # wire format is the forward's flag's, the same on every rank
        with no_autocast(out.device):
            dout, dsinks = attention_dout(dout, out, lse, sinks)
            dq, dk, dv = ulysses_backward(ctx.plan, ctx.saved, dout, dlse)
        ctx.saved = None
        return dq, dk, dv, None, None, dsinks


def ulysses_comm_bytes(lay: SequenceLayout, rank: int, *, batch: int, heads_q: int, heads_kv: int, head_dim: int,
                       elem_size: int, backward: bool, lse_grad: bool = False,
                       v_head_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """Bytes (sent, received) by `rank` per channel (docs/sequence_parallel.md, "Ulysses"), with
    n_j the tokens of rank j, hq = Hq/W, hkv_j = the KV heads of rank j, e the element size, and
    per head c_j = hq*D + hkv_j*(D + Dv) the q, k, v columns rank j's heads hold (Dv = v_head_dim,
    v's head dim, MLA; None: D):

      fwd.a2a   sent B*e * n_r * sum_{j!=r} c_j                 recv B*e * c_r * sum_{j!=r} n_j
      fwd.out   sent B*hq*(Dv*e + 4) * sum_{j!=r} n_j           recv B*hq*(Dv*e + 4) * (W-1) * n_r
      bwd.dout  as fwd.out reversed (dout; + 4 B per row and head for dlse with lse_grad)
      bwd.dqkv  as fwd.a2a reversed, dk/dv in fp32 (4 bytes) when W > Hkv (ranks share a KV head)"""
    W = lay.world_size
    if W == 1:
        return {}
    hb = head_blocks(heads_q, heads_kv, W)
    hq = heads_q // W
    kv = [d - c for _, _, c, d in hb]
    n = lay.local_lengths
    others = sum(n) - n[rank]
    B, D, e = batch, head_dim, elem_size
    Dv = D if v_head_dim is None else v_head_dim
    cols = [hq * D + kv[j] * (D + Dv) for j in range(W)]
    a2a = (B * e * n[rank] * sum(cols[j] for j in range(W) if j != rank), B * e * cols[rank] * others)
    out = (B * hq * (Dv * e + 4) * others, B * hq * (Dv * e + 4) * (W - 1) * n[rank])
    result = {"fwd.a2a": a2a, "fwd.out": out}
    if backward:
        per = Dv * e + (4 if lse_grad else 0)
        result["bwd.dout"] = (B * hq * per * n[rank] * (W - 1), B * hq * per * others)
        kv_e = 4 if heads_kv < W else e

        def grads(j):  # bytes per token of rank j's head block of dq, dk, dv
            return hq * D * e + kv[j] * (D + Dv) * kv_e
        result["bwd.dqkv"] = (B * others * grads(rank), B * n[rank] * sum(grads(j) for j in range(W) if j != rank))
    return result
