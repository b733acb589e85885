"""Block attention: one Q block against one K/V block, returning (out, lse), and its backward.

This is the compute kernel every ring/TokenRing step calls. Backends:

  math        CPU and CUDA reference in fp32 (fp64 for fp64 inputs); chunks over query rows
              so a 4k x 4k block never materialises more than ~_MATH_CHUNK_ELEMS scores.
  cudnn       torch.ops.aten._scaled_dot_product_cudnn_attention(+_backward)
  flash       torch.ops.aten._scaled_dot_product_flash_attention(+_backward)   (FA2 in torch)
  efficient   torch.ops.aten._efficient_attention_forward(+_backward)  (the mem-efficient kernel
              that _scaled_dot_product_efficient_attention wraps; called directly because its
              custom_mask_type gives BOTH causal alignments, and it takes (B, S, H, D) as is)
  flash_attn  the flash_attn package (2.6 - 2.8), when importable
  auto        the fastest backend that supports the case (see select_backend)

Shapes (B = batch, Sq/Sk = block lengths, Hq/Hkv = heads, D = head dim):
  q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA/MQA: query head h uses
  K/V head h // (Hq // Hkv); K/V are never repeated outside this module);
  out: (B, Sq, Hq, D) in q.dtype; lse: (B, Hq, Sq) fp32, contiguous, natural log.
  v may have its own head dim Dv (MLA): out and dv then have Dv; math computes it as is, a kernel
  runs on the tensors zero-padded to max(D, Dv) (exact; ringattn.head_dims) and is chosen, and
  checked, for that head dim.

causal: False | "top_left" | "bottom_right" (True means "top_left").
  top_left:     query i sees keys j <= i                 (torch SDPA's is_causal)
  bottom_right: query i sees keys j <= i + Sk - Sq       (flash_attn's causal)
  For Sq == Sk they are the same mask. Rows that see no key (bottom_right with Sq > Sk: the
  first Sq - Sk rows) get out = 0 and lse = -inf from every backend.

Support matrix (a backend asked for a case it cannot do raises ValueError naming the reason;
"auto" skips it):
  backend     device  dtypes               head dim D                 causal with Sq != Sk   GQA
  math        any     any float            any                        both                   native
  cudnn       CUDA    fp16, bf16           D % 8 == 0, D <= 128       top_left only          native*
                      sm80+, cuDNN >= 9    (D <= 256 on sm90+)
  flash       CUDA    fp16, bf16, sm80+    D % 8 == 0, D <= 256       bottom_right only      native*
  efficient   CUDA    fp16, bf16, fp32     D % 8 (fp32: % 4), <= 256  both                   K/V expanded
  flash_attn  CUDA    fp16, bf16, sm80+    D % 8 == 0, D <= 256       bottom_right only      native
  (* native GQA through the aten op was verified on torch 2.11 (H100); older torch expands K/V.)

Backward: block_attn_backward takes the FINAL (merged over all K/V blocks) out and lse of the
whole attention -- what ring attention needs, as in ring-flash-attention -- and returns this
block's share: with P = exp(scale * q k^T - lse) and delta = rowsum(dout * out),
  dS = P * (dout v^T - delta);  dq = scale * dS k;  dk = scale * dS^T q;  dv = P^T dout,
dk/dv summed over each GQA group (Hkv heads). Summing the shares of all blocks gives the exact
gradient. The fused kernels get `out` cast to q.dtype (they compute delta from it). `lse` must
be the true final lse: -inf only for rows that see no key anywhere. Rows this block masks
completely get dq = 0 from every backend (the kernels are handed lse = +inf for them).

Gradient dtype: every backend returns dq, dk, dv in the input dtype (q.dtype; math computes in
fp32 and rounds once at the end; the fused kernels write q.dtype natively). To accumulate at full
precision pass fp32 accumulators as dq_out / dk_out / dv_out: the block's gradient is added into
them in place (no rounding step for math, one fused cast+add for the kernels) and those same
tensors are returned.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import torch

BACKENDS = ("math", "cudnn", "flash", "efficient", "flash_attn")
# auto's preference on CUDA, fastest first (H100, bf16, d=128, design.md: cuDNN ~1.8x FA2).
_CUDA_PREFERENCE = ("cudnn", "flash", "flash_attn", "efficient", "math")

# Largest score tile (elements) the math path materialises per query-row chunk.
_MATH_CHUNK_ELEMS = 1 << 24

_NEG_INF = float("-inf")
_POS_INF = float("inf")


# --------------------------------------------------------------------------------------------
# Arguments


class _Case(NamedTuple):
    """What backend selection depends on."""

    device: torch.device
    dtype: torch.dtype
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    alignment: str | None  # None | "top_left" | "bottom_right"
    softcap: float = 0.0  # logit softcapping c (scores -> c * tanh(scores / c)); 0: off


def _normalize_causal(causal) -> str | None:
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal in ("top_left", "bottom_right"):
        return causal
    raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def _causal_offset(alignment: str, sq: int, sk: int) -> int:
    # Query i sees keys j <= i + offset.
    return 0 if alignment == "top_left" else sk - sq


def _num_masked_rows(alignment: str | None, sq: int, sk: int) -> int:
    """Leading query rows that see no key at all."""
    if alignment is None:
        return 0 if sk > 0 else sq
    return min(sq, max(0, -_causal_offset(alignment, sq, sk)))


def _check_qkv(fn: str, q, k, v, softmax_scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must be 4-D ({'B, Sq, Hq, D' if name == 'q' else 'B, Sk, Hkv, D'}), "
                f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{fn}: k and v must agree on (B, Sk, Hkv) (v's head dim Dv may differ), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if v.shape[3] <= 0:
        raise ValueError(f"{fn}: v's head dim must be > 0, got v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{fn}: batch size mismatch: q has B={q.shape[0]}, k/v have B={k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: head dim mismatch: q has D={q.shape[3]}, k/v have D={k.shape[3]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{fn}: query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k, v dtypes must be equal, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[3]) if q.shape[3] > 0 else 1.0
    scale = float(softmax_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{fn}: softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    return scale


def _check_like(fn: str, name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but q is on {device}")


def _make_case(q, k, alignment, softcap: float = 0.0) -> _Case:
    return _Case(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], alignment, softcap)


def check_softcap(fn: str, softcap) -> float:
    """softcap as the float the kernels take: None or 0 -> 0.0 (off), else a finite number > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0 <= softcap < math.inf):
        raise ValueError(f"{fn}: softcap must be None, 0 (off) or a finite number > 0 (scores -> softcap * "
                         f"tanh(scores / softcap), Gemma 2's attn_logit_softcapping), got {softcap!r}")
    return float(softcap) or 0.0  # (0 and -0.0: off)


