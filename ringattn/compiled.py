"""Sequence-parallel attention under torch.compile: the whole distributed call as ONE custom op.

Eager calls go through the autograd Functions in ring_attention.py / token_ring.py. Under
torch.compile (torch.compiler.is_compiling()), sequence_parallel._run sends the call here
instead, so Dynamo never traces the ring (Python loops over P2P sends, a metadata all_gather,
host-side checks) and the surrounding model compiles without graph breaks, fullgraph=True
included:

    ringattn::sp_attention(q, k, v, group_name, algorithm, causal, softmax_scale, layout,
                           backend, grad, lse_grad, cu_seqlens=None, sliding_window=-1,
                           sinks=None, softcap=0.0) -> (out, lse, meta)
        q: (B, S_local, Hq, D); k, v: (B, S_local, Hkv, D); out like q (contiguous);
        lse: (B, Hq, S_local) fp32; meta: int64 (5,) on CPU = [algorithm code (1 ring,
        2 token_ring), softmax_scale as float64 bits, global seq_len, the plan's sliding window
        (-1: none), softcap as float64 bits (0: off)] -- what the backward needs to rebuild the
        plan without communicating again. softcap: logit softcapping (0.0: off).
        sliding_window: -1 for none. sinks: (Hq,) attention-sink logits or None: out is then the
        sinked out' and lse the attention's own (ringattn.sinks; lse' = logaddexp(lse, s) is
        traced outside the op), and the autograd formula folds the sinks into the backward op's
        dout and returns their gradient. cu_seqlens: packed sequences'
        global document boundaries, an int tensor (a list is made one; a Python list is a
        constant of the graph, so each new packing would recompile: pass a tensor).
    ringattn::sp_attention_backward(dout, q, k, v, out, lse, dlse, meta, group_name, causal,
                                    layout, backend, lse_grad, cu_seqlens=None) -> (dq, dk, dv)
        dlse: lse's gradient (B, Hq, S_local) fp32, or None; lse_grad: the forward's flag (with
        it TokenRing carries lse's gradient with Q, so every rank must use the same wire format).

Both run the same code as the eager path at run time: the signature exchange (every rank
raises the same error on bad input), algorithm="auto" (choosing between the two rings only:
which op runs, and so its output shapes, must be fixed at trace time, and the global length
auto's choice of Ulysses depends on is not), the byte accounting (comm_stats), the transports.
algorithm="ulysses" is its own op pair (below). Fake implementations give the shapes to the compiler. The group travels by name
("" = the default group, or a world of one without torch.distributed); `grad` (whether a
backward will follow, part of the signature every rank agrees on) is decided at trace time from
requires_grad, because autograd is off inside a custom op. lse is returned detached, as in
eager mode, unless lse_grad=True: then its gradient reaches the backward op (dlse), as in eager.

Inputs a traced call cannot describe (non-tensors, not 4-D) are handed to the eager path, which
raises its usual error on every rank.
"""
from __future__ import annotations

import collections
import math

import torch
import torch.distributed as dist

from ringattn import sequence_parallel as sp
from ringattn.documents import as_documents, documents_tensor, packed
from ringattn.layout import RingPlan, SequenceLayout, group_rank_and_size, no_autocast
from ringattn.sinks import rescale, sinks_backward, sinks_problem
from ringattn.ring_attention import ring_backward, ring_forward
from ringattn.token_ring import reply_for, token_ring_backward, token_ring_forward
from ringattn.ulysses import _Saved, head_blocks, seq_dim, ulysses_backward, ulysses_forward

# Runs of each op's implementation in this process (tests check that compiled code took the op).
CALLS: collections.Counter = collections.Counter()

_ALG = {"ring": 1, "token_ring": 2, "ulysses": 3}
_ALG_NAME = {v: k for k, v in _ALG.items()}


def group_name(group) -> str:
    """The name a custom op carries for `group` ("" for None / the default group)."""
    if group is None or group is dist.GroupMember.WORLD:
        return ""
    return group.group_name


def resolve_group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _meta(alg: str, plan: RingPlan) -> torch.Tensor:
    """The forward ops' meta output (module docstring): what the backward rebuilds the plan from."""
    return torch.tensor([_ALG[alg], sp._float_bits(plan.softmax_scale), plan.layout.seq_len,
                         -1 if plan.window is None else plan.window, sp._float_bits(plan.softcap)], dtype=torch.int64)


_META_LEN = 5


