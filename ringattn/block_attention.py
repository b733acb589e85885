"""Block attention: one Q block against one K/V block, returning (out, lse), and its backward.

STUB written by the skeleton (math path only); the block-attention work adds the cuDNN /
flash / efficient (torch.ops.aten._scaled_dot_product_*) and flash_attn backends and `auto`.

Shapes (B = batch, Sq/Sk = block lengths, Hq/Hkv = heads, D = head dim):
  q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA/MQA; K/V never repeated
  outside this function); out: (B, Sq, Hq, D) in q.dtype; lse: (B, Hq, Sq) fp32.
causal: False | "top_left" | "bottom_right" (True means "top_left").
  top_left: query i sees keys j <= i.  bottom_right: query i sees keys j <= i + Sk - Sq.
  Rows that see no key get out = 0 and lse = -inf.

The backward takes the FINAL (merged) out and lse of the whole attention, as ring
attention needs: dS = P * (dP - rowsum(dout * out)) with P = exp(scale * q k^T - lse).
"""
from __future__ import annotations

import math

import torch

BACKENDS = ("math",)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    return ["math"]


def _normalize_causal(causal) -> str | None:
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if causal in ("top_left", "bottom_right"):
        return causal
    raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def _causal_mask(sq: int, sk: int, alignment: str, device) -> torch.Tensor:
    # True where query i may see key j.
    offset = 0 if alignment == "top_left" else sk - sq
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + offset


def _scores(q, k, softmax_scale, causal):
    # q (B,Sq,Hq,D), k (B,Sk,Hkv,D) -> scores (B,Hq,Sq,Sk) in fp32 (fp64 for fp64 input)
    ct = torch.promote_types(q.dtype, torch.float32)
    g = q.shape[2] // k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale
    alignment = _normalize_causal(causal)
    if alignment is not None:
        s = s.masked_fill(~_causal_mask(q.shape[1], k.shape[1], alignment, q.device), float("-inf"))
    return s


def _probs(s, lse):
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.where(torch.isneginf(lse).unsqueeze(-1), torch.zeros_like(p), p)


def block_attn_forward(q, k, v, *, causal=False, softmax_scale=None, backend="auto"):
    """Returns (out (B,Sq,Hq,D) q.dtype, lse (B,Hq,Sq) fp32)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, softmax_scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    p = _probs(s, lse)
    g = q.shape[2] // k.shape[2]
    vf = v.to(s.dtype).transpose(1, 2).repeat_interleave(g, dim=1)
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)
    return out, lse.float()


def block_attn_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, backend="auto"):
    """Gradients of this block's share given the final out/lse. Returns (dq, dk, dv) in fp32
    (dk, dv with Hkv heads: summed over each GQA group)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, softmax_scale, causal)
    ct = s.dtype
    p = _probs(s, lse.to(ct))
    B, Sk, Hkv, D = k.shape
    g = q.shape[2] // Hkv
    dof = dout.to(ct).transpose(1, 2)  # B,Hq,Sq,D
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    qf = q.to(ct).transpose(1, 2)
    delta = (dof * out.to(ct).transpose(1, 2)).sum(-1, keepdim=True)  # B,Hq,Sq,1
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * softmax_scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * softmax_scale
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dk = dk.view(B, Hkv, g, Sk, D).sum(2)
    dv = dv.view(B, Hkv, g, Sk, D).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