# --------------------------------------------------------------------------------------------
# Availability and selection


def _aten_op(name: str):
    try:
        return getattr(torch.ops.aten, name).default
    except (AttributeError, RuntimeError):
        return None


# Leading argument names of each aten op as called below (positional). Checked once so that a
# schema change in a future torch disables the backend with a clear reason instead of passing
# arguments to the wrong parameters. Identical in torch 2.11 and 2.14.
_ATEN_SCHEMAS = {
    "cudnn": {
        "_scaled_dot_product_cudnn_attention": (
            "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
            "return_debug_mask", "scale"),
        "_scaled_dot_product_cudnn_attention_backward": (
            "grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset",
            "attn_bias", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "scale"),
    },
    "flash": {
        "_scaled_dot_product_flash_attention": (
            "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"),
        "_scaled_dot_product_flash_attention_backward": (
            "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k",
            "max_q", "max_k", "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale"),
    },
    "efficient": {
        "_efficient_attention_forward": (
            "query", "key", "value", "bias", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
            "max_seqlen_k", "dropout_p", "custom_mask_type", "compute_log_sumexp", "scale"),
        "_efficient_attention_backward": (
            "grad_out_", "query", "key", "value", "bias", "out", "cu_seqlens_q", "cu_seqlens_k",
            "max_seqlen_q", "max_seqlen_k", "logsumexp", "dropout_p", "philox_seed", "philox_offset",
            "custom_mask_type", "bias_requires_grad", "scale"),
    },
}


@functools.lru_cache(maxsize=None)
def _aten_schema_problem(backend: str) -> str | None:
    for op_name, expected in _ATEN_SCHEMAS[backend].items():
        op = _aten_op(op_name)
        if op is None:
            return f"this torch ({torch.__version__}) has no aten::{op_name}"
        names = tuple(a.name for a in op._schema.arguments)
        if names[: len(expected)] != expected:
            return (f"aten::{op_name} schema changed in torch {torch.__version__}: expected leading "
                    f"arguments {expected}, got {names}")
    return None


def _torch_at_least(major: int, minor: int) -> bool:
    try:
        parts = torch.__version__.split("+")[0].split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


# Native GQA (Hkv < Hq straight into the aten op, dk/dv come back with Hkv heads) was verified
# forward and backward on torch 2.11 for cudnn and flash; older versions get K/V expanded.
_NATIVE_GQA = {"cudnn": _torch_at_least(2, 11), "flash": _torch_at_least(2, 11),
               "flash_attn": True, "efficient": False, "math": True}