def _plan_from_meta(group, meta: torch.Tensor, causal: bool, layout: str, backend: str,
                    cu_seqlens=None) -> tuple[RingPlan, str]:
    alg, scale_bits, seq_len, window, cap_bits = (int(x) for x in meta.tolist())
    rank, world = group_rank_and_size(group)
    lay = SequenceLayout.build(seq_len, world, layout)
    docs, _ = as_documents(cu_seqlens)  # checked by the forward's signature exchange
    docs = packed(docs)
    return (RingPlan(group, rank, world, lay, bool(causal), sp._bits_float(scale_bits), backend, docs,
                     None if window < 0 else window, sp._bits_float(cap_bits)),
            _ALG_NAME[alg])


@torch.library.custom_op("ringattn::sp_attention", mutates_args=())
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, algorithm: str, causal: bool,
                 softmax_scale: float | None, layout: str, backend: str,
                 grad: bool, lse_grad: bool,
                 cu_seqlens: torch.Tensor | None = None,
                 sliding_window: int = -1,
                 sinks: torch.Tensor | None = None,
                 softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["sp_attention"] += 1
    group = resolve_group(group_name)
    plan, q, k, v, grad = sp._prepare("ringattn sequence-parallel attention", q, k, v, algorithm=algorithm,
                                      causal=causal, softmax_scale=softmax_scale, group=group, layout=layout,
                                      backend=backend, grad=grad, lse_grad=lse_grad, cu_seqlens=cu_seqlens,
                                      sliding_window=None if sliding_window == -1 else sliding_window,
                                      sinks=sinks, softcap=softcap)
    alg = sp._resolve_algorithm(algorithm, plan, q, k, grad, sp.ALGORITHMS, v=v)  # auto: the rings (see traced_attention)
    if alg == "ulysses":
        raise ValueError(f"ringattn::sp_attention runs 'ring', 'token_ring' or 'auto', not {alg!r} "
                         "(algorithm='ulysses' is ringattn::ulysses_attention)")
    with no_autocast(q.device):
        f32 = torch.float32 if sinks is not None else None  # sinks: rescale the fp32 rows, round once
        if alg == "ring":
            out, lse = ring_forward(plan, q, k, v, f32)
        else:
            out, lse = token_ring_forward(plan, q, k, v, reply_for(plan, q.device), f32)
        if sinks is not None:
            out = rescale(out, lse, sinks).to(q.dtype)
    return out.contiguous(), lse.contiguous(), _meta(alg, plan)


