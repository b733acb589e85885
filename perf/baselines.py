"""All-gather-KV baseline for the sequence-parallel sweep (perf/sweep.py): no ring, no overlap.

    out = allgather_attention(q, k, v, causal=True, layout="zigzag")                 # torch.distributed collectives
    out = allgather_attention(q, k, v, causal=True, layout="zigzag", transport=t)    # P2P, e.g. CudaIpcTransport

q: (B, n_r, Hq, D); k, v: (B, n_r, Hkv, D) -- this rank's tokens in `layout` (ringattn.layout, as
for ringattn.ring_attention), Hq a multiple of Hkv. Returns out like q. Differentiable in q, k, v.

Forward: every rank gathers the K and V of the WHOLE sequence, then attends its local Q to it.
  1. pack (k, v) into one (2, B, n_max, Hkv, D) buffer (n_max = longest shard; padding rows are
     zero and never read) and exchange it with every other rank:
       transport=None  dist.all_gather_into_tensor over `group` (NCCL / gloo)
       transport=t     t.batch_isend_irecv: our buffer -> each of the W-1 peers, theirs <- each
                       (one message per peer; CudaIpcTransport needs slots >= 1 and is reserved
                       here for the largest message, a collective)
  2. reorder into global order: K, V (B, L, Hkv, D).
  3. per local chunk (contiguous: 1, zigzag: 2) of global tokens [s, s+n), causal: keys [0, s)
     unmasked (one block) and keys [s, s+n) with the top-left causal mask (a second block), merged
     in fp32 with merge_attn_states_ -- so each zigzag chunk sees exactly the keys up to its own
     global position, and cuDNN (top-left only when Sq != Sk) can run every block. Non-causal: one
     block, all local Q against all L keys.
Backward: the forward's global K/V are kept (memory 2*B*L*Hkv*D*e per rank; no second gather).
  block_attn_backward per block with the final out/lse: dq into an fp32 accumulator, dK/dV of the
  whole sequence into fp32 (B, L, Hkv, D) buffers; then a reduce-scatter sends every rank the sum
  over ranks of its own rows (dist.reduce_scatter_tensor, or P2P: our partial sums of rank j's
  rows -> j, W-1 partials <- the others, summed locally). Results are cast to the input dtype.
  Memory per rank, beyond the inputs: the global K/V (2*B*L*Hkv*D*e, forward to backward), the
  gather buffer (the same again, forward only), the fp32 dK/dV of the whole sequence
  (2*B*L*Hkv*D*4), repacked rank-major into a send buffer of that size (the global K/V are freed
  before that, the unpacked dK/dV once packed); P2P adds W-1 fp32 receive shards.

Bytes (counted in ringattn.accounting, so ringattn.comm_stats() sees them, channels "ag.kv" and
"rs.dkv", by peer global rank). Both modes count the bytes of a direct exchange with every peer:
  ag.kv   sent = received = (W-1) * 2*B*n_max*Hkv*D*e          (e = element size of k/v)
  rs.dkv  sent = received = (W-1) * 2*B*n_max*Hkv*D*4          (fp32 sums)
For the P2P mode that is exactly what moves. For the collectives it is also what NCCL's ring
all-gather / reduce-scatter move per rank ((W-1)/W of the W*n_max-row buffer, in W-1 hops of
one shard each), only through the two ring neighbours instead of every peer; gloo's algorithms
may differ, the count stays this formula (allgather_comm_bytes).
The one small all_gather of every rank's local length at the start of each call is not counted
(as ringattn does not count its metadata exchange).

Tests: tests/test_perf_sweep.py (W = 2, 3 over gloo against a float64 reference, both layouts,
causal and not, GQA, all three exchange modes).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ringattn import accounting
from ringattn.block_attention import block_attn_backward, block_attn_forward
from ringattn.layout import SequenceLayout, collective_device, group_rank_and_size
from ringattn.ops import merge_attn_states_

_F32 = torch.float32
CHANNELS = ("ag.kv", "rs.dkv")


def allgather_comm_bytes(lay: SequenceLayout, rank: int, *, batch: int, heads_kv: int, head_dim: int,
                         elem_size: int, backward: bool) -> dict[str, tuple[int, int]]:
    """Bytes (sent, received) by `rank` per channel (module docstring); W = 1: nothing."""
    W = lay.world_size
    if W == 1:
        return {}
    shard = 2 * batch * max(lay.local_lengths) * heads_kv * head_dim
    result = {"ag.kv": ((W - 1) * shard * elem_size,) * 2}
    if backward:
        result["rs.dkv"] = ((W - 1) * shard * 4,) * 2
    return result


class TorchP2P:
    """torch.distributed's own batch_isend_irecv as a `transport` (the P2P mode over NCCL/gloo)."""

    @staticmethod
    def batch_isend_irecv(ops):
        return dist.batch_isend_irecv(ops)


