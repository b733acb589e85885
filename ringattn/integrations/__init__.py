"""Wrappers that put ringattn's sequence-parallel attention inside existing model code.

- ``ringattn.integrations.huggingface``: Hugging Face Llama / Mistral / Qwen2 causal LMs, through
  transformers' attention-function registry (``AttentionInterface``), plus helpers to shard a
  batch and compute the loss across ranks.
- ``ringattn.integrations.deepspeed``: the 2-D mode (DeepSpeed-Ulysses all-to-all over heads
  inside one group, ring / TokenRing across the other) and DeepSpeed-engine helpers. DeepSpeed
  itself is optional (``pip install 'ringattn[deepspeed]'``); without it the all-to-all is
  ringattn's own.

Submodules are imported on use, so ``import ringattn`` never needs transformers or DeepSpeed.
"""

__all__ = ["huggingface", "deepspeed"]
