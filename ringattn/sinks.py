"""Attention sinks: one learnable logit per query head that joins every row's softmax.

gpt-oss (and the learned-sink variant of StreamingLLM) give each head h a logit s_h that every
query's softmax sees as one extra "key" with no value:

    p_ij = exp(x_ij) / (exp(s_h) + sum_j exp(x_ij))        x_ij = q_i . k_j * scale (masked)
    out_i = sum_j p_ij v_j

which is the plain attention (out, lse) of the same row, rescaled:

    out'  = out * exp(lse) / (exp(lse) + exp(s_h)) = out * sigmoid(lse - s_h)
    lse'  = logaddexp(lse, s_h)                      (the row's normaliser, the sink included)

So a sink never changes what travels in the ring: the sequence-parallel attention runs as usual
with a differentiable lse (lse_grad=True), and the rescale is applied to each rank's own rows
(apply_sinks). Gradients reach q/k/v through out and lse, and the sinks through the sigmoid;
each rank's sink gradient covers its own rows, so -- like every other parameter's -- it is summed
over the sequence-parallel group (what the Hugging Face integration's gradient all-reduce / DDP
does). Rows no key reaches (lse = -inf): out' = 0, lse' = s_h.

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


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out', lse') of module docstring: out (B, S, Hq, D) any float dtype (out' in the same dtype,
    the product taken in fp32), lse (B, Hq, S) fp32. Differentiable in out, lse and sinks."""
    w = sink_scale(lse, sinks).transpose(1, 2).unsqueeze(-1)                      # (B, S, Hq, 1)
    new_out = (out.float() * w).to(out.dtype)                                      # (B, S, Hq, D)
    new_lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1).expand_as(lse))    # (B, Hq, S)
    return new_out, new_lse
