"""Attention sinks: one learnable logit per query head that joins every row's softmax.

gpt-oss (and the learned-sink variant of StreamingLLM) give each head h a logit s_h that every
query's softmax sees as one extra "key" with no value:

    p_ij = exp(x_ij) / (exp(s_h) + sum_j exp(x_ij))        x_ij = q_i . k_j * scale (masked)
    out_i = sum_j p_ij v_j

which is the plain attention (out, lse) of the same row, rescaled:

    out'  = out * exp(lse) / (exp(lse) + exp(s_h)) = out * sigmoid(lse - s_h)
    lse'  = logaddexp(lse, s_h)                      (the row's normaliser, the sink included)

So a sink never changes what travels in the ring. The autograd Functions of both algorithms
take the sinks (RingAttention / TokenRingAttention(..., sinks)): the forward rescales its rows
(rescale) and returns (out', lse); lse' = sink_lse(lse, sinks) is taken outside, so a loss on lse'
reaches lse through ordinary autograd. The backward needs no extra pass: with dout_a = w * dout'
(w = sigmoid(lse - s_h)) the score gradients are P_ij (dP_ij - delta_i) with
delta_i = dout_a . out' -- the usual attention backward run with dout_a and the SINKED output in
place of out (as flash-attention 3 does it), so ring_backward / token_ring_backward get
(dout_a, out') and nothing else changes (sinks_backward). The sinks' own gradient is
ds_h = -sum_rows (dout' . out') (1 - w), plus (1 - w) dlse' through sink_lse. Each rank's sink
gradient covers its own rows, so -- like every other parameter's -- it is summed over the
sequence-parallel group (what the Hugging Face integration's gradient all-reduce / DDP does).
Rows no key reaches (lse = -inf): out' = 0, lse' = s_h.

    sinks: (heads_q,) floating (any float dtype; computed in fp32), the same values on every rank
           (not checked: like any replicated weight)
    out:   (B, S, Hq, D); lse: (B, Hq, S) fp32
"""
from __future__ import annotations

import torch


def sinks_problem(sinks, heads_q: int | None, device) -> str | None:
    """What is wrong with a sinks argument for queries of `heads_q` heads on `device` (None: fine)."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        return f"sinks must be a tensor of heads_q logits, got {type(sinks).__name__}"
    if sinks.dim() != 1 or not sinks.is_floating_point():
        return f"sinks must be a 1-D floating tensor (heads_q,), got {sinks.dtype} of shape {tuple(sinks.shape)}"
    if heads_q is not None and sinks.shape[0] != heads_q:
        return f"sinks has {sinks.shape[0]} logits for {heads_q} query heads (one per query head)"
    if device is not None and sinks.device != device:
        return f"sinks is on {sinks.device}, q on {device}"
    return None


def sink_scale(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """sigmoid(lse - s_h), (B, Hq, S) fp32, 0 where lse = -inf (also when s_h = -inf there)."""
    x = lse - sinks.float().view(1, -1, 1)
    return torch.sigmoid(x.masked_fill(torch.isnan(x), float("-inf")))


def rescale(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out' = out * sigmoid(lse - s_h): out (B, S, Hq, D) in its dtype (the product in fp32)."""
    w = sink_scale(lse, sinks).transpose(1, 2).unsqueeze(-1)                      # (B, S, Hq, 1)
    return (out.float() * w).to(out.dtype)                                         # (B, S, Hq, D)


def sink_lse(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """lse' = logaddexp(lse, s_h), (B, Hq, S) fp32; differentiable in both."""
    return torch.logaddexp(lse, sinks.float().view(1, -1, 1).expand_as(lse))


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out', lse') of the module docstring (out (B, S, Hq, D), lse (B, Hq, S) fp32)."""
    return rescale(out, lse, sinks), sink_lse(lse, sinks)


def attention_dout(dout, out: torch.Tensor, lse: torch.Tensor, sinks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dout for the attention backward, the sinks' gradient or None), in a Function's backward:
    zeros when only lse was used (every rank still takes part in the backward's messages), folded
    with the sinks when there are (sinks_backward). Call it with autocast off."""
    if dout is None:
        dout = torch.zeros_like(out)
    if sinks is None:
        return dout, None
    return sinks_backward(dout, out, lse, sinks)


def sinks_backward(dout: torch.Tensor, out_sinked: torch.Tensor, lse: torch.Tensor,
                   sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dout_a, ds) from out''s gradient dout (B, S, Hq, D), the sinked output out' and the
    attention's own lse (B, Hq, S): dout_a = w * dout' (in dout's dtype) goes to the attention
    backward together with out'; ds (Hq,) in sinks' dtype is the sinks' gradient through out'."""
    w = sink_scale(lse, sinks)                                                     # (B, Hq, S)
    dot = (dout.float() * out_sinked.float()).sum(-1).transpose(1, 2)              # (B, Hq, S)
    ds = -(dot * (1 - w)).sum((0, 2))                                              # (Hq,)
    dout_a = (dout.float() * w.transpose(1, 2).unsqueeze(-1)).to(dout.dtype)       # (B, S, Hq, D)
    return dout_a, ds.to(sinks.dtype)