@functools.lru_cache(maxsize=None)
def _flash_attn_interface():
    """(module, version) of flash_attn's interface, or (None, reason)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_interface
    except Exception as e:  # ImportError, or a broken build raising anything at import
        return None, f"flash_attn is not importable ({type(e).__name__}: {e})"
    for fn in ("_flash_attn_forward", "_flash_attn_backward"):
        if not hasattr(flash_attn_interface, fn):
            return None, f"flash_attn {getattr(flash_attn, '__version__', '?')} has no {fn}"
    return flash_attn_interface, getattr(flash_attn, "__version__", "?")


@functools.lru_cache(maxsize=None)
def _device_problem(backend: str, device_type: str, device_index: int | None) -> str | None:
    """Why `backend` cannot run on this device at all (None: it can)."""
    if backend == "math":
        return None
    if device_type != "cuda":
        return f"needs a CUDA tensor, got a {device_type} tensor"
    if torch.version.hip is not None:
        return "only the CUDA (not ROCm) builds of the fused kernels are wired up here"
    major, _ = torch.cuda.get_device_capability(device_index)
    if backend == "flash_attn":
        mod, why = _flash_attn_interface()
        if mod is None:
            return why
        return None if major >= 8 else f"needs compute capability >= 8.0 (sm80+), got sm{major}x"
    problem = _aten_schema_problem(backend)
    if problem:
        return problem
    if backend == "cudnn":
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        if (torch.backends.cudnn.version() or 0) < 90000:
            return f"needs cuDNN >= 9.0, got {torch.backends.cudnn.version()}"
        if major < 8:
            return f"needs compute capability >= 8.0 (sm80+), got sm{major}x"
    if backend == "flash":
        if not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no flash attention kernels"
        if major < 8:
            return f"needs compute capability >= 8.0 (sm80+), got sm{major}x"
    return None


def _device_key(device) -> tuple[str, int | None]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    return device.type, device.index


@functools.lru_cache(maxsize=4096)
def _case_problem(backend: str, case: _Case) -> str | None:
    """Why `backend` cannot compute this case (None: it can). Cached: called on every block."""
    if backend not in BACKENDS:
        return f"unknown backend (choose from {('auto',) + BACKENDS})"
    problem = _device_problem(backend, *_device_key(case.device))
    if problem or backend == "math":
        return problem
    if case.softcap:
        if backend != "flash_attn":
            return "has no logit softcapping (softcap= runs on 'math' or the flash_attn package)"
        if not flash_attn_takes_softcap():
            return "this flash_attn version has no softcap parameter (2.6+ has)"
    half = (torch.float16, torch.bfloat16)
    if backend == "efficient":
        if case.dtype not in half + (torch.float32,):
            return f"supports fp16, bf16 and fp32 only, got {case.dtype}"
        align = 4 if case.dtype == torch.float32 else 8
        if case.d % align != 0 or not 0 < case.d <= 256:
            return f"needs head dim D % {align} == 0 and D <= 256, got D={case.d}"
    else:
        if case.dtype not in half:
            return f"supports fp16 and bf16 only, got {case.dtype}"
        dmax = 256
        if backend == "cudnn" and torch.cuda.get_device_capability(case.device)[0] < 9:
            dmax = 128
        if case.d % 8 != 0 or not 0 < case.d <= dmax:
            return f"needs head dim D % 8 == 0 and D <= {dmax}, got D={case.d}"
    if case.alignment is not None and case.sq != case.sk:
        native = {"cudnn": "top_left", "flash": "bottom_right", "flash_attn": "bottom_right"}.get(backend)
        if native is not None and case.alignment != native:
            return (f"its causal mask is {native}-aligned, so causal={case.alignment!r} with "
                    f"Sq={case.sq} != Sk={case.sk} is not supported (use 'efficient' or 'math')")
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` at all, in auto's order of preference.

    device None means the current CUDA device when CUDA is available, else the CPU. Whether a
    backend supports a particular case (dtype, head dim, causal alignment) is select_backend's
    business.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = _device_key(device)
    order = _CUDA_PREFERENCE if key[0] == "cuda" else ("math",)
    return [b for b in order if _device_problem(b, *key) is None]


def _sdp_flag_allows(backend: str) -> bool:
    # auto honours torch's global SDPA switches (torch.nn.attention.sdpa_kernel / torch.backends
    # .cuda.enable_*_sdp), so users can steer it the way they steer F.scaled_dot_product_attention.
    flag = {"cudnn": "cudnn_sdp_enabled", "flash": "flash_sdp_enabled",
            "efficient": "mem_efficient_sdp_enabled"}.get(backend)
    return flag is None or getattr(torch.backends.cuda, flag, lambda: True)()


def select_backend(q, k, v, *, causal=False, softcap=None) -> str:
    """The backend backend="auto" uses for these inputs.

    CUDA: cudnn, then flash, flash_attn, efficient, math -- the first that supports the case
    (dtype, head dim, causal alignment; see the module docstring) and is not switched off by
    torch's SDPA flags. Anything else: math.
    """
    _check_qkv("select_backend", q, k, v, None)
    case = _make_case(q, k, _normalize_causal(causal), check_softcap("select_backend", softcap))
    return _auto(case)


def _auto(case: _Case) -> str:
    if case.device.type != "cuda":
        return "math"
    for backend in _CUDA_PREFERENCE:
        if _sdp_flag_allows(backend) and _case_problem(backend, case) is None:
            return backend
    return "math"


def _resolve(fn: str, backend: str, case: _Case) -> str:
    if backend == "auto":
        return _auto(case)
    problem = _case_problem(backend, case)
    if problem is not None:
        raise ValueError(
            f"{fn}: backend={backend!r} cannot run this case (q {case.dtype} on {case.device}, "
            f"Sq={case.sq}, Sk={case.sk}, Hq={case.hq}, Hkv={case.hkv}, D={case.d}, "
            f"causal={case.alignment!r}{f', softcap={case.softcap}' if case.softcap else ''}): {problem}")
    return backend


# --------------------------------------------------------------------------------------------
# Public entry points


def _kernel_dims(fn: str, q, k, v, softmax_scale, causal, backend, softcap=None):
    """(scale, case, backend, widened (q, k, v) or None). v's head dim Dv may differ from q/k's D
    (MLA): math computes it as is; a kernel (FA2 and flash_attn need one head dim) runs on the
    tensors zero-padded to max(D, Dv), which is exact (ringattn.head_dims), and is chosen for
    that head dim."""
    scale = _check_qkv(fn, q, k, v, softmax_scale)
    case = _make_case(q, k, _normalize_causal(causal), check_softcap(fn, softcap))
    if v.shape[3] != q.shape[3]:  # chosen for the head dim a kernel would run with
        case = case._replace(d=max(q.shape[3], v.shape[3]))
    backend = _resolve(fn, backend, case)
    if backend == "math" or v.shape[3] == q.shape[3]:
        return scale, case, backend, None
    from ringattn.head_dims import widen  # (only now: math never needs the padded copies)
    return scale, case, backend, widen(q, k, v)


def block_attn_forward(q, k, v, *, causal=False, softmax_scale=None, backend="auto", softcap=None):
    """Attention of q over this K/V block. Returns (out (B,Sq,Hq,Dv) q.dtype, lse (B,Hq,Sq) fp32).
    v's head dim Dv may differ from q/k's (MLA; kernels then run zero-padded: _kernel_dims).
    softcap=c: logit softcapping, scores -> c * tanh(scores / c) after the scale, before the mask
    (Gemma 2); lse is of the capped scores. Runs on math or the flash_attn package."""
    fn = "block_attn_forward"
    scale, case, backend, wide = _kernel_dims(fn, q, k, v, softmax_scale, causal, backend, softcap)
    if wide is not None:
        out, lse = block_attn_forward(*wide, causal=causal, softmax_scale=scale, backend=backend, softcap=softcap)
        return out[..., :v.shape[3]].contiguous(), lse
    B, Sq, Hq, D = q.shape
    if Sq == 0 or k.shape[1] == 0:
        # Nothing to attend to (or nobody asking): out 0, lse -inf.
        return (q.new_zeros((B, Sq, Hq, v.shape[3])),
                torch.full((B, Hq, Sq), _NEG_INF, dtype=torch.float32, device=q.device))
    out, lse = _FORWARD[backend](q, k, v, scale, case)
    masked = _num_masked_rows(case.alignment, Sq, k.shape[1])
    if masked and backend != "math":
        # Kernels disagree on empty rows (FA2: lse=+inf, mem-efficient: lse=0); normalise.
        out[:, :masked] = 0
        lse[:, :, :masked] = _NEG_INF
    return out, lse


def block_attn_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, backend="auto",
                        dq_out=None, dk_out=None, dv_out=None, softcap=None):
    """This block's share (dq, dk, dv) of the gradient, given the FINAL out and lse.

    dout, out: (B, Sq, Hq, Dv) any float dtype; lse: (B, Hq, Sq) (fp32, -inf for empty rows).
    Returns (dq (B,Sq,Hq,D), dk (B,Sk,Hkv,D), dv (B,Sk,Hkv,Dv)) in q.dtype -- or, for each of
    dq_out/dk_out/dv_out given, that tensor after adding this block's gradient into it in place.
    softcap: as in block_attn_forward (the gradient goes through the tanh: dS_raw = dS (1 - t^2)).
    """
    fn = "block_attn_backward"
    scale, case, backend, wide = _kernel_dims(fn, q, k, v, softmax_scale, causal, backend, softcap)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    o_shape = (B, Sq, Hq, v.shape[3])
    _check_like(fn, "dout", dout, o_shape, q.device)
    _check_like(fn, "out", out, o_shape, q.device)
    _check_like(fn, "lse", lse, (B, Hq, Sq), q.device)
    for name, acc, shape in (("dq_out", dq_out, q.shape), ("dk_out", dk_out, k.shape),
                             ("dv_out", dv_out, v.shape)):
        if acc is not None:
            _check_like(fn, name, acc, shape, q.device)
    if wide is not None:  # a kernel on the zero-padded tensors; the padding's gradients dropped
        from ringattn.head_dims import pad_to
        dm = wide[0].shape[3]
        grads = block_attn_backward(pad_to(dout, dm), *wide, pad_to(out, dm), lse, causal=causal,
                                    softmax_scale=scale, backend=backend, softcap=softcap)
        result = []
        for g, acc, ref in zip(grads, (dq_out, dk_out, dv_out), (q, k, v)):
            g = g[..., :ref.shape[3]]
            result.append(g.contiguous() if acc is None else acc.add_(g))
        return tuple(result)
    if Sq == 0 or Sk == 0:
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    else:
        grads = _BACKWARD[backend](dout, q, k, v, out, lse, scale, case, (dq_out, dk_out, dv_out))
        masked = _num_masked_rows(case.alignment, Sq, Sk)
        if masked and backend != "math":
            # Rows that see no key get dq = 0; the mem-efficient kernel leaves them unwritten
            # (garbage, even NaN) with bottom_right and Sq > Sk (seen on torch 2.11, H100).
            grads[0][:, :masked] = 0
    result = []
    for g, acc, ref in zip(grads, (dq_out, dk_out, dv_out), (q, k, v)):
        if acc is None:
            result.append(_contiguous_as(g, ref.dtype))
        else:
            if g is not acc:  # math adds into the accumulators itself
                acc.add_(g)
            result.append(acc)
    return tuple(result)


def block_lse_backward(dlse, q, k, lse, *, causal=False, softmax_scale=None, backend="auto", dq_out=None,
                       dk_out=None, softcap=None):
    """This block's share (dq, dk) of the gradient of the FINAL lse, given its gradient dlse.

    dlse, lse: (B, Hq, Sq) (fp32); q: (B, Sq, Hq, D); k: (B, Sk, Hkv, D). d lse_i / d s_ij = P_ij,
    so dS_ij = P_ij * dlse_i: one block_attn_backward with v = 0 (dP = 0), dout = e_0 and
    out = -dlse e_0 (so delta = rowsum(dout * out) = -dlse), whose dv is discarded. Accumulates
    into dq_out / dk_out when given, like block_attn_backward; returns (dq, dk).
    """
    e0 = torch.zeros(q.shape, dtype=q.dtype, device=q.device)      # (B, Sq, Hq, D)
    e0[..., 0] = 1
    out_g = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    out_g[..., 0] = -dlse.transpose(1, 2).to(q.dtype)
    dq, dk, _ = block_attn_backward(e0, q, k, torch.zeros_like(k), out_g, lse, causal=causal,
                                    softmax_scale=softmax_scale, backend=backend, dq_out=dq_out, dk_out=dk_out,
                                    softcap=softcap)
    return dq, dk


# --------------------------------------------------------------------------------------------
# math: fp32 (fp64 for fp64 inputs), chunked over query rows, GQA without repeating K/V.


# Causal: at most 1/_MATH_CAUSAL_SPLIT of the query rows per chunk (at least _MATH_CAUSAL_MIN_ROWS),
# so a chunk's keys stop near its last row: the masked triangle computed is <= 1/8 of the work
# (with one chunk, e.g. few heads over a long sequence -- Ulysses' world-1 attention -- the
# whole square was computed, twice the causal FLOPs).
_MATH_CAUSAL_SPLIT, _MATH_CAUSAL_MIN_ROWS = 8, 256


def _math_rows_per_chunk(B: int, Hq: int, Sk: int, case: "_Case | None" = None) -> int:
    rows = max(1, _MATH_CHUNK_ELEMS // max(1, B * Hq * Sk))
    if case is not None and case.alignment is not None:
        rows = min(rows, max(_MATH_CAUSAL_MIN_ROWS, -(-case.sq // _MATH_CAUSAL_SPLIT)))
    return rows


def _grouped(x, Hkv: int, ct):
    """(B, n, Hq, D) -> (B, Hkv, g*n, D) in ct: row (gi*n + i) of kv-head j is query head j*g+gi."""
    B, n, Hq, D = x.shape
    g = Hq // Hkv
    return x.to(ct).view(B, n, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * n, D)


def _ungrouped(x, g: int, n: int):
    """(B, Hkv, g*n, D) -> (B, n, Hkv*g, D)."""
    B, Hkv, _, D = x.shape
    return x.view(B, Hkv, g, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, Hkv * g, D)


def _math_scores(qg, kf, r0: int, n: int, kend: int, g: int, scale: float, case: _Case):
    """Scores of query rows r0..r0+n (grouped layout) against keys 0..kend: (B, Hkv, g*n, kend);
    softcapped (c * tanh(s / c)) before the mask when case.softcap."""
    s = torch.matmul(qg, kf[:, :, :kend].transpose(-1, -2)).mul_(scale)
    if case.softcap:
        s.div_(case.softcap).tanh_().mul_(case.softcap)
    if case.alignment is not None:
        off = _causal_offset(case.alignment, case.sq, case.sk)
        i = torch.arange(r0, r0 + n, device=s.device)[:, None]
        j = torch.arange(kend, device=s.device)[None, :]
        B, Hkv = s.shape[:2]
        s.view(B, Hkv, g, n, kend).masked_fill_(j > i + off, _NEG_INF)
    return s


def _visible_keys(case: _Case, r1: int) -> int:
    # Keys beyond this are masked for every row < r1, so the chunk never touches them.
    if case.alignment is None:
        return case.sk
    return min(case.sk, max(0, r1 + _causal_offset(case.alignment, case.sq, case.sk)))


def _math_forward(q, k, v, scale, case):
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    ct = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(ct).transpose(1, 2)  # B, Hkv, Sk, D
    vf = v.to(ct).transpose(1, 2)
    out = torch.zeros(B, Sq, Hq, v.shape[3], dtype=q.dtype, device=q.device)  # (v's head dim: MLA)
    lse = torch.full((B, Hq, Sq), _NEG_INF, dtype=torch.float32, device=q.device)
    rows = _math_rows_per_chunk(B, Hq, case.sk, case)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        n = r1 - r0
        kend = _visible_keys(case, r1)
        if kend == 0:
            continue  # every row of the chunk is empty: out 0, lse -inf (already)
        s = _math_scores(_grouped(q[:, r0:r1], Hkv, ct), kf, r0, n, kend, g, scale, case)
        l = torch.logsumexp(s, dim=-1, keepdim=True)  # B, Hkv, g*n, 1
        p = s.sub_(l.masked_fill(l == _NEG_INF, _POS_INF)).exp_()  # empty rows -> 0, not NaN
        o = torch.matmul(p, vf[:, :, :kend])
        out[:, r0:r1] = _ungrouped(o, g, n)
        lse[:, :, r0:r1] = l.view(B, Hkv, g, n).reshape(B, Hq, n)
    return out, lse


def _math_backward(dout, q, k, v, out, lse, scale, case, accs):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    ct = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(ct).transpose(1, 2)  # B, Hkv, Sk, D
    vf = v.to(ct).transpose(1, 2)
    dq_out, dk_out, dv_out = accs
    # Accumulate straight into caller's accumulators when they hold at least ct precision.
    full = lambda acc: acc is not None and torch.promote_types(acc.dtype, ct) == acc.dtype  # noqa: E731
    dq = dq_out if full(dq_out) else torch.zeros(B, Sq, Hq, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, Sk, v.shape[3], dtype=ct, device=q.device)
    rows = _math_rows_per_chunk(B, Hq, Sk, case)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        n = r1 - r0
        kend = _visible_keys(case, r1)
        if kend == 0:
            continue
        qg = _grouped(q[:, r0:r1], Hkv, ct)
        dog = _grouped(dout[:, r0:r1], Hkv, ct)
        og = _grouped(out[:, r0:r1], Hkv, ct)
        delta = (dog * og).sum(-1, keepdim=True)  # B, Hkv, g*n, 1
        l = lse[:, :, r0:r1].to(ct).reshape(B, Hkv, g * n, 1)
        s = _math_scores(qg, kf, r0, n, kend, g, scale, case)
        # softcap: d(c tanh(x / c))/dx = 1 - t^2 with t = s / c (masked entries: -inf -> clamped to
        # -1 -> 0, where p is 0 too)
        dcap = s.div(case.softcap).clamp_(-1.0, 1.0).square_().neg_().add_(1.0) if case.softcap else None
        p = s.sub_(l.masked_fill(l == _NEG_INF, _POS_INF)).exp_()  # B, Hkv, g*n, kend
        dv[:, :, :kend] += torch.matmul(p.transpose(-1, -2), dog)
        ds = torch.matmul(dog, vf[:, :, :kend].transpose(-1, -2)).sub_(delta).mul_(p)
        if dcap is not None:
            ds.mul_(dcap)
        dqg = torch.matmul(ds, kf[:, :, :kend]).mul_(scale)
        dk[:, :, :kend] += torch.matmul(ds.transpose(-1, -2), qg).mul_(scale)
        if dq is dq_out:
            dq[:, r0:r1] += _ungrouped(dqg, g, n)
        else:
            dq[:, r0:r1] = _ungrouped(dqg, g, n)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # B, Sk, Hkv, D
    if full(dk_out):
        dk = dk_out.add_(dk)
    if full(dv_out):
        dv = dv_out.add_(dv)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Fused CUDA kernels (torch.ops.aten). They take (B, H, S, D) views of our (B, S, H, D) tensors
# (last dim contiguous); outputs come back with (B, S, H, D) memory.


def _contiguous_as(x, dtype):
    """x as a contiguous tensor of `dtype`, in one pass (x.to(dtype, memory_format=...) returns a
    non-contiguous x unchanged when the dtype already matches)."""
    if x.dtype == dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _lastdim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _expand_kv(x, hq: int):
    """(B, Sk, Hkv, D) -> (B, Sk, Hq, D), head h = x head h // g (a copy; kernels lacking GQA)."""
    B, Sk, Hkv, D = x.shape
    g = hq // Hkv
    if g == 1:
        return _lastdim_contiguous(x)
    return x.unsqueeze(3).expand(B, Sk, Hkv, g, D).reshape(B, Sk, hq, D)


