"""Typed wrappers over torch.ops.ringattn.* (schemas declared once in csrc/ops.cpp).

Each wrapper validates its arguments in Python (ValueError naming the argument; TypeError for a
non-tensor / non-number) before calling the op, so a bad call fails with a clear message rather
than deep in a kernel. Every op has a fake (meta) kernel, so it traces under torch.compile;
merge_attn_states and add_rmsnorm are differentiable (backward in PyTorch, below).

Ops:
    merge_attn_states(out_a, lse_a, out_b, lse_b) -> (out, lse)
    merge_attn_states_(acc_out, acc_lse, part_out, part_lse) -> None       (in place, fp32 acc)
    add_rmsnorm(x, residual, weight, eps) -> (y, new_residual)
    add_rmsnorm_out(y, residual_out, x, residual, weight, eps) -> None     (caller's buffers)

Shapes: out (B, S, H, D) with head_dim stride 1 (other strides arbitrary); lse (B, H, S) with
seqlen stride 1, float32. float64 lse is accepted only when every out tensor of the call is
float64 (the reference / gradcheck mode, computed in float64 throughout).
"""
from __future__ import annotations

import math
import numbers

import torch

from ringattn import _C  # noqa: F401  (loads the .so, registering the ops)

__all__ = ["merge_attn_states", "merge_attn_states_", "add_rmsnorm", "add_rmsnorm_out"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEG_INF = float("-inf")


# ---- validation ---------------------------------------------------------------------------


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_attn_pair(out, lse, out_name: str, lse_name: str, fp64_lse_ok: bool) -> None:
    """out: (B, S, H, D) float, head_dim stride 1; lse: (B, H, S) fp32, seqlen stride 1."""
    _tensor(out, out_name)
    _tensor(lse, lse_name)
    if out.dim() != 4:
        raise ValueError(f"{out_name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(out.shape)}")
    if lse.dim() != 3:
        raise ValueError(f"{lse_name} must be 3-D (batch, heads, seqlen), got shape {tuple(lse.shape)}")
    if out.dtype not in _FLOATS:
        raise ValueError(f"{out_name} must be float16/bfloat16/float32/float64, got {out.dtype}")
    if not (lse.dtype == torch.float32 or (fp64_lse_ok and lse.dtype == torch.float64)):
        raise ValueError(f"{lse_name} must be float32 (float64 only when every out tensor is float64), "
                         f"got {lse.dtype}")
    B, S, H, _ = out.shape
    if tuple(lse.shape) != (B, H, S):
        raise ValueError(f"{lse_name} must have shape (batch, heads, seqlen) = {(B, H, S)} to match "
                         f"{out_name} {tuple(out.shape)}, got {tuple(lse.shape)}")
    if out.shape[3] > 1 and out.stride(3) != 1:
        raise ValueError(f"{out_name} must be contiguous in head_dim (stride 1), got strides {out.stride()}")
    if lse.shape[2] > 1 and lse.stride(2) != 1:
        raise ValueError(f"{lse_name} must be contiguous in seqlen (stride 1), got strides {lse.stride()}")
    if lse.device != out.device:
        raise ValueError(f"{lse_name} must be on {out_name}'s device {out.device}, got {lse.device}")


def _check_like(ref, t, ref_name: str, name: str) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_merge(out_a, lse_a, out_b, lse_b) -> None:
    all64 = getattr(out_a, "dtype", None) == torch.float64 and getattr(out_b, "dtype", None) == torch.float64
    _check_attn_pair(out_a, lse_a, "out_a", "lse_a", all64)
    _check_attn_pair(out_b, lse_b, "out_b", "lse_b", all64)
    _check_like(out_a, out_b, "out_a", "out_b")
    if out_b.dtype != out_a.dtype:
        raise ValueError(f"out_b must have the dtype of out_a ({out_a.dtype}), got {out_b.dtype}")
    if lse_b.dtype != lse_a.dtype:
        raise ValueError(f"lse_b must have the dtype of lse_a ({lse_a.dtype}), got {lse_b.dtype}")


def _check_merge_inplace(acc_out, acc_lse, part_out, part_lse) -> None:
    all64 = getattr(acc_out, "dtype", None) == torch.float64 and getattr(part_out, "dtype", None) == torch.float64
    _check_attn_pair(acc_out, acc_lse, "acc_out", "acc_lse", all64)
    _check_attn_pair(part_out, part_lse, "part_out", "part_lse", all64)
    _check_like(acc_out, part_out, "acc_out", "part_out")
    if not (acc_out.dtype == torch.float32 or (all64 and acc_lse.dtype == torch.float64)):
        raise ValueError(f"acc_out must be the float32 accumulator (float64 only with float64 lse and part_out), "
                         f"got {acc_out.dtype}")
    if part_lse.dtype != acc_lse.dtype:
        raise ValueError(f"part_lse must have the dtype of acc_lse ({acc_lse.dtype}), got {part_lse.dtype}")


def _check_add_rmsnorm(x, residual, weight, eps) -> float:
    _tensor(x, "x")
    _tensor(residual, "residual")
    _tensor(weight, "weight")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (..., hidden), got a 0-D tensor")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must have shape ({hidden},) = (hidden,) of x, got {tuple(weight.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if weight.dtype not in _FLOATS:
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    if x.device.type != "cpu" and weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"weight must have the dtype of x ({x.dtype}) or float32 on {x.device.type}, "
                         f"got {weight.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)} "
                         f"(call .contiguous() first)")
    if not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous, got strides {residual.stride()} for shape "
                         f"{tuple(residual.shape)} (call .contiguous() first)")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous, got strides {weight.stride()}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_add_rmsnorm_out(y, residual_out, x) -> None:
    for t, name in ((y, "y"), (residual_out, "residual_out")):
        _tensor(t, name)
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    # Overlap between outputs and inputs is checked in C++ (needs real data pointers).


