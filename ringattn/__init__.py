"""ringattn: distributed long-context attention for PyTorch.

TokenRing and Ring Self-Attention (sequence parallel), fused AllReduce-RMSNorm and TokenWeave
token splitting (tensor parallel), over torch.distributed (NCCL/gloo) or CUDA IPC.
"""
from ringattn import ops
from ringattn.ops import add_rmsnorm, merge_attn_states, merge_attn_states_
from ringattn.block_attention import block_attn_backward, block_attn_forward, available_backends

__version__ = "0.1.0"

__all__ = [
    "ops",
    "merge_attn_states",
    "merge_attn_states_",
    "add_rmsnorm",
    "block_attn_forward",
    "block_attn_backward",
    "available_backends",
]
