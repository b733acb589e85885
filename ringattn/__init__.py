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

from ringattn.layout import gather_sequence, shard_sequence  # noqa: E402
from ringattn.sequence_parallel import (  # noqa: E402
    AlgorithmChoice,
    CommStats,
    choose_algorithm,
    comm_stats,
    predict_comm_bytes,
    ring_attention,
    sequence_parallel_attention,
    token_ring_attention,
    ulysses_attention,
)
from ringattn.block_attention import select_backend  # noqa: E402
from ringattn.hardware import auto_hardware, set_auto_hardware  # noqa: E402
from ringattn.decode import sharded_kv_attention  # noqa: E402
from ringattn import compiled  # noqa: E402,F401  (registers ringattn::sp_attention for torch.compile)
from ringattn import tokenweave  # noqa: E402
from ringattn.tokenweave import (  # noqa: E402
    TokenWeaveDecoderLayer,
    TokenWeaveDecoderStack,
    apply_tokenweave,
    fused_allreduce_rmsnorm,
    fused_allreduce_rmsnorm_path,
)

__all__ += [
    "shard_sequence", "gather_sequence", "ring_attention", "token_ring_attention",
    "sequence_parallel_attention", "ulysses_attention", "comm_stats", "CommStats", "choose_algorithm", "AlgorithmChoice",
    "predict_comm_bytes", "select_backend", "sharded_kv_attention", "tokenweave", "TokenWeaveDecoderLayer",
    "TokenWeaveDecoderStack", "apply_tokenweave", "fused_allreduce_rmsnorm", "fused_allreduce_rmsnorm_path", "set_auto_hardware",
    "auto_hardware",
]