class _Plan:
    """What forward and backward share: group, ranks, the chunk table, the blocks of this rank."""

    def __init__(self, group, layout: str, causal: bool, scale: float, backend: str, transport, q, k):
        self.group, self.causal, self.scale, self.backend, self.transport = group, causal, scale, backend, transport
        self.rank, self.world = group_rank_and_size(group)
        n = torch.tensor([q.shape[1]], dtype=torch.int64, device=collective_device(group, q.device)
                         if self.world > 1 else q.device)
        if self.world > 1:
            table = [torch.empty_like(n) for _ in range(self.world)]
            dist.all_gather(table, n, group=group)
            lengths = [int(t.item()) for t in table]
        else:
            lengths = [q.shape[1]]
        self.lay = SequenceLayout.build(sum(lengths), self.world, layout)
        if tuple(lengths) != self.lay.local_lengths:
            raise ValueError(f"allgather_attention: ranks hold {lengths} tokens, but layout={layout!r} cuts "
                             f"{sum(lengths)} tokens into {list(self.lay.local_lengths)}")
        self.global_ranks = [j if group is None else dist.get_global_rank(group, j) for j in range(self.world)]
        self.n_max = max(lengths)
        B, _, Hkv, D = k.shape
        self.B, self.Hkv, self.D = B, Hkv, D
        # Blocks: (q_start, q_len, kv_start, kv_len, causal) in local Q rows / global K rows. The
        # diagonal block of a chunk comes first: it covers every row of the chunk (initialises).
        self.blocks = []
        L = self.lay.seq_len
        if not causal:
            self.blocks.append((0, q.shape[1], 0, L, False))
        else:
            off = 0
            for s, m in self.lay.segments(self.rank):
                self.blocks.append((off, m, s, m, True))
                if s > 0:
                    self.blocks.append((off, m, 0, s, False))
                off += m

    def shard_shape(self, lead: int):
        return (lead, 2, self.B, self.n_max, self.Hkv, self.D)

    def record(self, channel: str, nbytes: int) -> None:
        for j in range(self.world):
            if j != self.rank:
                accounting.record(channel, self.global_ranks[j], nbytes, True)
                accounting.record(channel, self.global_ranks[j], nbytes, False)


def _exchange_all(plan: _Plan, mine: torch.Tensor, gathered: torch.Tensor) -> None:
    """gathered[j] <- rank j's `mine` for every j (P2P over plan.transport)."""
    ops = []
    for j in range(plan.world):
        if j == plan.rank:
            continue
        ops.append(dist.P2POp(dist.isend, mine, plan.global_ranks[j], plan.group))
        ops.append(dist.P2POp(dist.irecv, gathered[j], plan.global_ranks[j], plan.group))
    for w in plan.transport.batch_isend_irecv(ops):
        w.wait()


def _gather_kv(plan: _Plan, k: torch.Tensor, v: torch.Tensor):
    """Global K, V (B, L, Hkv, D) in global token order."""
    W, r, lay = plan.world, plan.rank, plan.lay
    n_r = k.shape[1]
    mine = k.new_zeros(plan.shard_shape(1)[1:])           # (2, B, n_max, Hkv, D)
    mine[0, :, :n_r].copy_(k)
    mine[1, :, :n_r].copy_(v)
    gathered = k.new_empty(plan.shard_shape(W))            # (W, 2, B, n_max, Hkv, D)
    if W > 1:
        plan.record("ag.kv", mine.numel() * mine.element_size())
        if plan.transport is None:
            with warnings.catch_warnings():  # torch 2.14 renames it all_gather_single; 2.11 has only this
                warnings.simplefilter("ignore", FutureWarning)
                dist.all_gather_into_tensor(gathered.view(-1), mine.view(-1), group=plan.group)
        else:
            gathered[r].copy_(mine)
            _exchange_all(plan, mine, gathered)
    else:
        gathered[0].copy_(mine)
    K = k.new_empty(plan.B, lay.seq_len, plan.Hkv, plan.D)
    V = torch.empty_like(K)
    for j in range(W):
        off = 0
        for s, m in lay.segments(j):
            K[:, s:s + m].copy_(gathered[j, 0, :, off:off + m])
            V[:, s:s + m].copy_(gathered[j, 1, :, off:off + m])
            off += m
    return K, V


