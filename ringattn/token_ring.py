"""TokenRing: K/V stay, Q travels one way, partial results travel straight back (mesh).

Forward on rank r of W. Step 0 posts step 1's fwd.q, then computes the diagonal block (own Q, own
K/V), which hides that first transfer. At step s = 1..W-1 rank r
serves as K/V owner for the Q of src = r-s and as Q owner for the K/V of dst = r+s (mod W):

    wait   fwd.q       Q_src (the rows of it that our K/V meets) has arrived
    post   fwd.q       send our Q rows -> r+s+1, recv Q rows <- r-s-1       (for step s+1)
    block  (out_p, lse_p) = block_attn_forward(Q_src rows, our K/V rows)
    wait   fwd.partial our partial from step s-1 arrived -> merge_attn_states_ into acc[rows]
    post   fwd.partial send (out_p, lse_p) -> src; recv our partial (out, lse) <- dst

fwd.q runs on the caller's group, fwd.partial on a second communicator over the same ranks
(comm.reply_group), so on NCCL the two directions move on different streams while the block
attention runs. Only the rows a block needs travel (layout.attention_block): causal contiguous
sends Q only to earlier K/V owners; causal zigzag sends a K/V owner that comes LATER than the Q
owner only the Q owner's late chunk c_{2W-1-i}, and only that chunk's partial comes back.

Backward (the published TokenRing has none). K/V still stay. The K/V owner needs, per Q row,
q, dout, lse and delta = rowsum(dout * out) -- not out itself, which is Hq*D values per token
where delta is one fp32 per head:

    step 0 post bwd.q for step 1, then block_attn_backward on the diagonal block: dq -> dq_acc,
           dk/dv -> dk_acc/dv_acc (fp32)
    wait   bwd.q       (q, dout, lse, delta) rows of src
    post   bwd.q       ours -> r+s+1, recv <- r-s-1                          (for step s+1)
    block  block_attn_backward(dout_src, q_src, our K/V rows, out', lse_src): dk/dv accumulate
           locally in fp32 (K/V never move), dq goes into an fp32 partial
    wait   bwd.dq      our dq partial from step s-1 arrived -> dq_acc[rows] += it
    post   bwd.dq      send the dq partial -> src; recv ours <- dst

out' is a stand-in with rowsum(dout * out') == delta (see _out_with_delta): block_attn_backward
uses out only through delta (its docstring: dS = P * (dout v^T - delta)). Buffers: two receive
buffers per travelling tensor and two fp32 dq partials, sized by the largest local length.
Byte formula: token_ring_comm_bytes (docs/sequence_parallel.md).
"""
from __future__ import annotations

import functools

import torch

from ringattn.comm import P2PComm, reply_group
from ringattn.documents import block_backward, block_forward, block_lse_backward_
from ringattn.layout import (Block, RingPlan, SequenceLayout, _mask_plan, collective_device, flat_view,
                             no_autocast)
from ringattn.ops import merge_attn_states_
from ringattn.sinks import attention_dout, rescale

_F32 = torch.float32


def _rows(t, start, length):
    """Token rows of a (B, S, H, D) tensor (a view)."""
    return t.narrow(1, start, length)


def _lse_rows(t, start, length):
    """Token rows of a (B, H, S) tensor (a view)."""
    return t.narrow(2, start, length)


class _Payload:
    """Contiguous send buffers of our Q-side tensors, for all rows or for one row range (the
    zigzag late chunk), made once per call (what travels must be contiguous)."""

    def __init__(self, seq_tensors, head_tensors):
        self.seq = seq_tensors    # (B, n_r, Hq, D) each
        self.head = head_tensors  # (B, Hq, n_r) each
        self._cache = {}

    def rows(self, start: int, length: int, full: int):
        if start == 0 and length == full:
            return [t.contiguous() for t in self.seq] + [t.contiguous() for t in self.head]
        key = (start, length)
        if key not in self._cache:
            self._cache[key] = ([_rows(t, start, length).contiguous() for t in self.seq]
                                + [_lse_rows(t, start, length).contiguous() for t in self.head])
        return self._cache[key]


