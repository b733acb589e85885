"""Ring Self-Attention (KV rotation): Q stays, K/V blocks travel one hop per step.

Written for K/V travelling to r+1; plan.direction = -1 (causal zigzag: blocks shrink more that
way, RingPlan.direction) sends them to r-1: read r-1 for r+1 and j = (r + s) mod W.

Forward on rank r of W (step s = 0..W-1 holds the K/V block of rank j = (r - s) mod W):

    post   fwd.kv: send (k_cur, v_cur) -> r+1, recv (k_next, v_next) <- r-1   (double buffer)
    block  (out_p, lse_p) = block_attn_forward(Q rows, K/V rows of block j)   (rows: layout.Block)
    merge  merge_attn_states_(out_acc[rows], lse_acc[rows], out_p, lse_p)   fp32, in place
    wait   fwd.kv; k_cur, v_cur = k_next, v_next

Backward (the ring again, carrying dK/dV home):

    post   bwd.kv  as in the forward
    block  block_attn_backward(...) -> dq into dq_acc[rows] (fp32), dk/dv of block j into an
           fp32 scratch (step 0: straight into the running accumulator of the own block)
    wait   bwd.dkv: the running fp32 (dk_j, dv_j) accumulated by ranks j..r-1 arrived from r-1
    add    scratch into it; post bwd.dkv: send it -> r+1, recv the next block's <- r-1
    wait   bwd.kv
    after the loop: wait bwd.dkv once more -> the own block's (dk, dv), complete.

The dK/dV accumulators travel W hops (the last one brings block r+1's home), K/V travel W-1.

Early stop (plan.ring_steps = S < W - 1: a sliding window or short documents leave no rank a
block more than S ranks back): the loops run steps 0..S only, K/V travel S hops, and after step S
each dK/dV accumulator goes straight to its owner (rank r sends block r-S's to r-S, receives its
own from r+S) instead of around the rest of the ring.
Computing each step's dk/dv into a scratch and adding the incoming accumulator afterwards lets
the accumulator transfer overlap the block backward. Causal blocks that are fully masked are
skipped, and a hop carries only the rows of a block that some rank still ahead needs
(plan.kv_hops: causal contiguous stops a block after rank W-1; causal zigzag, K/V going to r-1,
sends a block's first chunk only once the earlier ranks have it; a window sends the w-1 rows it
reaches; the dK/dV sums travel over the first hop's rows, the owner keeping the rest home);
zero-row messages are not posted. The formula is ring_comm_bytes. Memory per rank: the local tensors, two
K/V receive buffers, two fp32 dK/dV buffers and one fp32 dK/dV scratch, each sized by the
largest local length (uneven layouts) -- never L x L.
"""
from __future__ import annotations

import torch

from ringattn.comm import P2PComm
from ringattn.documents import block_backward as run_block_backward
from ringattn.documents import block_forward, block_lse_backward_
from ringattn.layout import Block, RingPlan, SequenceLayout, flat_view, no_autocast
from ringattn.ops import merge_attn_states_
from ringattn.sinks import attention_dout, rescale

_F32 = torch.float32