@sp_attention.register_fake
def _(q, k, v, group_name, algorithm, causal, softmax_scale, layout, backend, grad, lse_grad, cu_seqlens=None,
      sliding_window=-1, sinks=None, softcap=0.0):
    B, S, Hq, _ = q.shape
    return (q.new_empty((B, S, Hq, v.shape[3])),
            q.new_empty((B, Hq, S), dtype=torch.float32), torch.empty(_META_LEN, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("ringattn::sp_attention_backward", mutates_args=())
def sp_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dlse: torch.Tensor | None, meta: torch.Tensor, group_name: str,
                          causal: bool, layout: str, backend: str,
                          lse_grad: bool,
                          cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["sp_attention_backward"] += 1
    plan, alg = _plan_from_meta(resolve_group(group_name), meta, causal, layout, backend, cu_seqlens)
    dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
    dlse = dlse.contiguous() if lse_grad and dlse is not None else None
    with no_autocast(q.device):
        if alg == "ring":
            return ring_backward(plan, dout, q, k, v, out, lse, dlse)
        return token_ring_backward(plan, dout, q, k, v, out, lse, reply_for(plan, q.device), dlse, lse_grad)


@sp_attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, meta, group_name, causal, layout, backend, lse_grad, cu_seqlens=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, name, _alg, causal, _scale, layout, backend, _grad, lse_grad = inputs[:11]
    cu_seqlens = inputs[11] if len(inputs) > 11 else None
    sinks = inputs[13] if len(inputs) > 13 else None
    out, lse, meta = output
    ctx.save_for_backward(q, k, v, out, lse, meta, cu_seqlens, sinks)
    ctx.args = (name, causal, layout, backend, lse_grad)


def _backward(ctx, dout, dlse, _dmeta):
    # (grads of unused outputs arrive as zeros: a rank whose loss ignores lse still sends its
    # zero lse gradient, the wire format every rank agreed on)
    q, k, v, out, lse, meta, cu_seqlens, sinks = ctx.saved_tensors
    name, causal, layout, backend, lse_grad = ctx.args
    dsinks = None
    if sinks is not None:  # (traced into the backward graph: a few elementwise ops and a sum)
        with no_autocast(q.device):
            dout, dsinks = sinks_backward(dout, out, lse, sinks)
    dq, dk, dv = torch.ops.ringattn.sp_attention_backward(dout, q, k, v, out, lse, dlse if lse_grad else None,
                                                          meta, name, causal, layout, backend, lse_grad, cu_seqlens)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, dsinks, None


sp_attention.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# algorithm="ulysses" as one op. Its backward needs the forward's head-layout q, k, v, out, lse
# over the WHOLE sequence (B, L, h, D), whose length L no rank knows at trace time (uneven
# shards). So the op returns them at the start of buffers sized for an upper bound of L that the
# local shard implies (ulysses_rows), and the backward op takes the first L tokens (L from meta).
#
#   ringattn::ulysses_attention(q, k, v, group_name, causal, softmax_scale, layout, backend, grad,
#                               lse_grad, cu_seqlens=None, sliding_window=-1, sinks=None, softcap=0.0)
#       -> out, lse, meta, q_h, k_h, v_h, out_h, lse_h   (the last five: 0-size unless grad)
#   ringattn::ulysses_attention_backward(dout, dlse, q_h, k_h, v_h, out_h, lse_h, meta, group_name,
#                                        causal, layout, backend, heads_kv, cu_seqlens=None) -> dq, dk, dv


def _no_heads(q, k, v) -> tuple:
    """The op's five head-layout outputs when no backward follows (grad=False): 0-size tensors."""
    return (q.new_empty(0), k.new_empty(0), v.new_empty(0), q.new_empty(0), q.new_empty(0, dtype=torch.float32))


def ulysses_rows(n_local: int, world: int) -> int:
    """Tokens the head-layout buffers hold: >= the global length any rank's shard implies (chunks
    differ by at most one token, a rank holds one chunk, zigzag two: L <= W * (n_local + 2))."""
    return world * (n_local + 2)


def _prefix(buf: torch.Tensor, length: int) -> torch.Tensor:
    """The (B, length, h, D) / (B, h, length) tensor stored at the start of a padded buffer (a view)."""
    shape = list(buf.shape)
    shape[seq_dim(buf.dim())] = length
    return buf.view(-1)[:math.prod(shape)].view(shape)


class _Padded:
    """ulysses_forward's allocator: each head-layout tensor at the start of a buffer of `rows` tokens."""

    def __init__(self, rows: int):
        self.rows, self.buffers = rows, []

    def buffer(self, shape, dtype, device) -> torch.Tensor:
        full = list(shape)
        full[seq_dim(len(shape))] = self.rows
        buf = torch.empty(full, dtype=dtype, device=device)
        buf.view(-1)[math.prod(shape):].zero_()  # the rows past L: defined (an op's outputs are compared)
        self.buffers.append(buf)
        return buf

    def __call__(self, shape, dtype, device):
        return _prefix(self.buffer(shape, dtype, device), shape[seq_dim(len(shape))])


@torch.library.custom_op("ringattn::ulysses_attention", mutates_args=())
def ulysses_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
                         softmax_scale: float | None, layout: str, backend: str, grad: bool, lse_grad: bool,
                         cu_seqlens: torch.Tensor | None = None, sliding_window: int = -1,
                         sinks: torch.Tensor | None = None, softcap: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["ulysses_attention"] += 1
    plan, q, k, v, _ = sp._prepare("ringattn sequence-parallel attention", q, k, v, algorithm="ulysses",
                                   causal=causal, softmax_scale=softmax_scale, group=resolve_group(group_name),
                                   layout=layout, backend=backend, grad=grad, lse_grad=lse_grad,
                                   cu_seqlens=cu_seqlens, sliding_window=None if sliding_window == -1 else sliding_window,
                                   sinks=sinks, softcap=softcap)
    pad = _Padded(ulysses_rows(q.shape[1], plan.world_size)) if grad else None
    with no_autocast(q.device):
        out, lse, saved = ulysses_forward(plan, q, k, v, sinks, pad)
    meta = _meta("ulysses", plan)
    if grad:
        heads = list(pad.buffers)  # q_h, k_h, v_h (written in place by the forward)
        for t in saved.tensors[3:]:  # out_h, lse_h: copied into buffers of the same kind
            buf = pad.buffer(t.shape, t.dtype, t.device)
            _prefix(buf, plan.layout.seq_len).copy_(t)
            heads.append(buf)
    else:
        heads = _no_heads(q, k, v)
    return (out.contiguous(), lse.contiguous(), meta, *heads)


@ulysses_attention_op.register_fake
def _(q, k, v, group_name, causal, softmax_scale, layout, backend, grad, lse_grad, cu_seqlens=None,
      sliding_window=-1, sinks=None, softcap=0.0):
    B, n, Hq, D = q.shape
    Dv = v.shape[3]  # v's head dim (MLA: may differ from q/k's)
    out = (q.new_empty((B, n, Hq, Dv)),
           q.new_empty((B, Hq, n), dtype=torch.float32), torch.empty(_META_LEN, dtype=torch.int64, device="cpu"))
    if not grad:
        return out + _no_heads(q, k, v)
    rank, world = group_rank_and_size(resolve_group(group_name))
    rows = ulysses_rows(n, world)
    lo, hi, klo, khi = head_blocks(Hq, k.shape[2], world)[rank]  # (heads Ulysses cannot split: the op raises)
    return out + (q.new_empty((B, rows, hi - lo, D)), k.new_empty((B, rows, khi - klo, D)),
                  v.new_empty((B, rows, khi - klo, Dv)), q.new_empty((B, rows, hi - lo, Dv)),
                  q.new_empty((B, hi - lo, rows), dtype=torch.float32))


@torch.library.custom_op("ringattn::ulysses_attention_backward", mutates_args=())
def ulysses_attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q_h: torch.Tensor, k_h: torch.Tensor,
                               v_h: torch.Tensor, out_h: torch.Tensor, lse_h: torch.Tensor, meta: torch.Tensor,
                               group_name: str, causal: bool, layout: str, backend: str, heads_kv: int,
                               cu_seqlens: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS["ulysses_attention_backward"] += 1
    plan, _ = _plan_from_meta(resolve_group(group_name), meta, causal, layout, backend, cu_seqlens)
    L = plan.layout.seq_len
    saved = _Saved(*(_prefix(t, L) for t in (q_h, k_h, v_h, out_h, lse_h)), heads_kv)
    with no_autocast(dout.device):
        return ulysses_backward(plan, saved, dout.contiguous(), None if dlse is None else dlse.contiguous())


@ulysses_attention_backward.register_fake
def _(dout, dlse, q_h, k_h, v_h, out_h, lse_h, meta, group_name, causal, layout, backend, heads_kv, cu_seqlens=None):
    B, n, Hq, _ = dout.shape  # (dout and dv: v's head dim; dq, dk: q/k's -- MLA)
    return (dout.new_empty((B, n, Hq, q_h.shape[3]), dtype=q_h.dtype),
            dout.new_empty((B, n, heads_kv, k_h.shape[3]), dtype=k_h.dtype),
            dout.new_empty((B, n, heads_kv, v_h.shape[3]), dtype=v_h.dtype))


def _ulysses_setup(ctx, inputs, output):
    _q, k, _v, name, causal, _scale, layout, backend, _grad, lse_grad = inputs[:10]
    cu_seqlens = inputs[10] if len(inputs) > 10 else None
    sinks = inputs[12] if len(inputs) > 12 else None
    out, lse, meta, *heads = output
    ctx.save_for_backward(out, lse, meta, cu_seqlens, sinks, *heads)
    ctx.args = (name, causal, layout, backend, lse_grad, k.shape[2])


def _ulysses_backward(ctx, dout, dlse, *_unused):
    out, lse, meta, cu_seqlens, sinks, *heads = ctx.saved_tensors
    name, causal, layout, backend, lse_grad, heads_kv = ctx.args
    if heads[0].dim() != 4:
        raise RuntimeError("ringattn::ulysses_attention ran with grad=False (no head-layout tensors kept), "
                           "so it has no backward; pass grad=True when its inputs require grad")
    dsinks = None
    if sinks is not None:  # (traced into the backward graph, as for the rings)
        with no_autocast(out.device):
            dout, dsinks = sinks_backward(dout, out, lse, sinks)
    dq, dk, dv = torch.ops.ringattn.ulysses_attention_backward(dout, dlse if lse_grad else None, *heads, meta, name,
                                                               causal, layout, backend, heads_kv, cu_seqlens)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, dsinks, None


ulysses_attention_op.register_autograd(_ulysses_backward, setup_context=_ulysses_setup)


@torch.compiler.disable(reason="ringattn sequence-parallel attention: inputs the traced op cannot describe "
                               "(non-tensors or not 4-D, for which the eager path raises the error) run eagerly")
def _eager(fn, q, k, v, **kw):
    return sp._run(fn, q, k, v, **kw)


def _softcap_arg(softcap) -> float | None:
    """softcap as the traced op's float (0.0: off), or None when the op cannot carry it (the eager
    path then raises its error on every rank)."""
    try:
        return sp.check_softcap("", softcap)
    except ValueError:
        return None


def _docs_tensor(cu_seqlens):
    """cu_seqlens as the op's tensor argument, or False when the traced op cannot carry it."""
    if cu_seqlens is None or isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens
    if isinstance(cu_seqlens, (list, tuple)):
        docs, problem = as_documents(cu_seqlens)  # (per-row lists become one 2-D tensor)
        if problem is None:
            return documents_tensor(docs)
    return False


def traced_attention(fn, q, k, v, *, algorithm, causal, softmax_scale, group, layout, backend, return_lse,
                     lse_grad=False, cu_seqlens=None, sliding_window=None, sinks=None, softcap=None):
    """sequence_parallel._run under torch.compile (see the module docstring)."""
    docs = _docs_tensor(cu_seqlens)
    cap = _softcap_arg(softcap)
    window_ok = sliding_window is None or (isinstance(sliding_window, int) and not isinstance(sliding_window, bool)
                                           and 1 <= sliding_window < (1 << 62))
    four_d = all(isinstance(t, torch.Tensor) for t in (q, k, v)) and q.dim() == k.dim() == v.dim() == 4
    if docs is False or not window_ok or not (
            four_d and isinstance(algorithm, str) and isinstance(layout, str) and isinstance(backend, str)) or (
            sinks_problem(sinks, q.shape[2], q.device) is not None) or cap is None:
        return _eager(fn, q, k, v, algorithm=algorithm, causal=causal, softmax_scale=softmax_scale, group=group,
                      layout=layout, backend=backend, return_lse=return_lse, lse_grad=lse_grad,
                      cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks, softcap=softcap)
    if softmax_scale is not None:
        try:
            softmax_scale = float(softmax_scale)
        except (TypeError, ValueError):
            softmax_scale = math.nan  # refused at run time, on every rank, by the signature check
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (sinks is not None and sinks.requires_grad))
    lse_grad = bool(lse_grad)
    op = torch.ops.ringattn.ulysses_attention if algorithm == "ulysses" else torch.ops.ringattn.sp_attention
    args = () if algorithm == "ulysses" else (algorithm,)
    out, lse = op(q, k, v, group_name(group), *args, bool(causal), softmax_scale, layout, backend, bool(grad),
                  lse_grad, docs, -1 if sliding_window is None else sliding_window, sinks, cap)[:2]
    if not lse_grad:
        lse = lse.detach()
    return sp.finish(out, lse, sinks=sinks, lse_grad=lse_grad, return_lse=return_lse)


# --------------------------------------------------------------------------------------------
# gather_sequence: one op when the caller passes seq_len (the output shape is then known at
# trace time); without it the output length exists only at run time -> a graph break.
#
#   ringattn::gather_sequence(x, dim, group_name, layout, seq_len) -> full
#       x: (..., n_r, ...) with the sequence on dim; full: (..., seq_len, ...)
#   ringattn::gather_sequence_backward(g, dim, group_name, layout) -> (..., n_r, ...)

@torch.library.custom_op("ringattn::gather_sequence", mutates_args=())
def gather_sequence_op(x: torch.Tensor, dim: int, group_name: str, layout: str, seq_len: int) -> torch.Tensor:
    CALLS["gather_sequence"] += 1
    from ringattn.layout import _gather_forward
    return _gather_forward(x, dim, resolve_group(group_name), layout, seq_len)[0]


@gather_sequence_op.register_fake
def _(x, dim, group_name, layout, seq_len):
    shape = list(x.shape)
    shape[dim] = seq_len
    return x.new_empty(shape)


@torch.library.custom_op("ringattn::gather_sequence_backward", mutates_args=())
def gather_sequence_backward(g: torch.Tensor, dim: int, group_name: str, layout: str) -> torch.Tensor:
    CALLS["gather_sequence_backward"] += 1
    from ringattn.layout import _gather_backward
    return _gather_backward(g, dim, resolve_group(group_name), layout)


@gather_sequence_backward.register_fake
def _(g, dim, group_name, layout):
    rank, world = group_rank_and_size(resolve_group(group_name))
    shape = list(g.shape)
    shape[dim] = SequenceLayout.build(g.shape[dim], world, layout).local_len(rank)
    return g.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    _x, dim, name, layout, _seq_len = inputs
    ctx.args = (dim, name, layout)


def _gather_bwd(ctx, g):
    return torch.ops.ringattn.gather_sequence_backward(g, *ctx.args), None, None, None, None


gather_sequence_op.register_autograd(_gather_bwd, setup_context=_gather_setup)


@torch.compiler.disable(reason="ringattn.gather_sequence without seq_len: the output length is learned from "
                               "every rank at run time; pass seq_len= to trace it as one op")
def _eager_gather(x, dim, group, layout, seq_len):
    from ringattn.layout import _GatherSequence
    return _GatherSequence.apply(x, dim, group, layout, seq_len)


def traced_gather(x, dim, group, layout, seq_len):
    """layout.gather_sequence under torch.compile (arguments already checked)."""
    if seq_len is None:
        return _eager_gather(x, dim, group, layout, seq_len)
    return torch.ops.ringattn.gather_sequence(x, dim, group_name(group), layout, seq_len)


# --------------------------------------------------------------------------------------------
# fused_allreduce_rmsnorm (TokenWeave; inference: no autograd) as one op, for the default
# config (a TokenWeaveConfig object cannot travel through a custom op: with config= a call is a
# graph break).
#
#   ringattn::fused_allreduce_rmsnorm(x, residual, weight, eps, group_name, shard_residual_in,
#                                     shard_residual_out) -> (y, residual_new)
#       x: (..., H); residual: x's shape, or this rank's token shard (rows, H) when sharded;
#       y: x's shape; residual_new: x's shape, or the shard with shard_residual_out.

@torch.library.custom_op("ringattn::fused_allreduce_rmsnorm", mutates_args=())
def fused_allreduce_rmsnorm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               group_name: str, shard_residual_in: bool,
                               shard_residual_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["fused_allreduce_rmsnorm"] += 1
    from ringattn.tokenweave.fused_allreduce_rmsnorm import _eager_fused_allreduce_rmsnorm
    y, res = _eager_fused_allreduce_rmsnorm(x, residual, weight, eps, resolve_group(group_name),
                                            shard_residual_in=shard_residual_in,
                                            shard_residual_out=shard_residual_out, config=None)
    return y.contiguous(), res.contiguous()


@fused_allreduce_rmsnorm_op.register_fake
def _(x, residual, weight, eps, group_name, shard_residual_in, shard_residual_out):
    from ringattn.tokenweave.fused_allreduce_rmsnorm import shard_bounds
    H = x.shape[-1]
    if not shard_residual_out:
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape)
    rank, world = group_rank_and_size(resolve_group(group_name))
    begin, end = shard_bounds(x.numel() // H, world, rank)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((end - begin, H))


@torch.compiler.disable(reason="ringattn.fused_allreduce_rmsnorm with config=: a TokenWeaveConfig cannot be "
                               "passed through the traced op; leave config=None (the environment's config) to "
                               "trace it as one op")
def _eager_fused(x, residual, weight, eps, group, shard_residual_in, shard_residual_out, config):
    from ringattn.tokenweave.fused_allreduce_rmsnorm import _eager_fused_allreduce_rmsnorm
    return _eager_fused_allreduce_rmsnorm(x, residual, weight, eps, group, shard_residual_in=shard_residual_in,
                                          shard_residual_out=shard_residual_out, config=config)


def traced_fused_allreduce_rmsnorm(x, residual, weight, eps, group, shard_residual_in, shard_residual_out, config):
    """tokenweave.fused_allreduce_rmsnorm under torch.compile."""
    if config is not None or not all(isinstance(t, torch.Tensor) for t in (x, residual, weight)) or x.dim() < 1:
        return _eager_fused(x, residual, weight, eps, group, shard_residual_in, shard_residual_out, config)
    if shard_residual_out is None:
        shard_residual_out = shard_residual_in
    return torch.ops.ringattn.fused_allreduce_rmsnorm(x, residual, weight, float(eps), group_name(group),
                                                      bool(shard_residual_in), bool(shard_residual_out))
