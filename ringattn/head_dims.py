"""A value head dim that differs from the query/key head dim (MLA: DeepSeek-V2/V3, Kimi-K2 --
qk_head_dim 192 = 128 nope + 64 rope, v_head_dim 128), for the fused kernels.

The sequence-parallel algorithms carry v's head dim Dv natively (v, dv, out, dout and the partial
outputs travel and merge with Dv columns; q, k, dq, dk with D), and the math backend computes it
as is. The fused kernels (FA2 in torch and flash_attn need one head dim for q, k and v) get the
block's tensors zero-padded to Dm = max(D, Dv) (block_attention._kernel_dims):

    Dv < D   v gets D - Dv zero columns: every output row is a convex combination of v rows, so
             its last D - Dv columns are exactly 0 and are dropped (out: (B, n, Hq, Dv))
    Dv > D   q and k get Dv - D zero columns: q.k is unchanged (the zeros add exact zeros);
             softmax_scale is the caller's (default 1/sqrt(D), the real qk head dim)

Exact in every dtype (the padded columns contribute exact zeros to every dot product and sum).
Cost on a GPU: one copy of the block's v (and, in the backward, of dout and out) per block call,
O(n * H * Dm) next to the block's O(n^2 * H * Dm) attention, and the P.V side computed Dm wide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def widen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) padded with zero columns to one head dim max(D, Dv) (a tensor that has it is
    returned as is). Differentiable."""
    dm = max(q.shape[3], v.shape[3])
    return pad_to(q, dm), pad_to(k, dm), pad_to(v, dm)


def pad_to(x: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """x with zero columns up to head dim d (x itself when it has d, None stays None)."""
    if x is None or x.shape[-1] == d:
        return x
    return F.pad(x, (0, d - x.shape[-1]))