# ---- public wrappers ----------------------------------------------------------------------


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    out_*: (B, S, H, D) float, head_dim stride 1; lse_*: (B, H, S) fp32, seqlen stride 1.
    Returns (out contiguous in out_a.dtype, lse contiguous fp32):
    lse = log(exp(lse_a) + exp(lse_b)), out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.
    A side with lse -inf contributes nothing (its out may be NaN); both -inf -> out 0, lse -inf.
    Differentiable in all four inputs.
    """
    _check_merge(out_a, lse_a, out_b, lse_b)
    return torch.ops.ringattn.merge_attn_states.default(out_a, lse_a, out_b, lse_b)


def merge_attn_states_(acc_out: torch.Tensor, acc_lse: torch.Tensor, part_out: torch.Tensor,
                       part_lse: torch.Tensor) -> None:
    """Fold (part_out, part_lse) into the fp32 accumulator (acc_out, acc_lse) in place.

    acc_out (B, S, H, D) fp32 and acc_lse (B, H, S) fp32 may be views of a larger accumulator
    (e.g. acc[:, s0:s1] and acc_lse[:, :, s0:s1]): the zigzag half-block case, no copies.
    part_out may be any float dtype (bf16 partials fold into the fp32 accumulator). Not
    differentiable (the ring schedules call it inside their own autograd.Functions).
    """
    _check_merge_inplace(acc_out, acc_lse, part_out, part_lse)
    torch.ops.ringattn.merge_attn_states_.default(acc_out, acc_lse, part_out, part_lse)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; y = rmsnorm(new_residual) * weight. Returns (y, new_residual).

    x, residual: (..., hidden) contiguous, same dtype (bf16/fp16/fp32/fp64); weight: (hidden,)
    (x's dtype or fp32; any float on CPU). new_residual is rounded to x's dtype (as the eager
    `x + residual` is); the norm runs in fp32 (fp64 for fp64) and y is rounded once.
    Differentiable in x, residual and weight.
    """
    eps = _check_add_rmsnorm(x, residual, weight, eps)
    return torch.ops.ringattn.add_rmsnorm.default(x, residual, weight, eps)


def add_rmsnorm_out(y: torch.Tensor, residual_out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                    weight: torch.Tensor, eps: float = 1e-6) -> None:
    """add_rmsnorm writing into caller buffers: residual_out = x + residual; y = rmsnorm(...) * weight.

    y and residual_out: shape, dtype and device of x, contiguous, sharing memory with no input and
    not with each other. Not differentiable.
    """
    eps = _check_add_rmsnorm(x, residual, weight, eps)
    _check_add_rmsnorm_out(y, residual_out, x)
    torch.ops.ringattn.add_rmsnorm_out.default(y, residual_out, x, residual, weight, eps)


# ---- fake (meta) kernels: shapes only, for torch.compile / FakeTensor tracing ---------------


@torch.library.register_fake("ringattn::merge_attn_states")
def _merge_attn_states_fake(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)  # contiguous, like the kernels


@torch.library.register_fake("ringattn::merge_attn_states_")
def _merge_attn_states_inplace_fake(acc_out, acc_lse, part_out, part_lse):
    return None


