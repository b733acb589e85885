"""TokenWeave for tensor-parallel layers: fused AllReduce + residual + RMSNorm on symmetric
memory (with an agreed fallback ladder), wave-aware token splitting, and a wrapper that runs a
Hugging Face Llama-style decoder layer tensor-parallel with both. See docs/tokenweave.md."""
from ringattn.tokenweave.fused_allreduce_rmsnorm import (
    AllReduceRMSNorm,
    TokenWeaveConfig,
    TokenWeaveError,
    fused_allreduce_rmsnorm,
    fused_allreduce_rmsnorm_path,
    get_allreduce_rmsnorm,
    shard_bounds,
)

__all__ = [
    "AllReduceRMSNorm",
    "TokenWeaveConfig",
    "TokenWeaveError",
    "fused_allreduce_rmsnorm",
    "fused_allreduce_rmsnorm_path",
    "get_allreduce_rmsnorm",
    "shard_bounds",
]
