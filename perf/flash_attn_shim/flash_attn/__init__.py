"""A stand-in `flash_attn` package for perf/peers.py: NOT flash-attention.

ring-flash-attn and yunchang (the peers perf/peers.py measures) call flash-attention's private
block kernels, `flash_attn.flash_attn_interface._flash_attn_forward/_flash_attn_backward`, and
import them at module level. flash_attn is not installed on this project's machines (and cannot
be built here), so perf/peers.py puts this folder first on sys.path when -- and only when -- the
real package is missing. These functions keep flash-attn 2.7's signatures and semantics
(causal = bottom-right aligned, lse (B, H, Sq) fp32, GQA without repeated K/V, backward writes
dq/dk/dv into the given buffers) and compute with ringattn's own block kernel
(ringattn.block_attn_forward/backward, backend="auto": the math kernel on CPU, cuDNN on an
H100). So a peer measured through it runs ITS schedule, communication and merges on the SAME
block kernel ringattn uses: the comparison is of everything but the kernel.

Not supported (raise NotImplementedError naming the feature): dropout, sliding windows,
softcap, ALiBi, the varlen functions.
"""
__version__ = "2.7.4+ringattn.shim"
SHIM = True

from .flash_attn_interface import flash_attn_func  # noqa: E402,F401