class _QExchange:
    """One double-buffered Q-side channel: post(s) sends our rows to r+s and receives src=r-s's."""

    def __init__(self, plan: RingPlan, channel: str, payload: _Payload, seq_dtypes, head_count: int,
                 B: int, Hq: int, dims, device):
        """dims: the head dim of each seq tensor (q's D; dout's Dv: v's head dim, MLA)."""
        self.plan, self.payload = plan, payload
        rows = B * max(plan.layout.local_lengths) * Hq  # (token, head) rows of the longest shard
        biggest = max([rows * d * torch.empty(0, dtype=dt).element_size() for dt, d in zip(seq_dtypes, dims)]
                      + ([rows * 4] if head_count else []))
        self.comm = P2PComm(plan.group, channel, biggest)
        self.seq_bufs = [[torch.empty(rows * d, dtype=dt, device=device) for dt, d in zip(seq_dtypes, dims)]
                         for _ in range(2)]
        self.head_bufs = [[torch.empty(rows, dtype=_F32, device=device) for _ in range(head_count)]
                          for _ in range(2)]
        self.B, self.Hq, self.dims = B, Hq, tuple(dims)

    def post(self, s: int):
        """Returns (received tensors or None, block of src's rows that meet our K/V)."""
        p, W, r = self.plan, self.plan.world_size, self.plan.rank
        dst, src = (r + s) % W, (r - s) % W
        send_blk = p.block(r, dst)  # our Q rows that dst's K/V needs
        if send_blk is not None:
            for t in self.payload.rows(send_blk.q_start, send_blk.q_len, p.layout.local_len(r)):
                self.comm.send(t, dst)
        recv_blk = p.block(src, r)  # src's Q rows that our K/V needs
        received = None
        if recv_blk is not None:
            n = recv_blk.q_len
            received = ([flat_view(b, (self.B, n, self.Hq, d)) for b, d in zip(self.seq_bufs[s % 2], self.dims)]
                        + [flat_view(b, (self.B, self.Hq, n)) for b in self.head_bufs[s % 2]])
            for t in received:
                self.comm.recv(t, src)
        self.comm.commit()
        return received, recv_blk