def _reduce_scatter_dkv(plan: _Plan, grads: list, n_r: int):
    """This rank's rows of the sum over ranks of grads = [dK, dV] (B, L, Hkv, D) fp32 -> (B, n_r,
    Hkv, D) each. The list is emptied once packed, so the full-length buffers are freed early."""
    W, r, lay = plan.world, plan.rank, plan.lay
    dK, dV = grads
    send = dK.new_zeros(plan.shard_shape(W))               # (W, 2, B, n_max, Hkv, D) fp32, rank-major
    for j in range(W):
        off = 0
        for s, m in lay.segments(j):
            send[j, 0, :, off:off + m].copy_(dK[:, s:s + m])
            send[j, 1, :, off:off + m].copy_(dV[:, s:s + m])
            off += m
    grads.clear()
    del dK, dV
    if W == 1:
        total = send[0]
    elif plan.transport is None:
        plan.record("rs.dkv", send[0].numel() * 4)
        total = torch.empty_like(send[0])
        with warnings.catch_warnings():  # torch 2.14 renames it reduce_scatter_single; 2.11 has only this
            warnings.simplefilter("ignore", FutureWarning)
            dist.reduce_scatter_tensor(total.view(-1), send.view(-1), group=plan.group)
    else:
        plan.record("rs.dkv", send[0].numel() * 4)
        recv = {j: torch.empty_like(send[j]) for j in range(W) if j != r}   # W-1 x (2, B, n_max, Hkv, D)
        ops = []
        for j in recv:
            ops.append(dist.P2POp(dist.isend, send[j], plan.global_ranks[j], plan.group))
            ops.append(dist.P2POp(dist.irecv, recv[j], plan.global_ranks[j], plan.group))
        for w in plan.transport.batch_isend_irecv(ops):
            w.wait()
        total = send[r].clone()
        del send
        for j in sorted(recv):
            total += recv.pop(j)
    return total[0, :, :n_r], total[1, :, :n_r]


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        if plan.transport is not None and hasattr(plan.transport, "reserve") and plan.world > 1:
            elems = 2 * plan.B * plan.n_max * plan.Hkv * plan.D
            need = elems * k.element_size()
            if plan.backward:
                need = max(need, elems * 4)  # the backward's fp32 dK/dV message
            plan.transport.reserve(need)  # collective; cheap once the inboxes are large enough
        K, V = _gather_kv(plan, k, v)
        out_acc = torch.empty(q.shape, dtype=_F32, device=q.device)                   # (B, n_r, Hq, D)
        lse_acc = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=_F32, device=q.device)  # (B, Hq, n_r)
        for qs, ql, ks, kl, causal in plan.blocks:
            o, l = block_attn_forward(q.narrow(1, qs, ql), K.narrow(1, ks, kl), V.narrow(1, ks, kl),
                                      causal=causal, softmax_scale=plan.scale, backend=plan.backend)
            if causal or not plan.causal:  # the chunk's first block: initialise its rows
                out_acc.narrow(1, qs, ql).copy_(o)
                lse_acc.narrow(2, qs, ql).copy_(l)
            else:
                merge_attn_states_(out_acc.narrow(1, qs, ql), lse_acc.narrow(2, qs, ql), o, l)
        out = out_acc.to(q.dtype)
        ctx.plan, ctx.K, ctx.V = plan, K, V
        ctx.save_for_backward(q, out, lse_acc)
        ctx.kv_dtype = k.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, out, lse = ctx.saved_tensors
        plan, K, V = ctx.plan, ctx.K, ctx.V
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=_F32, device=q.device)
        dK = torch.zeros(K.shape, dtype=_F32, device=K.device)   # (B, L, Hkv, D) fp32
        dV = torch.zeros_like(dK)
        for qs, ql, ks, kl, causal in plan.blocks:
            block_attn_backward(dout.narrow(1, qs, ql), q.narrow(1, qs, ql), K.narrow(1, ks, kl),
                                V.narrow(1, ks, kl), out.narrow(1, qs, ql), lse.narrow(2, qs, ql),
                                causal=causal, softmax_scale=plan.scale, backend=plan.backend,
                                dq_out=dq.narrow(1, qs, ql), dk_out=dK.narrow(1, ks, kl),
                                dv_out=dV.narrow(1, ks, kl))
        ctx.K = ctx.V = None
        del K, V
        grads = [dK, dV]
        del dK, dV
        dk, dv = _reduce_scatter_dkv(plan, grads, q.shape[1])
        return dq.to(q.dtype), dk.to(ctx.kv_dtype), dv.to(ctx.kv_dtype), None


def allgather_attention(q, k, v, *, causal: bool = False, layout: str = "zigzag", group=None,
                        softmax_scale: float | None = None, backend: str = "auto", transport=None):
    """Sequence-parallel attention by gathering the whole K/V on every rank (module docstring).

    transport: None (torch.distributed all_gather_into_tensor / reduce_scatter_tensor over
    `group`) or an object with batch_isend_irecv(list[dist.P2POp]) -> works (P2P to every peer;
    e.g. ringattn.transport.CudaIpcTransport for ranks sharing one GPU, whose control group must
    be `group`'s ranks). Every rank of `group` must call it with the same arguments.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"allgather_attention: {name} must be a 4-D tensor (B, S_local, H, D)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"allgather_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must "
                         "agree on batch, seq_local and head_dim (k and v equal)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"allgather_attention: heads_q={q.shape[2]} is not a multiple of heads_kv={k.shape[2]}")
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[3] ** -0.5
    plan = _Plan(group, layout, bool(causal), scale, backend, transport, q, k)
    plan.backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _AllGatherAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan)