def _sum_kv_groups(dx, hkv: int):
    """(B, Sk, Hq, D) -> (B, Sk, Hkv, D): sum of each GQA group (fp32 accumulate, dx.dtype out)."""
    B, Sk, Hq, D = dx.shape
    if Hq == hkv:
        return dx
    return dx.view(B, Sk, hkv, Hq // hkv, D).sum(3)


def _kv_for(backend: str, k, v, hq: int):
    if _NATIVE_GQA[backend]:
        return _lastdim_contiguous(k), _lastdim_contiguous(v)
    return _expand_kv(k, hq), _expand_kv(v, hq)


def _kernel_bwd_inputs(dout, out, lse, q, case: _Case):
    """dout/out as contiguous (B, S, H, D) in q.dtype (same strides: cuDNN and mem-efficient read
    O with dO's strides), lse contiguous fp32. Rows this block masks completely get lse = +inf
    (FA2's convention) so that any kernel that does visit them computes exp(s - lse) = 0."""
    dout = _contiguous_as(dout, q.dtype)
    out = _contiguous_as(out, q.dtype)
    masked = _num_masked_rows(case.alignment, case.sq, case.sk)
    if masked:
        lse = lse.to(torch.float32, copy=True)
        lse[:, :, :masked] = _POS_INF
    return dout, out, _contiguous_as(lse, torch.float32)


def _is_causal(case: _Case) -> bool:
    # Callers have checked that the kernel's own alignment matches (or Sq == Sk).
    return case.alignment is not None


def _cudnn_forward(q, k, v, scale, case):
    B, Sq, Hq, D = q.shape
    q = _lastdim_contiguous(q)
    k, v = _kv_for("cudnn", k, v, Hq)
    r = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0,
        _is_causal(case), False, scale=scale)
    # lse comes back (B, H, Sq, 1) (torch 2.11); reshape copes with (B, H, Sq) too.
    return r[0].transpose(1, 2), r[1].reshape(B, Hq, Sq).contiguous()