def token_ring_forward(plan: RingPlan, q, k, v, reply, out_dtype=None):
    """q: (B, n_r, Hq, D); k: (B, n_r, Hkv, D), v: (B, n_r, Hkv, Dv), this rank's tokens (Dv: v's
    head dim, MLA; D otherwise). Returns out (B, n_r, Hq, Dv) in q.dtype and lse (B, Hq, n_r) fp32."""
    W, r = plan.world_size, plan.rank
    B, n_r, Hq, D = q.shape
    Dv = v.shape[3]
    kw = dict(softmax_scale=plan.softmax_scale, backend=plan.backend, softcap=plan.softcap)
    if W > 1:  # the first Q transfer is posted before the diagonal block, which then hides it
        q_x = _QExchange(plan, "fwd.q", _Payload([q], []), [q.dtype], 0, B, Hq, [D], q.device)
        nxt = q_x.post(1)
    diag = plan.block(r, r)
    out_p, lse_p = block_forward(diag, q, k, v, **kw)  # covers every row (documents: each row meets itself)
    out_acc = torch.empty((B, n_r, Hq, Dv), dtype=_F32, device=q.device).copy_(out_p)  # (B, n_r, Hq, Dv)
    lse_acc = lse_p.to(_F32).contiguous()                                      # (B, Hq, n_r)
    if W == 1:
        return out_acc.to(out_dtype or q.dtype), lse_acc

    rows = B * max(plan.layout.local_lengths) * Hq
    part_comm = P2PComm(reply, "fwd.partial", max(rows * Dv * q.element_size(), rows * 4))  # out, lse
    part_out_bufs = [torch.empty(B * n_r * Hq * Dv, dtype=q.dtype, device=q.device) for _ in range(2)]
    part_lse_bufs = [torch.empty(lse_acc.numel(), dtype=_F32, device=q.device) for _ in range(2)]

    pending = None  # (block, out, lse) of our partial in flight on fwd.partial
    for s in range(1, W):
        dst, src = (r + s) % W, (r - s) % W
        q_x.comm.wait()
        (q_in, blk) = nxt
        if s + 1 < W:
            nxt = q_x.post(s + 1)
        out_p = lse_p = None
        if blk is not None:  # src's Q rows against our K/V rows: never causal off the diagonal
            out_p, lse_p = block_forward(blk, q_in[0], _rows(k, blk.kv_start, blk.kv_len),
                                         _rows(v, blk.kv_start, blk.kv_len), **kw)
            out_p, lse_p = out_p.contiguous(), lse_p.contiguous()
        part_comm.wait()
        if pending is not None:
            own, o, l = pending
            merge_attn_states_(_rows(out_acc, own.q_start, own.q_len),
                               _lse_rows(lse_acc, own.q_start, own.q_len), o, l)
            pending = None
        if out_p is not None:
            part_comm.send(out_p, src)
            part_comm.send(lse_p, src)
        own = plan.block(r, dst)  # our Q rows that dst computed with its K/V
        if own is not None:
            o = flat_view(part_out_bufs[s % 2], (B, own.q_len, Hq, Dv))
            l = flat_view(part_lse_bufs[s % 2], (B, Hq, own.q_len))
            part_comm.recv(o, dst)
            part_comm.recv(l, dst)
            pending = (own, o, l)
        part_comm.commit()
    part_comm.wait()
    if pending is not None:
        own, o, l = pending
        merge_attn_states_(_rows(out_acc, own.q_start, own.q_len), _lse_rows(lse_acc, own.q_start, own.q_len), o, l)
    return out_acc.to(out_dtype or q.dtype), lse_acc


