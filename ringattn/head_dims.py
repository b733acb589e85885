"""A value head dim that differs from the query/key head dim (MLA: DeepSeek-V2/V3, Kimi-K2 --
qk_head_dim 192 = 128 nope + 64 rope, v_head_dim 128).

The sequence-parallel algorithms move and merge one head dim D per call, and the fused kernels
they call (FA2 in torch, flash_attn) need q, k and v to share it. A call whose v has Dv != D
(q and k must still share D: the scores are q.k) runs them on zero-padded tensors of
Dm = max(D, Dv) columns:

    Dv < D   v gets D - Dv zero columns: every output row is a convex combination of v rows, so
             its last D - Dv columns are exactly 0 and are dropped (out: (B, n, Hq, Dv))
    Dv > D   q and k get Dv - D zero columns: q.k is unchanged (the zeros add exact zeros);
             softmax_scale defaults to 1/sqrt(D), the real qk head dim, as it does unpadded

Exact in every dtype (the padded columns contribute exact zeros to every dot product, sum and
merge). The gradients are those of the pad (a slice) and the slice (a zero pad). Cost: what
travels and what the kernels compute is Dm wide: for DeepSeek's 192 / 128, K/V rotation moves
(192+192)/(192+128) = 1.2x the bytes of unpadded K/V, TokenRing's partial outputs 1.5x; the
attention FLOPs grow by the same ratio on the P.V side. Native Dv buffers are not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def widen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) padded with zero columns to one head dim max(D, Dv), and Dv (v's own head dim).
    Returns the inputs themselves when the head dims already agree. Differentiable."""
    d, dv = q.shape[3], v.shape[3]
    if dv == d:
        return q, k, v, dv
    if dv < d:
        return q, k, F.pad(v, (0, d - dv)), dv
    return F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d)), v, dv


def narrow(x: torch.Tensor, d: int) -> torch.Tensor:
    """The first d head-dim columns of x, contiguous (x itself when it has d)."""
    return x if x.shape[-1] == d else x.narrow(-1, 0, d).contiguous()


def pad_to(x: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """x with zero columns up to head dim d (x itself when it has d, None stays None)."""
    if x is None or x.shape[-1] == d:
        return x
    return F.pad(x, (0, d - x.shape[-1]))
