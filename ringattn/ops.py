"""Typed wrappers over torch.ops.ringattn.* (declared once in csrc/ops.cpp).

STUB written by the skeleton: the op-layer work replaces this with full validation, fake
kernels and autograd registration.
"""
import torch

from ringattn import _C  # noqa: F401  (loads the .so, registering the ops)


def merge_attn_states(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets.

    out_*: (B, S, H, D) any float dtype; lse_*: (B, H, S) fp32. Returns (out in out_a.dtype, lse fp32).
    """
    return torch.ops.ringattn.merge_attn_states.default(out_a, lse_a, out_b, lse_b)


def merge_attn_states_(acc_out, acc_lse, part_out, part_lse):
    """Fold (part_out, part_lse) into the fp32 accumulator (acc_out, acc_lse) in place.

    acc_out (B, S, H, D) fp32 and acc_lse (B, H, S) fp32 may be views of a larger accumulator
    (e.g. acc[:, s0:s1] and acc_lse[:, :, s0:s1]): the zigzag half-block case, no copies.
    """
    torch.ops.ringattn.merge_attn_states_.default(acc_out, acc_lse, part_out, part_lse)


def add_rmsnorm(x, residual, weight, eps=1e-6):
    """new_residual = x + residual; y = rmsnorm(new_residual) * weight. Returns (y, new_residual)."""
    return torch.ops.ringattn.add_rmsnorm.default(x, residual, weight, float(eps))