def _cudnn_backward(dout, q, k, v, out, lse, scale, case, accs):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    dout, out, lse = _kernel_bwd_inputs(dout, out, lse, q, case)
    q = _lastdim_contiguous(q)
    kk, vv = _kv_for("cudnn", k, v, Hq)
    philox = torch.empty((), dtype=torch.int64, device=q.device)  # unused: dropout_p = 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default(
        dout.transpose(1, 2), q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
        out.transpose(1, 2), lse.unsqueeze(-1), philox, philox, None, None, None, Sq, Sk, 0.0,
        _is_causal(case), scale=scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return dq, _sum_kv_groups(dk, Hkv), _sum_kv_groups(dv, Hkv)


def _flash_forward(q, k, v, scale, case):
    B, Sq, Hq, D = q.shape
    q = _lastdim_contiguous(q)
    k, v = _kv_for("flash", k, v, Hq)
    r = torch.ops.aten._scaled_dot_product_flash_attention.default(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, _is_causal(case), False,
        scale=scale)
    return r[0].transpose(1, 2), r[1].reshape(B, Hq, Sq).contiguous()


def _flash_backward(dout, q, k, v, out, lse, scale, case, accs):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    dout, out, lse = _kernel_bwd_inputs(dout, out, lse, q, case)
    q = _lastdim_contiguous(q)
    kk, vv = _kv_for("flash", k, v, Hq)
    # rng state (2,) and offset () as its forward returns them; unused with dropout_p = 0.
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
        dout.transpose(1, 2), q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
        out.transpose(1, 2), lse, None, None, Sq, Sk, 0.0, _is_causal(case), seed, offset,
        scale=scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return dq, _sum_kv_groups(dk, Hkv), _sum_kv_groups(dv, Hkv)