def _out_with_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in for `out` with rowsum(dout * out') == delta per (token, head).

    dout: (B, n, Hq, D); delta: (B, Hq, n) fp32. out' = dout * delta / |dout|^2 (fp32); a row with
    dout == 0 has delta == 0 and gets 0. block_attn_backward needs out only through
    delta = rowsum(dout * out), so this gives the same gradient as the real out while only one
    fp32 per (token, head) travelled instead of D values.
    """
    d = dout.to(_F32)
    norm2 = d.square().sum(-1, keepdim=True)                # (B, n, Hq, 1)
    c = delta.transpose(1, 2).unsqueeze(-1) / norm2         # (B, n, Hq, 1)
    return d * torch.where(norm2 > 0, c, torch.zeros_like(c))


def token_ring_backward(plan: RingPlan, dout, q, k, v, out, lse, reply, dlse=None, lse_grad=False):
    """Gradients of the local shards (dq, dk, dv in the input dtypes, fp32 accumulation).

    lse_grad (agreed by every rank in the forward's signature): lse's gradient travels with Q as a
    third fp32 per (token, head) (zeros where this rank's loss did not use lse), and every block
    gets a second, lse-only backward (block_lse_backward) where its K/V live."""
    W, r = plan.world_size, plan.rank
    B, n_r, Hq, D = q.shape
    kw = dict(softmax_scale=plan.softmax_scale, backend=plan.backend, softcap=plan.softcap)
    dq_acc = torch.zeros(q.shape, dtype=_F32, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=_F32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=_F32, device=v.device)
    g = None
    if lse_grad:  # (B, Hq, n_r) fp32
        g = (dlse.to(_F32) if dlse is not None else torch.zeros_like(lse, dtype=_F32)).contiguous()
    if W > 1:  # as in the forward: the first transfer is posted before the diagonal block
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.to(_F32) * out.to(_F32)).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, n_r)
        heads = [lse, delta] + ([g] if lse_grad else [])
        payload = _Payload([q, dout], heads)
        q_x = _QExchange(plan, "bwd.q", payload, [q.dtype, q.dtype], len(heads), B, Hq, [D, dout.shape[3]],
                         q.device)
        nxt = q_x.post(1)
    diag = plan.block(r, r)
    block_backward(diag, dout, q, k, v, out, lse, dq_out=dq_acc, dk_out=dk_acc, dv_out=dv_acc, **kw)
    if dlse is not None:
        block_lse_backward_(diag, g, q, k, lse, dq_out=dq_acc, dk_out=dk_acc, **kw)
    if W == 1:
        return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)

    numel = B * max(plan.layout.local_lengths) * Hq * D
    dq_comm = P2PComm(reply, "bwd.dq", numel * 4)
    dq_send_bufs = [torch.empty(numel, dtype=_F32, device=q.device) for _ in range(2)]
    dq_recv_bufs = [torch.empty(q.numel(), dtype=_F32, device=q.device) for _ in range(2)]

    pending = None  # (block, dq partial) of ours in flight on bwd.dq
    for s in range(1, W):
        dst, src = (r + s) % W, (r - s) % W
        q_x.comm.wait()
        (received, blk) = nxt
        if s + 1 < W:
            nxt = q_x.post(s + 1)
        dq_part = None
        if blk is not None:
            q_in, dout_in, lse_in, delta_in = received[:4]
            dq_part = flat_view(dq_send_bufs[s % 2], (B, blk.q_len, Hq, D)).zero_()
            kr = (blk.kv_start, blk.kv_len)
            block_backward(blk, dout_in, q_in, _rows(k, *kr), _rows(v, *kr), _out_with_delta(dout_in, delta_in),
                           lse_in, dq_out=dq_part, dk_out=_rows(dk_acc, *kr), dv_out=_rows(dv_acc, *kr), **kw)
            if lse_grad:  # received[4]: the owner's lse gradient for these rows
                block_lse_backward_(blk, received[4], q_in, _rows(k, *kr), lse_in, dq_out=dq_part,
                                    dk_out=_rows(dk_acc, *kr), **kw)
        dq_comm.wait()
        if pending is not None:
            own, g = pending
            _rows(dq_acc, own.q_start, own.q_len).add_(g)
            pending = None
        if dq_part is not None:
            dq_comm.send(dq_part, src)
        own = plan.block(r, dst)
        if own is not None:
            g = flat_view(dq_recv_bufs[s % 2], (B, own.q_len, Hq, D))
            dq_comm.recv(g, dst)
            pending = (own, g)
        dq_comm.commit()
    dq_comm.wait()
    if pending is not None:
        own, g = pending
        _rows(dq_acc, own.q_start, own.q_len).add_(g)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def reply_for(plan: RingPlan, device: torch.device):
    """The second communicator of plan's group (None for a world of one)."""
    return reply_group(plan.group, collective_device(plan.group, device)) if plan.world_size > 1 else None


class TokenRingAttention(torch.autograd.Function):
    """(q, k, v local shards, plan, lse_grad, sinks) -> (out, lse); lse differentiable iff
    lse_grad; sinks as in ring_attention.RingAttention (ringattn.sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, lse_grad: bool = False, sinks=None):
        reply = reply_for(plan, q.device)
        out, lse = token_ring_forward(plan, q, k, v, reply, _F32 if sinks is not None else None)
        if sinks is not None:  # on the fp32 merged rows: the output is rounded once
            out = rescale(out, lse, sinks).to(q.dtype)
        ctx.plan, ctx.reply, ctx.lse_grad = plan, reply, lse_grad
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.set_materialize_grads(False)  # dout/dlse None when unused
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        with no_autocast(q.device):  # fp32 accumulation, even if backward runs under autocast
            dout, dsinks = attention_dout(dout, out, lse, sinks)
            dq, dk, dv = token_ring_backward(ctx.plan, dout, q, k, v, out, lse, ctx.reply, dlse, ctx.lse_grad)
        return dq, dk, dv, None, None, dsinks


@functools.lru_cache(maxsize=8)
def _q_lens(lay: SequenceLayout, causal: bool, documents: tuple | None, window: int | None = None) -> tuple:
    """q_len of every trimmed (Q owner, K/V owner) block of a packed sequence or a sliding window
    (0: skipped)."""
    plan = _mask_plan(lay, causal, documents, window)  # (its block cuts shared with KV rotation's)
    W = lay.world_size
    return tuple(tuple(0 if (b := plan.block(i, j)) is None else b.q_len for j in range(W)) for i in range(W))


def token_ring_q_tokens(lay: SequenceLayout, rank: int, causal: bool, documents: tuple | None = None,
                        window: int | None = None) -> tuple[int, int]:
    """Q tokens (sent, received) by `rank` over a whole pass, in closed form:
      non-causal          sent (W-1)*n_r                       recv L - n_r
      causal contiguous   sent r*n_r (to earlier ranks only)   recv sum_{i>r} n_i
      causal zigzag       sent r*n_r + (W-1-r)*b_r             recv sum_{i>r} n_i + sum_{i<r} b_i
    with b_i = the size of rank i's late chunk c_{2W-1-i}. Partials travel back: their tokens are
    (recv, sent) of these. Packed sequences (documents): the q_len of each trimmed block,
      sent sum_{d != r} q_len(block(r, d))   recv sum_{s != r} q_len(block(s, r))
    (ringattn.documents; 0 for a pair that shares no document). A sliding window the same way
    (0 for a pair the window never reaches)."""
    W, L, n = lay.world_size, lay.seq_len, lay.local_lengths
    if W == 1:
        return 0, 0
    if documents is not None or window is not None:
        size = _q_lens(lay, bool(causal), documents, window)
        return (sum(size[rank][d] for d in range(W) if d != rank),
                sum(size[s][rank] for s in range(W) if s != rank))
    if not causal:
        return (W - 1) * n[rank], L - n[rank]
    later = sum(n[rank + 1:])
    if lay.layout == "contiguous":
        return rank * n[rank], later
    b = [n[i] - lay.first_len(i) for i in range(W)]
    return rank * n[rank] + (W - 1 - rank) * b[rank], later + sum(b[:rank])


def token_ring_comm_bytes(lay: SequenceLayout, rank: int, *, causal: bool, batch: int, heads_q: int,
                          head_dim: int, elem_size: int, backward: bool,
                          lse_grad: bool = False, documents: tuple | None = None,
                          window: int | None = None, v_head_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """Bytes (sent, received) by `rank` per channel (docs/sequence_parallel.md), with
    (Qs, Qr) = token_ring_q_tokens, t = B*Hq and Dv = v_head_dim (v's head dim, MLA; None: D):
      fwd.q        t*D*e * (Qs, Qr)
      fwd.partial  t*(Dv*e + 4) * (Qr, Qs)             out in q.dtype + fp32 lse
      bwd.q        t*((D+Dv)*e + 8) * (Qs, Qr)         q, dout + fp32 lse, delta (+4: lse's
                                                       gradient, with lse_grad)
      bwd.dq       t*D*4 * (Qr, Qs)                    fp32 dq partials
    documents: packed sequences (global boundaries), window: a causal sliding window; see
    token_ring_q_tokens.
    """
    if lay.world_size == 1:
        return {}
    qs, qr = token_ring_q_tokens(lay, rank, causal, documents, window)
    t, D, e = batch * heads_q, head_dim, elem_size
    Dv = D if v_head_dim is None else v_head_dim
    result = {"fwd.q": (t * D * e * qs, t * D * e * qr),
              "fwd.partial": (t * (Dv * e + 4) * qr, t * (Dv * e + 4) * qs)}
    if backward:
        per = (D + Dv) * e + 8 + (4 if lse_grad else 0)
        result["bwd.q"] = (t * per * qs, t * per * qr)
        result["bwd.dq"] = (t * D * 4 * qr, t * D * 4 * qs)
    return result
