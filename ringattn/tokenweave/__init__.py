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
from ringattn.tokenweave.layer import TokenWeaveDecoderLayer, TokenWeaveDecoderStack, apply_tokenweave, run_tokenweave_layers
from ringattn.tokenweave.token_split import split_ranges, wave_aware_split

__all__ = [
    "AllReduceRMSNorm",
    "TokenWeaveConfig",
    "TokenWeaveError",
    "fused_allreduce_rmsnorm",
    "fused_allreduce_rmsnorm_path",
    "get_allreduce_rmsnorm",
    "shard_bounds",
    "TokenWeaveDecoderLayer",
    "TokenWeaveDecoderStack",
    "apply_tokenweave",
    "run_tokenweave_layers",
    "split_ranges",
    "wave_aware_split",
]