# Mem-efficient kernel mask types (sdp::CustomMaskType): 0 none, 1 top-left, 2 bottom-right.
_EFFICIENT_MASK = {None: 0, "top_left": 1, "bottom_right": 2}


def _efficient_lse_rows(sq: int) -> int:
    # Its lse is (B, H, ceil(Sq / 32) * 32) and the backward reads that padded layout.
    return -(-sq // 32) * 32


def _efficient_forward(q, k, v, scale, case):
    Sq, Hq = q.shape[1], q.shape[2]
    q = _lastdim_contiguous(q)
    k, v = _kv_for("efficient", k, v, Hq)
    r = torch.ops.aten._efficient_attention_forward.default(
        q, k, v, None, None, None, None, None, 0.0, _EFFICIENT_MASK[case.alignment], True,
        scale=scale)
    lse = r[1] if r[1].shape[-1] == Sq else r[1][..., :Sq].contiguous()
    return r[0], lse


def _efficient_backward(dout, q, k, v, out, lse, scale, case, accs):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    dout, out, lse = _kernel_bwd_inputs(dout, out, lse, q, case)
    rows = _efficient_lse_rows(Sq)
    if rows != Sq:
        padded = torch.empty(B, Hq, rows, dtype=torch.float32, device=q.device)
        padded[..., :Sq] = lse
        padded[..., Sq:] = _POS_INF
        lse = padded
    q = _lastdim_contiguous(q)
    kk, vv = _kv_for("efficient", k, v, Hq)
    philox = torch.empty((), dtype=torch.int64, device=q.device)  # unused: dropout_p = 0
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward.default(
        dout, q, kk, vv, None, out, None, None, Sq, Sk, lse, 0.0, philox, philox,
        _EFFICIENT_MASK[case.alignment], False, scale=scale)
    return dq, _sum_kv_groups(dk, Hkv), _sum_kv_groups(dv, Hkv)


# --------------------------------------------------------------------------------------------
# flash_attn package. Its private interface changed across 2.6 -> 2.7 (window_size tuple ->
# window_size_left/right; forward returning 8 values -> 4; custom ops wrapping the functions),
# so arguments are matched to the installed signature by name.

_FA_DEFAULTS = {
    "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
    "alibi_slopes": None, "return_softmax": False, "deterministic": False, "rng_state": None,
}


def flash_attn_takes_softcap() -> bool:
    """Whether the installed flash_attn package (if any) takes softcap= (2.6+): where softcapped
    blocks run on GPUs (else math). Also what auto's cost model times them as."""
    fa = _flash_attn_interface()[0]
    return fa is not None and "softcap" in {p.name for p in _fa_parameters(fa._flash_attn_forward)}


def _fa_parameters(fn) -> list[inspect.Parameter]:
    target = getattr(fn, "_init_fn", None) or getattr(fn, "__wrapped__", None) or fn
    return list(inspect.signature(target).parameters.values())


def _fa_call(fn, values: dict):
    """Call a flash_attn interface function, filling its parameters from `values` by name."""
    kwargs = {}
    for p in _fa_parameters(fn):
        if p.name in values:
            kwargs[p.name] = values[p.name]
        elif p.name in _FA_DEFAULTS:
            kwargs[p.name] = _FA_DEFAULTS[p.name]
        elif p.default is inspect.Parameter.empty:
            raise RuntimeError(f"flash_attn: {getattr(fn, '__name__', fn)} has an unknown required "
                               f"parameter {p.name!r}; this flash_attn version is not supported")
    return fn(**kwargs)


def _fa_forward_outputs(r):
    """(out, softmax_lse) from _flash_attn_forward's result in any supported version."""
    if len(r) == 4:  # 2.7+: out, softmax_lse, S_dmask, rng_state
        return r[0], r[1]
    if len(r) == 8:  # <= 2.6: out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state
        return r[0], r[5]
    raise RuntimeError(f"flash_attn: _flash_attn_forward returned {len(r)} values; unsupported version")


def _flash_attn_forward(q, k, v, scale, case, interface=None):
    B, Sq, Hq, D = q.shape
    fa = interface or _flash_attn_interface()[0]
    values = dict(q=_lastdim_contiguous(q), k=_lastdim_contiguous(k), v=_lastdim_contiguous(v),
                  dropout_p=0.0, softmax_scale=scale, causal=_is_causal(case), softcap=case.softcap)
    out, lse = _fa_forward_outputs(_fa_call(fa._flash_attn_forward, values))
    lse = lse.reshape(B, Hq, -1)
    if lse.shape[-1] != Sq:
        lse = lse[..., :Sq]
    return out, lse.contiguous()


def _flash_attn_backward(dout, q, k, v, out, lse, scale, case, accs, interface=None):
    fa = interface or _flash_attn_interface()[0]
    dout, out, lse = _kernel_bwd_inputs(dout, out, lse, q, case)
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    values = dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                  dropout_p=0.0, softmax_scale=scale, causal=_is_causal(case), softcap=case.softcap)
    _fa_call(fa._flash_attn_backward, values)  # writes dq, dk, dv (dk/dv: Hkv heads)
    return dq, dk, dv


_FORWARD = {"math": _math_forward, "cudnn": _cudnn_forward, "flash": _flash_forward,
            "efficient": _efficient_forward, "flash_attn": _flash_attn_forward}
_BACKWARD = {"math": _math_backward, "cudnn": _cudnn_backward, "flash": _flash_backward,
             "efficient": _efficient_backward, "flash_attn": _flash_attn_backward}