@torch.library.register_fake("ringattn::add_rmsnorm")
def _add_rmsnorm_fake(x, residual, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ringattn::add_rmsnorm_out")
def _add_rmsnorm_out_fake(y, residual_out, x, residual, weight, eps):
    return None


# ---- autograd -----------------------------------------------------------------------------
# merge: with w_a = exp(lse_a - lse), w_b = exp(lse_b - lse) (w_a + w_b = 1),
#   out = w_a out_a + w_b out_b, lse = log(exp(lse_a) + exp(lse_b)), and
#   d lse / d lse_a = w_a,   d w_a / d lse_a = w_a (1 - w_a),   d w_b / d lse_a = -w_a w_b, so
#   d out / d lse_a = w_a (out_a - out). Hence, per row (sum over head_dim d):
#   grad out_a = w_a * dout
#   grad lse_a = w_a * (sum_d dout * (out_a - out) + dlse)        (and the same for b).
# A side with lse -inf has w = 0: no gradient (and its out is masked, so a NaN there stays out).


def _acc_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _merge_setup_context(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b = inputs
    _, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, lse)


def _merge_backward(ctx, dout, dlse):
    out_a, lse_a, out_b, lse_b, lse = ctx.saved_tensors
    acc = _acc_dtype(out_a, lse_a)
    lse = lse.to(acc)
    safe = torch.where(lse == _NEG_INF, torch.zeros_like(lse), lse)   # (B, H, S); -inf rows: w = 0
    wa = torch.exp(lse_a.to(acc) - safe)
    wb = torch.exp(lse_b.to(acc) - safe)
    wa4 = wa.transpose(1, 2).unsqueeze(-1)                            # (B, S, H, 1)
    wb4 = wb.transpose(1, 2).unsqueeze(-1)
    oa = torch.where(wa4 > 0, out_a.to(acc), 0.0)                      # a -inf side's out is ignored
    ob = torch.where(wb4 > 0, out_b.to(acc), 0.0)
    out = wa4 * oa + wb4 * ob                                         # recomputed in acc precision
    dout = torch.zeros_like(out) if dout is None else dout.to(acc)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(acc)
    d_out_a = d_lse_a = d_out_b = d_lse_b = None
    if ctx.needs_input_grad[0]:
        d_out_a = (wa4 * dout).to(out_a.dtype)
    if ctx.needs_input_grad[2]:
        d_out_b = (wb4 * dout).to(out_b.dtype)
    if ctx.needs_input_grad[1]:
        dot_a = (dout * (oa - out)).sum(-1).transpose(1, 2)         # (B, H, S)
        d_lse_a = (wa * (dot_a + dlse)).to(lse_a.dtype)
    if ctx.needs_input_grad[3]:
        dot_b = (dout * (ob - out)).sum(-1).transpose(1, 2)
        d_lse_b = (wb * (dot_b + dlse)).to(lse_b.dtype)
    return d_out_a, d_lse_a, d_out_b, d_lse_b


# add_rmsnorm: r = x + residual (rounding treated as identity), n = r * inv, inv = (mean r^2 + eps)^-1/2,
#   y = n * w.  With g = dy * w:  dr = inv * (g - n * mean(g * n)) + d new_residual;
#   grad x = grad residual = dr;  grad weight = sum over tokens of dy * n.


def _add_rmsnorm_setup_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, new_res = output
    ctx.save_for_backward(new_res, weight)
    ctx.eps = eps
    ctx.res_dtype = residual.dtype


def _add_rmsnorm_backward(ctx, dy, dnew_res):
    new_res, weight = ctx.saved_tensors
    acc = _acc_dtype(new_res)
    r = new_res.to(acc)
    inv = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + ctx.eps)
    n = r * inv
    dy = torch.zeros_like(r) if dy is None else dy.to(acc)
    g = dy * weight.to(acc)
    dr = inv * (g - n * (g * n).mean(-1, keepdim=True))
    if dnew_res is not None:
        dr = dr + dnew_res.to(acc)
    dx = dr.to(new_res.dtype) if ctx.needs_input_grad[0] else None
    dres = dr.to(ctx.res_dtype) if ctx.needs_input_grad[1] else None
    dw = (dy * n).reshape(-1, r.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
    return dx, dres, dw, None


torch.library.register_autograd("ringattn::merge_attn_states", _merge_backward, setup_context=_merge_setup_context)
torch.library.register_autograd("ringattn::add_rmsnorm", _add_rmsnorm_backward,
                                setup_context=_add_rmsnorm_setup_context)