def _rows(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Token rows of a (B, S, H, D) tensor (a view)."""
    return t.narrow(1, start, length)


def _lse_rows(lse: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Token rows of a (B, H, S) lse (a view)."""
    return lse.narrow(2, start, length)


def _travelling(t: torch.Tensor, rows: tuple, held_start: int = 0) -> torch.Tensor:
    """Rows (start, length) of a rank's K/V, from t (B, n, H, D) holding its rows from held_start
    on, as a contiguous tensor (a view when they are one)."""
    start, length = rows
    if length == 0:  # (an empty range is (0, 0), wherever the held rows start)
        return t.narrow(1, 0, 0)
    return _rows(t, start - held_start, length).contiguous()


def _shifted(blk: Block | None, offset: int) -> Block | None:
    """blk with its kv rows counted from `offset` (the first row of a travelling range)."""
    return blk if blk is None or offset == 0 else blk._replace(kv_start=blk.kv_start - offset)


def _q_side(blk: Block, q, out=None, dout=None, lse=None):
    return tuple(None if t is None else (_lse_rows(t, blk.q_start, blk.q_len) if t.dim() == 3
                                         else _rows(t, blk.q_start, blk.q_len))
                 for t in (q, out, dout, lse))


def ring_forward(plan: RingPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_dtype=None):
    """q: (B, n_r, Hq, D); k: (B, n_r, Hkv, D), v: (B, n_r, Hkv, Dv) contiguous, this rank's tokens
    (Dv: v's head dim, MLA; D otherwise). Returns out (B, n_r, Hq, Dv) in q.dtype (out_dtype when
    given: fp32 keeps the merged rows unrounded for the sinks' rescale) and lse (B, Hq, n_r) fp32."""
    W, r, d = plan.world_size, plan.rank, plan.direction  # K/V go to r + d (plan.next)
    B, n_r, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    S = plan.ring_steps       # last step any rank has a block at (W - 1 unless windows/documents)
    H = plan.kv_hops          # H[j][h-1]: (start, rows) of rank j's K/V that hop h carries
    R = plan.kv_ranges        # H[j][0]: the most of j's rows that travel
    rows = B * max(m for _, m in R) * Hkv  # (the most (token, head) rows of K/V one hop carries)
    comm = P2PComm(plan.group, "fwd.kv", rows * max(D, Dv) * k.element_size()) if S > 0 else None
    k_bufs = [torch.empty(rows * D, dtype=k.dtype, device=k.device) for _ in range(2 if S > 0 else 0)]
    v_bufs = [torch.empty(rows * Dv, dtype=v.dtype, device=v.device) for _ in range(2 if S > 0 else 0)]

    out_acc = lse_acc = None  # (B, n_r, Hq, Dv) fp32, (B, Hq, n_r) fp32
    k_cur = v_cur = None      # (B, rows, Hkv, D / Dv): rows H[j][s-1] of rank j = (r - d*s) mod W, received
    for s in range(S + 1):
        j = (r - d * s) % W
        held = (0, k.shape[1]) if s == 0 else H[j][s - 1]
        k_have, v_have = (k, v) if s == 0 else (k_cur, v_cur)  # rows `held` of block j
        if s < S:
            # pass block j on: the rows of it that hop s+1 carries (copies unless contiguous)
            k_out, v_out = _travelling(k_have, H[j][s], held[0]), _travelling(v_have, H[j][s], held[0])
            shape = (B, H[(r - d * (s + 1)) % W][s][1], Hkv, D)
            k_next, v_next = flat_view(k_bufs[(s + 1) % 2], shape), flat_view(v_bufs[(s + 1) % 2], shape[:3] + (Dv,))
            if k_out.shape[1]:  # (no rows: nobody downstream needs them; the receiver knows)
                comm.send(k_out, plan.next)
                comm.send(v_out, plan.next)
            if shape[1]:
                comm.recv(k_next, plan.prev)
                comm.recv(v_next, plan.prev)
            comm.commit()
        blk = _shifted(plan.block(r, j), held[0])  # kv rows into what we hold of j
        if blk is not None:
            q_rows = _rows(q, blk.q_start, blk.q_len)
            out_p, lse_p = block_forward(
                blk, q_rows, _rows(k_have, blk.kv_start, blk.kv_len), _rows(v_have, blk.kv_start, blk.kv_len),
                softmax_scale=plan.softmax_scale, backend=plan.backend, softcap=plan.softcap)
            if s == 0:  # the diagonal block covers every row: it initialises the accumulator
                out_acc = torch.empty((B, n_r, Hq, Dv), dtype=_F32, device=q.device).copy_(out_p)
                lse_acc = lse_p.to(_F32).contiguous()
            else:
                merge_attn_states_(_rows(out_acc, blk.q_start, blk.q_len),
                                   _lse_rows(lse_acc, blk.q_start, blk.q_len), out_p, lse_p)
        if s < S:
            comm.wait()
            k_cur, v_cur = k_next, v_next
    return out_acc.to(out_dtype or q.dtype), lse_acc


def ring_backward(plan: RingPlan, dout, q, k, v, out, lse, dlse=None, kv_grad_dtype=None):
    """Gradients of the local shards. dout, out: (B, n_r, Hq, Dv) (v's head dim); lse: (B, Hq, n_r) fp32 (the
    final, merged forward results); dlse: lse's gradient (B, Hq, n_r) or None. Returns dq, dk, dv
    in the input dtypes (fp32 accumulation); dk, dv in kv_grad_dtype when given (Ulysses sums the
    partial dK/dV of a KV head that several ranks hold: fp32, rounded once after the sum).

    lse's gradient: each block gets a second, lse-only backward (block_lse_backward). Local compute
    only: the ring moves the same messages, so ranks with and without a dlse stay in lockstep."""
    W, r, d = plan.world_size, plan.rank, plan.direction  # K/V and the sums go to r + d (plan.next)
    B, n_r, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    dq_acc = torch.zeros(q.shape, dtype=_F32, device=q.device)
    kw = dict(softmax_scale=plan.softmax_scale, backend=plan.backend, softcap=plan.softcap)

    def block_backward(blk: Block, k_blk, v_blk, dk_into, dv_into):
        qr, outr, doutr, lser = _q_side(blk, q, out, dout, lse)
        k_rows = _rows(k_blk, blk.kv_start, blk.kv_len)
        run_block_backward(
            blk, doutr, qr, k_rows, _rows(v_blk, blk.kv_start, blk.kv_len),
            outr, lser, dq_out=_rows(dq_acc, blk.q_start, blk.q_len),
            dk_out=_rows(dk_into, blk.kv_start, blk.kv_len), dv_out=_rows(dv_into, blk.kv_start, blk.kv_len), **kw)
        if dlse is not None:
            block_lse_backward_(blk, _lse_rows(dlse, blk.q_start, blk.q_len), qr, k_rows, lser,
                                dq_out=_rows(dq_acc, blk.q_start, blk.q_len),
                                dk_out=_rows(dk_into, blk.kv_start, blk.kv_len), **kw)

    S = plan.ring_steps
    if S == 0:  # a world of one, or no rank needs another's K/V: local only
        dk = torch.zeros(k.shape, dtype=_F32, device=k.device)
        dv = torch.zeros(v.shape, dtype=_F32, device=v.device)
        block_backward(plan.block(r, r), k, v, dk, dv)
        return dq_acc.to(q.dtype), dk.to(kv_grad_dtype or k.dtype), dv.to(kv_grad_dtype or v.dtype)

    H = plan.kv_hops    # H[j][h-1]: (start, rows) of rank j's K/V that hop h carries
    R = plan.kv_ranges  # H[j][0]: the rows of j's dK/dV sums (every contributor's rows)
    rows = B * max(m for _, m in R) * Hkv  # (the most (token, head) rows of K/V one hop carries)
    kv_comm = P2PComm(plan.group, "bwd.kv", rows * max(D, Dv) * k.element_size())
    dkv_comm = P2PComm(plan.group, "bwd.dkv", rows * max(D, Dv) * 4)
    dev = k.device
    k_bufs = [torch.empty(rows * D, dtype=k.dtype, device=dev) for _ in range(2)]
    v_bufs = [torch.empty(rows * Dv, dtype=v.dtype, device=dev) for _ in range(2)]
    dk_bufs = [torch.empty(rows * D, dtype=_F32, device=dev) for _ in range(2)]  # travelling sums
    dv_bufs = [torch.empty(rows * Dv, dtype=_F32, device=dev) for _ in range(2)]
    dk_part, dv_part = torch.empty(rows * D, dtype=_F32, device=dev), torch.empty(rows * Dv, dtype=_F32, device=dev)

    def vd(shape):  # a K-side shape with v's head dim
        return shape[:3] + (Dv,)
    a_r, m_r = R[r]
    # Our rows outside R[r] never travel: their dK/dV (our own diagonal block's) stay here, in
    # dk_home / dv_home (B, n_r, Hkv, D / Dv) fp32, and the sums of R[r] come home into them at the end.
    # With the whole chunk travelling (no windows / documents) there is nothing to keep.
    keep = (a_r, m_r) != (0, n_r)

    k_cur = v_cur = None  # (B, rows, Hkv, D): rows H[j][s-1] of rank j = (r - d*s) mod W, received
    for s in range(S + 1):
        j = (r - d * s) % W
        shape_j = (B, R[j][1], Hkv, D)  # block j's sums
        held = (0, n_r) if s == 0 else H[j][s - 1]
        k_have, v_have = (k, v) if s == 0 else (k_cur, v_cur)  # rows `held` of block j
        if s < S:
            k_out, v_out = _travelling(k_have, H[j][s], held[0]), _travelling(v_have, H[j][s], held[0])
            shape = (B, H[(r - d * (s + 1)) % W][s][1], Hkv, D)
            k_next, v_next = flat_view(k_bufs[(s + 1) % 2], shape), flat_view(v_bufs[(s + 1) % 2], vd(shape))
            if k_out.shape[1]:
                kv_comm.send(k_out, plan.next)
                kv_comm.send(v_out, plan.next)
            if shape[1]:
                kv_comm.recv(k_next, plan.prev)
                kv_comm.recv(v_next, plan.prev)
            kv_comm.commit()
        if s == 0:  # own block: into the running sums that will travel (or home, then their rows)
            if keep:
                dk_home, dv_home = (torch.zeros(t.shape, dtype=_F32, device=dev) for t in (k, v))
                block_backward(plan.block(r, r), k, v, dk_home, dv_home)
                dk_run = flat_view(dk_bufs[0], shape_j).copy_(_rows(dk_home, a_r, m_r))
                dv_run = flat_view(dv_bufs[0], vd(shape_j)).copy_(_rows(dv_home, a_r, m_r))
            else:
                dk_run, dv_run = flat_view(dk_bufs[0], shape_j).zero_(), flat_view(dv_bufs[0], vd(shape_j)).zero_()
                block_backward(plan.block(r, r), k, v, dk_run, dv_run)
        else:
            blk = _shifted(plan.block(r, j), held[0])  # kv rows into what we hold of j
            off = held[0] - R[j][0]  # the held rows inside the sums' rows
            if blk is not None:  # scratch over the held rows
                pk = _rows(flat_view(dk_part, shape_j), off, held[1])
                pv = _rows(flat_view(dv_part, vd(shape_j)), off, held[1])
                _rows(pk, blk.kv_start, blk.kv_len).zero_()
                _rows(pv, blk.kv_start, blk.kv_len).zero_()
                block_backward(blk, k_have, v_have, pk, pv)
            dkv_comm.wait()  # block j's running sums (ranks j .. r - d) are here; our last send is done
            dk_run, dv_run = flat_view(dk_bufs[s % 2], shape_j), flat_view(dv_bufs[s % 2], vd(shape_j))
            if blk is not None:
                _rows(dk_run, off + blk.kv_start, blk.kv_len).add_(_rows(pk, blk.kv_start, blk.kv_len))
                _rows(dv_run, off + blk.kv_start, blk.kv_len).add_(_rows(pv, blk.kv_start, blk.kv_len))
        # Pass block j's sums on; after step S they go straight home to j (S = W-1: that is the
        # next rank, the ring's last hop). Receive the next block's (after step S: our own).
        to, frm = (plan.next, plan.prev) if s < S else (j, (r + d * S) % W)
        shape_in = (B, R[(r - d * (s + 1)) % W if s < S else r][1], Hkv, D)
        if shape_j[1]:
            dkv_comm.send(dk_run, to)
            dkv_comm.send(dv_run, to)
        if shape_in[1]:
            dkv_comm.recv(flat_view(dk_bufs[(s + 1) % 2], shape_in), frm)
            dkv_comm.recv(flat_view(dv_bufs[(s + 1) % 2], vd(shape_in)), frm)
        dkv_comm.commit()
        if s < S:
            kv_comm.wait()
            k_cur, v_cur = k_next, v_next
    dkv_comm.wait()
    sums = (B, m_r, Hkv, D)  # our travelling rows' sums, home from rank r + S
    if not keep:
        dk = flat_view(dk_bufs[(S + 1) % 2], sums).to(kv_grad_dtype or k.dtype, copy=True)
        dv = flat_view(dv_bufs[(S + 1) % 2], vd(sums)).to(kv_grad_dtype or v.dtype, copy=True)
        return dq_acc.to(q.dtype), dk, dv
    _rows(dk_home, a_r, m_r).copy_(flat_view(dk_bufs[(S + 1) % 2], sums))
    _rows(dv_home, a_r, m_r).copy_(flat_view(dv_bufs[(S + 1) % 2], vd(sums)))
    dk, dv = dk_home.to(kv_grad_dtype or k.dtype), dv_home.to(kv_grad_dtype or v.dtype)
    return dq_acc.to(q.dtype), dk, dv


class RingAttention(torch.autograd.Function):
    """(q, k, v local shards, plan, lse_grad, sinks) -> (out, lse); lse differentiable iff
    lse_grad. sinks (Hq,) or None: out is the sinked out' and lse the attention's own (the caller
    takes lse' = sinks.sink_lse(lse, sinks)); the backward folds the sinks into dout and delta
    (ringattn.sinks) and returns their gradient."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, lse_grad: bool = False, sinks=None):
        out, lse = ring_forward(plan, q, k, v, _F32 if sinks is not None else None)
        if sinks is not None:  # on the fp32 merged rows: the output is rounded once
            out = rescale(out, lse, sinks).to(q.dtype)
        ctx.plan = plan
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
            dq, dk, dv = ring_backward(ctx.plan, dout, q, k, v, out, lse, dlse)
        return dq, dk, dv, None, None, dsinks


def ring_comm_bytes(lay: SequenceLayout, rank: int, *, batch: int, heads_kv: int, head_dim: int,
                    elem_size: int, backward: bool, steps: int | None = None,
                    hops: tuple | None = None, direction: int = 1,
                    v_head_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """Bytes (sent, received) by `rank` per channel, in closed form (docs/sequence_parallel.md),
    with S = steps (RingPlan.ring_steps; None: W - 1, the full ring) and h_j(t) = the rows of
    rank j's K/V that hop t carries (hops[j][t-1], RingPlan.kv_hops' lengths; None: n_j, the
    whole chunk, every hop); m_j = h_j(1), the rows of j's dK/dV sums:

      fwd.kv, bwd.kv  sent B*Hkv*(D+Dv)*e * sum_{s=0}^{S-1} h_{r-s}(s+1)
                      recv B*Hkv*(D+Dv)*e * sum_{s=0}^{S-1} h_{r-s-1}(s+1)
      bwd.dkv         sent = recv = B*Hkv*(D+Dv)*4 * sum_{s=0}^{S} m_{r-s}
    (Dv = v_head_dim, v's head dim: MLA; None: D.)
    Whole chunks, S = W - 1 (non-causal): sent L - n_{r+1}, received L - n_r, dK/dV L. Causal
    contiguous: a block stops after rank W-1; causal zigzag (direction -1, W > 2): a block hops
    whole while earlier ranks are ahead, then as its first chunk (RingPlan.kv_hops). S = 0: nothing.
    """
    W = lay.world_size
    S = W - 1 if steps is None else steps
    if W == 1 or S == 0:
        return {}
    if hops is None:
        hops = tuple((n,) * S for n in lay.local_lengths)
    per_token = batch * heads_kv * (head_dim + (head_dim if v_head_dim is None else v_head_dim))
    d = direction  # (RingPlan.direction: K/V go to rank + d; r-s below means r - d*s)
    sent = sum(hops[(rank - d * s) % W][s] for s in range(S))
    recv = sum(hops[(rank - d * (s + 1)) % W][s] for s in range(S))
    kv = (per_token * elem_size * sent, per_token * elem_size * recv)
    result = {"fwd.kv": kv}
    if backward:
        sums = per_token * 4 * sum(hops[(rank - d * s) % W][0] for s in range(S + 1))
        result["bwd.kv"] = kv
        result["bwd.dkv"] = (sums, sums)
    return result
