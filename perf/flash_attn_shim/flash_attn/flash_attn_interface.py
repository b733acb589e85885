"""flash-attn 2.7's private block-kernel API on ringattn's block kernel (see the package doc)."""
from __future__ import annotations

import torch


def _unsupported(what: str):
    raise NotImplementedError(f"flash_attn shim (perf/flash_attn_shim): {what} is not supported")


def _check(q, dropout_p, window_size_left, window_size_right, softcap, alibi_slopes):
    # As flash-attn: half precision only. Callers rely on it -- ring-flash-attn's backward takes
    # `dq = dq_buffer.to(torch.float32)` as a fresh accumulator, which for fp32 inputs is the
    # buffer itself (the next block's dq overwrites the sum): fp32 would be silently wrong.
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type (flash_attn shim: got {q.dtype})")
    if dropout_p:
        _unsupported("dropout")
    if (window_size_left is not None and window_size_left >= 0) or \
            (window_size_right is not None and window_size_right >= 0):
        _unsupported("a sliding window")
    if softcap:
        _unsupported("softcap")
    if alibi_slopes is not None:
        _unsupported("ALiBi")


def _causal(causal: bool):
    return "bottom_right" if causal else False   # flash-attn >= 2.1 aligns causal bottom-right


def _backend(q, k, v, causal) -> str:
    """ringattn's auto choice, except its own "flash_attn" backend: with this shim on sys.path that
    backend would be the shim itself (only reachable when torch's flash SDPA is switched off)."""
    import ringattn

    b = ringattn.select_backend(q, k, v, causal=_causal(causal))
    return "math" if b == "flash_attn" else b


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                        window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False):
    """-> (out (B,Sq,Hq,D) q.dtype, softmax_lse (B,Hq,Sq) fp32, S_dmask None, rng_state None)."""
    import ringattn

    _check(q, dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    out, lse = ringattn.block_attn_forward(q, k, v, causal=_causal(causal), softmax_scale=softmax_scale,
                                           backend=_backend(q, k, v, causal))
    return out, lse, None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    """Writes this block's dq, dk, dv (given the FINAL out/lse) into dq, dk, dv; returns softmax_d."""
    import ringattn

    _check(q, dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    gq, gk, gv = ringattn.block_attn_backward(dout, q, k, v, out, softmax_lse, causal=_causal(causal),
                                              softmax_scale=softmax_scale, backend=_backend(q, k, v, causal))
    for buf, g in ((dq, gq), (dk, gk), (dv, gv)):
        if buf is not None:
            buf.copy_(g)
    # softmax_d = rowsum(dout * out) per (B, H, S), as flash-attn returns it
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal):
        out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout.contiguous(), q, k, v, out, lse, dq, dk, dv, 0.0, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Differentiable single-device attention, (B, S, H, D) in and out (flash_attn.flash_attn_func)."""
    _check(q, dropout_p, window_size[0], window_size[1], softcap, alibi_slopes)
    if return_attn_probs:
        _unsupported("return_attn_probs")
    return _FlashAttnFunc.apply(q, k, v, softmax_scale, causal)


def _varlen(*args, **kwargs):
    _unsupported("the varlen API")


_flash_attn_varlen_forward = _flash_attn_varlen_backward = flash_attn_varlen_func = _varlen
flash_attn_varlen_kvpacked_func = flash_attn_varlen_qkvpacked_func = _varlen
