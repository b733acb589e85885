"""Tensor-parallel Hugging Face Llama-style decoder layers run TokenWeave-style.

    layer = TokenWeaveDecoderLayer(hf_decoder_layer, group=tp_group)
    out = layer(hidden_states, position_embeddings=(cos, sin), attention_mask=None)  # == hf layer

    model = apply_tokenweave(hf_model, group=tp_group)  # every decoder layer swapped; generate() as before
    stack = TokenWeaveDecoderStack(hf_model.model.layers, final_norm=hf_model.model.norm, group=tp_group)
    y = stack(hidden_states, position_embeddings=(cos, sin))  # == norm(layers(hidden_states))

Sharding (Megatron-style, over `group`): q/k/v and gate/up projections column-wise by heads /
intermediate rows, o_proj and down_proj row-wise; rank r keeps heads [r*Hq/W, (r+1)*Hq/W) and the
matching KV heads (Hkv/W of them; with fewer KV heads than ranks, Hkv | W, the one KV head its
query heads read, replicated on W/Hkv ranks, as Megatron and vLLM do). Row-parallel GEMMs write their partial sums straight into the symmetric
buffer (`torch.mm(..., out=handle.input_buffer(...))`: no copy), and each partial is reduced by
the fused AllReduce + residual + RMSNorm (fused_allreduce_rmsnorm.py):
    attention partial  -> fused(+ residual, post_attention_layernorm)
    MLP partial        -> fused(+ residual, the NEXT layer's input_layernorm, or the final norm)
so every MLP all-reduce is fused with the next layer's input norm, as TokenWeave does. Between
the two, the residual stays sharded by token when the fused two-shot / rs_ag path runs.

Token splitting (token_split.py): the flattened B*S tokens are cut into two wave-aware halves;
while the main stream runs one half's attention or MLP, the other half's fused op runs on a
high-priority side stream (events only). A split inside a sequence is exact: the second half's
queries attend to the first half's keys/values, which are kept for the layer.

KV cache (serving): given a HF Cache (past_key_values, or 4.x's past_key_value, as the model's own
loop passes it), each layer appends this call's keys/values at its layer_idx and attends to what
the cache keeps before them: prefill, chunked prefill and decode, so generate() runs on a model
whose layers are swapped (each rank's cache holds its KV-head shard). See _LayerKV.

Scope: forward (inference prefill and decode) of the decoder layers of TOKENWEAVE_MODEL_TYPES, each
checked against the HF layer (docs/tokenweave.md lists them): the Llama block (rotary
position_embeddings given by the model, optional q/k norms and biases; Gemma's (1 + w) norms and
Granite's residual_multiplier folded into the weights; SmolLM3's NoPE layers skip RoPE); families'
own RoPE (interleaved, partial, half-width: their module's apply_rotary_pos_emb), q/k norms after
RoPE (HunYuan), queries scaled by position (Ministral 3; position_ids required); sandwich norms (an
output norm before each residual add: Gemma 2 / 3, HyperCLOVA X); attention softcap (Gemma 2) and
sinks (gpt-oss, Granite SWA) in eager math; sparse MoE with tensor-parallel experts (Qwen3-MoE,
Mixtral, Qwen2-MoE, gpt-oss, GLM-4-MoE: _shard_moe). Other families' layers are refused (their
blocks would otherwise be silently dropped). Causal attention with an optional mask: 4-D (sdpa/eager), or a flash-attention model's 2-D padding mask,
packing by position_ids or cu_seq_lens_q/k (_packed_mask); sliding-window layers apply their window
(the module's or its config's sliding_window, AND-ed into any mask); dynamic KV caches (a static
cache is refused); inference only (a backward through the layers raises).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import torch.distributed as dist

from ringattn.integrations.huggingface import _transformers_major, layer_window
from ringattn.tokenweave.fused_allreduce_rmsnorm import (
    AllReduceRMSNorm,
    _add_rmsnorm,
    TokenWeaveConfig,
    get_allreduce_rmsnorm,
)
from ringattn.tokenweave.token_split import SideStream, num_sms, split_min_tokens, split_ranges


# Decoder-layer families whose layer this module reproduces exactly (tests/test_tokenweave_layer.py,
# against the HF layer): the Llama block (pre-norm attention and MLP, RMSNorm x * w, rotate-half
# RoPE, gate/up/down MLP); Gemma's RMSNorm x * (1 + w) and Granite's residual_multiplier are
# folded into the weights. Anything else (Gemma 3's sandwich norms, Helium's interleaved RoPE,
# Cohere's parallel block, ...) is refused by name rather than computed as a Llama block.
# Ministral, CWM and Seed-OSS (added 2026-12-07) are the Llama block. Laguna (a softplus output gate
# on its attention) is not (about 0.4 off when run as one) and stays refused.
# Helium, ERNIE 4.5, HunYuan (dense) and Ministral 3 were added 2026-12-08: the Llama block with RoPE on
# interleaved pairs (_OWN_ROPE_TYPES: the module's own apply_rotary_pos_emb is called), with q/k norms
# after RoPE, or with queries scaled by position (_QUERY_POSITION_SCALE_TYPES); and the same day the
# sparse-MoE Qwen3-MoE, Mixtral and Qwen2-MoE (_MOE_TYPES), and Gemma 2 / 3 and HyperCLOVA X (sandwich
# norms, Gemma 2's softcap, Gemma 3's per-layer-type rotary tables), gpt-oss and Granite SWA (attention
# sinks; Granite SWA's per-layer RoPE bases and NoPE layers), GLM-4-MoE (shared experts, partial RoPE).
TOKENWEAVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "granite", "ministral", "cwm",
                          "seed_oss", "helium", "ernie4_5", "hunyuan_v1_dense", "ministral3", "qwen3_moe", "mixtral",
                          "qwen2_moe", "gemma2", "gemma3_text", "hyperclovax",
                          "gpt_oss", "granite_swa", "glm4_moe")
_OWN_ROPE_TYPES = ("helium", "ernie4_5", "gpt_oss", "glm4_moe")
# sparse-MoE families whose blocks are run with tensor-parallel experts (_shard_moe)
_MOE_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "glm4_moe")
# sandwich-norm families: attention and MLP outputs normed before the residual add: {model_type:
# (attention output norm, MLP input norm, MLP output norm)} (HyperCLOVA X: when use_post_norm)
_SANDWICH_TYPES = {
    "gemma2": ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "hyperclovax": ("post_norm1", "post_attention_layernorm", "post_norm2"),
}
# families whose sliding and full layers use different rotary tables: one call's layers must share a type
_PER_TYPE_ROPE_TYPES = ("gemma3_text",)
# families that scale queries by position after RoPE (Llama 4's attention temperature)
_QUERY_POSITION_SCALE_TYPES = ("ministral3",)
# families whose per-head q/k RMSNorms follow RoPE: {model_type: (q norm, k norm attribute names)}
_QK_NORMS_AFTER_ROPE = {"hunyuan_v1_dense": ("query_layernorm", "key_layernorm")}
# RMSNorms that scale by (1 + weight) (Gemma's): their weight enters the fused kernel as 1 + w.
_ONE_PLUS_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """The weight the fused kernel multiplies by for this HF norm (1 + w for Gemma's)."""
    w = norm.weight.detach()
    return (1.0 + w.float()).to(w.dtype) if type(norm).__name__ in _ONE_PLUS_NORMS else w


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Local RMSNorm with the fused kernel's numerics (fp32 inside, float64 for float64; one rounding)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = x.to(acc)
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (float, int)):
            return float(v)
    raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _sandwich_norms(hf_layer: nn.Module, model_type: str):
    """(attention output norm, MLP input norm, MLP output norm) of a sandwich-norm layer, or None."""
    names = _SANDWICH_TYPES.get(model_type)
    if names is None:
        return None
    norms = [getattr(hf_layer, n, None) for n in names]
    if any(n is None for n in norms):
        raise TypeError(f"TokenWeaveDecoderLayer: {type(hf_layer).__name__} (model_type={model_type!r}) lacks one of its "
                        f"norms {names}")
    if isinstance(norms[0], nn.Identity) and isinstance(norms[2], nn.Identity):  # (HyperCLOVA X without post norms)
        return None
    if any(isinstance(n, nn.Identity) for n in norms):
        raise TypeError(f"TokenWeaveDecoderLayer: {type(hf_layer).__name__} has only some of its sandwich norms {names}")
    return tuple(norms)


# -- sparse-MoE blocks (_MOE_TYPES), tensor-parallel ----------------------------------------------------
# Every expert's (and a shared expert's) intermediate dimension is sharded over the ranks as a dense
# MLP's is: gate/up rows, down columns. The router stays whole on every rank: all ranks see the same
# (replicated) normed input, so they route every token to the same experts, and each rank's block
# output is its partial sum of the same weighted expert outputs -- reduced by the fused all-reduce.
# The HF block itself runs on the sharded copy (its routing, top-k and weighting are its own code).


def _is_moe_block(mlp) -> bool:
    return (mlp is not None and hasattr(mlp, "experts") and (hasattr(mlp, "gate") or hasattr(mlp, "router"))
            and not hasattr(mlp, "gate_proj"))


def _expert_projs(e: nn.Module):
    """(gate, up, down) nn.Linear of one transformers-4.x expert MLP (gate_proj/up_proj/down_proj, or
    Mixtral's w1/w3/w2)."""
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(isinstance(getattr(e, n, None), nn.Linear) for n in names):
            return tuple(getattr(e, n) for n in names), names
    raise TypeError(f"TokenWeaveDecoderLayer: expert {type(e).__name__} has neither gate_proj/up_proj/down_proj nor "
                    "w1/w3/w2 linear layers")


def _fused_experts_check(ex: nn.Module) -> None:
    """transformers 5's fused experts: gate_up_proj (E, 2I, H) (gate rows, then up rows) and down_proj
    (E, H, I), no biases; other layouts are refused by name."""
    gu, dp = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if (not isinstance(gu, torch.Tensor) or not isinstance(dp, torch.Tensor) or gu.dim() != 3 or dp.dim() != 3
            or getattr(ex, "is_transposed", False) or not getattr(ex, "has_gate", True) or getattr(ex, "has_bias", False)
            or any(n.endswith("bias") for n, _ in ex.named_parameters()) or gu.shape[1] != 2 * dp.shape[2]):
        raise TypeError(f"TokenWeaveDecoderLayer: {type(ex).__name__} is not the (E, 2I, H) gate_up_proj / (E, H, I) "
                        "down_proj expert layout without biases that the MoE layers shard")


def _gpt_oss_experts(ex: nn.Module) -> bool:
    """gpt-oss's experts: gate_up_proj (E, H, 2I) with gate and up interleaved along the last dim, its
    bias (E, 2I), down_proj (E, I, H) and its bias (E, H)."""
    names = {n for n, _ in ex.named_parameters()}
    if names != {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"} or not hasattr(ex, "_apply_gate"):
        return False
    E, H, I2 = ex.gate_up_proj.shape
    return (I2 % 2 == 0 and tuple(ex.gate_up_proj_bias.shape) == (E, I2) and tuple(ex.down_proj.shape) == (E, I2 // 2, H)
            and tuple(ex.down_proj_bias.shape) == (E, H))


def _shared_experts(block) -> tuple[str | None, nn.Module | None]:
    """(attribute name, module) of a sparse-MoE block's dense shared expert MLP (Qwen2-MoE's
    shared_expert, GLM-4-MoE's shared_experts), or (None, None)."""
    for name in ("shared_expert", "shared_experts"):
        if isinstance(getattr(block, name, None), nn.Module):
            return name, getattr(block, name)
    return None, None


def _moe_intermediate_sizes(block) -> dict:
    """{what: intermediate size} of a sparse-MoE block's experts (and shared expert): each must split
    over the ranks."""
    ex = block.experts
    if isinstance(ex, nn.ModuleList):
        sizes = {_expert_projs(e)[0][0].out_features for e in ex}
        if len(sizes) != 1:
            raise TypeError(f"TokenWeaveDecoderLayer: experts of different intermediate sizes {sorted(sizes)}")
        out = {"expert intermediate size": sizes.pop()}
    elif _gpt_oss_experts(ex):
        out = {"expert intermediate size": ex.down_proj.shape[1]}
    else:
        _fused_experts_check(ex)
        out = {"expert intermediate size": ex.down_proj.shape[2]}
    shared = _shared_experts(block)[1]
    if shared is not None:
        out["shared expert intermediate size"] = _expert_projs(shared)[0][0].out_features
    return out


def _sliced_linear(lin: nn.Linear, rows: slice | None = None, cols: slice | None = None) -> nn.Linear:
    """A new Linear holding rows (column-parallel) or columns (row-parallel) of `lin`'s weight."""
    if lin.bias is not None:
        raise TypeError("TokenWeaveDecoderLayer: MoE expert projections with a bias are not sharded")
    w = lin.weight[rows] if rows is not None else lin.weight[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    new.weight = _param(w)
    return new


def _shard_moe(block: nn.Module, W: int, r: int) -> nn.Module:
    """A copy of the HF sparse-MoE `block` whose experts (and shared expert) keep this rank's 1/W of
    their intermediate dimension; the router (and any shared-expert gate) is copied whole. The full
    expert weights are never copied (they are left out of the deep copy, then sliced)."""
    ex = block.experts
    shared_name, shared = _shared_experts(block)
    dense = list(ex) if isinstance(ex, nn.ModuleList) else []
    if shared is not None:
        dense.append(shared)
    big = [p for m in dense for p in m.parameters()] + ([] if isinstance(ex, nn.ModuleList) else list(ex.parameters()))
    copy_ = copy.deepcopy(block, {id(p): None for p in big})  # (the big weights deep-copy as None)

    def shard_mlp(src: nn.Module, dst: nn.Module) -> None:
        (g, u, d), names = _expert_projs(src)
        i = g.out_features // W
        part = slice(r * i, (r + 1) * i)
        for lin, name, kw in ((g, names[0], dict(rows=part)), (u, names[1], dict(rows=part)),
                              (d, names[2], dict(cols=part))):
            setattr(dst, name, _sliced_linear(lin, **kw))

    if isinstance(ex, nn.ModuleList):
        for src, dst in zip(ex, copy_.experts):
            shard_mlp(src, dst)
    elif _gpt_oss_experts(ex):  # interleaved (gate, up) pairs: a contiguous slice keeps whole pairs
        I = ex.down_proj.shape[1]
        i = I // W
        pairs = slice(2 * r * i, 2 * (r + 1) * i)
        copy_.experts.gate_up_proj = _param(ex.gate_up_proj[:, :, pairs])
        copy_.experts.gate_up_proj_bias = _param(ex.gate_up_proj_bias[:, pairs])
        copy_.experts.down_proj = _param(ex.down_proj[:, r * i : (r + 1) * i])
        # the down bias is inside each expert's weighted output: added once, by rank 0's partial
        copy_.experts.down_proj_bias = _param(ex.down_proj_bias if r == 0 else torch.zeros_like(ex.down_proj_bias))
        if hasattr(copy_.experts, "intermediate_size"):
            copy_.experts.intermediate_size = i
    else:
        I = ex.down_proj.shape[2]
        i = I // W
        gu = ex.gate_up_proj
        copy_.experts.gate_up_proj = _param(torch.cat([gu[:, r * i : (r + 1) * i], gu[:, I + r * i : I + (r + 1) * i]], 1))
        copy_.experts.down_proj = _param(ex.down_proj[:, :, r * i : (r + 1) * i])
        if hasattr(copy_.experts, "intermediate_dim"):
            copy_.experts.intermediate_dim = i
    if shared is not None:
        shard_mlp(shared, getattr(copy_, shared_name))
    for m in copy_.modules():
        for n, p in list(m._parameters.items()):
            if p is None and n in ("weight", "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                raise RuntimeError(f"TokenWeaveDecoderLayer: MoE parameter {type(m).__name__}.{n} was not sharded")
            if p is not None:
                p.requires_grad_(False)
    return copy_.eval()


class TokenWeaveDecoderLayer(nn.Module):
    """One HF Llama-style decoder layer, sharded tensor-parallel over `group` (see module doc).

    forward(hidden_states (B, S, H) replicated on every rank, position_embeddings=(cos, sin),
    attention_mask=None | (B, 1, S, S)) -> hidden_states (B, S, H), equal to the HF layer's output.
    token_split: True / False (None: RINGATTN_TW_SPLIT, default on); below split_min_tokens
    (default RINGATTN_TW_SPLIT_MIN_TOKENS or 1024) tokens splitting is off by itself.
    """

    def __init__(
        self,
        hf_layer: nn.Module,
        group=None,
        *,
        token_split: bool | None = None,
        split_min_tokens: int | None = None,
        config: TokenWeaveConfig | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        self.world_size = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.config = config
        self.token_split = (os.environ.get("RINGATTN_TW_SPLIT", "1") != "0") if token_split is None else bool(token_split)
        self.split_min_tokens = split_min_tokens if split_min_tokens is not None else split_min_tokens_default()
        attn = getattr(hf_layer, "self_attn", None)
        # (Mixtral's sparse-MoE block is block_sparse_moe on transformers 4.x)
        mlp = getattr(hf_layer, "mlp", None) or getattr(hf_layer, "block_sparse_moe", None)
        need = [(attn, "self_attn"), (mlp, "mlp"), (getattr(hf_layer, "input_layernorm", None), "input_layernorm"),
                (getattr(hf_layer, "post_attention_layernorm", None), "post_attention_layernorm")]
        missing = [n for m, n in need if m is None]
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if attn is not None and not hasattr(attn, n)]
        # an MLP: gate/up/down; or (the MoE families) a sparse-MoE block: router `gate` and `experts`
        moe = _is_moe_block(mlp)
        parts = (("router" if hasattr(mlp, "router") else "gate"), "experts") if moe else \
            ("gate_proj", "up_proj", "down_proj", "act_fn")
        missing += [f"mlp.{n}" for n in parts if mlp is not None and not hasattr(mlp, n)]
        if missing:
            raise TypeError(f"TokenWeaveDecoderLayer needs a Llama-style decoder layer; {type(hf_layer).__name__} lacks {missing}")
        model_type = getattr(getattr(attn, "config", None), "model_type", None)
        if model_type not in TOKENWEAVE_MODEL_TYPES:
            raise TypeError(
                f"TokenWeaveDecoderLayer: {type(hf_layer).__name__} (model_type={model_type!r}) is not one of the "
                f"decoder layers it reproduces exactly ({', '.join(TOKENWEAVE_MODEL_TYPES)}); refused rather than "
                "run as a Llama block (its norms, RoPE or block structure may differ)")
        self.model_type = model_type
        if moe and model_type not in _MOE_TYPES:
            raise TypeError(f"TokenWeaveDecoderLayer: {type(hf_layer).__name__} (model_type={model_type!r}) has a "
                            f"sparse-MoE block, which is run tensor-parallel for {', '.join(_MOE_TYPES)} only")
        # Sliding-window layers (Mistral/Qwen2-style): the window this layer's attention applies
        window = layer_window(attn)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"TokenWeaveDecoderLayer: sliding_window must be None or an int >= 1, got {window!r}")
        self.window = window
        self.layer_idx = getattr(attn, "layer_idx", None)  # where a KV cache keeps this layer's keys
        # dropouts the HF layer applies in training mode (Seed-OSS: 0.1 on attention and residuals by
        # default); these layers apply none, so training with any of them non-zero is refused
        cfg = getattr(attn, "config", None)
        # (and Mixtral's router jitter: noise on the MoE input in training mode)
        self.dropouts = {n: float(getattr(cfg, n, 0.0) or 0.0)
                         for n in ("attention_dropout", "residual_dropout", "hidden_dropout", "router_jitter_noise")
                         if hasattr(cfg, n)}
        # SmolLM3's NoPE layers (every 4th by default) skip the rotary embedding the model still passes
        self.use_rope = bool(getattr(attn, "use_rope", True))
        # Ministral 3: queries scaled by 1 + beta * log(1 + floor(position / original max positions)) after
        # RoPE (Llama 4's attention temperature), with its module's own get_llama_4_attn_scale
        self.query_pos_scale = None
        if model_type in _QUERY_POSITION_SCALE_TYPES:
            rp = getattr(cfg, "rope_parameters", None) or {}
            fn = getattr(sys.modules.get(type(attn).__module__), "get_llama_4_attn_scale", None)
            if fn is None or rp.get("llama_4_scaling_beta") is None:
                raise TypeError(f"TokenWeaveDecoderLayer: model_type={model_type!r} scales its queries by position, but "
                                "its module has no get_llama_4_attn_scale or its config no rope_parameters"
                                "['llama_4_scaling_beta']")
            self.query_pos_scale = (fn, rp["llama_4_scaling_beta"], rp.get("original_max_position_embeddings"))
        # families with their own RoPE (Helium / ERNIE 4.5: interleaved pairs; GLM-4-MoE: partial;
        # gpt-oss: half-width tables): their module's own apply_rotary_pos_emb is applied
        self.rope_fn = None
        if model_type in _OWN_ROPE_TYPES:
            self.rope_fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
            if self.rope_fn is None:
                raise TypeError(f"TokenWeaveDecoderLayer: {type(attn).__module__} has no apply_rotary_pos_emb "
                                f"(model_type={model_type!r} applies its own RoPE)")
        if hasattr(hf_layer, "attention_type"):  # models that pick each layer's mask by it (Qwen2, Gemma 3 on 4.x)
            self.attention_type = hf_layer.attention_type
        W, r = self.world_size, self.rank
        D = int(getattr(attn, "head_dim", 0) or attn.q_proj.out_features // attn.config.num_attention_heads)
        hq, hkv = attn.q_proj.out_features // D, attn.k_proj.out_features // D
        inters = _moe_intermediate_sizes(mlp) if moe else {"intermediate size": mlp.gate_proj.out_features}
        bad = {k: v for k, v in inters.items() if v % W}
        if hq % W or bad or (hkv % W and W % hkv):
            sizes = " and ".join(f"{k} ({v})" for k, v in inters.items())
            raise ValueError(
                f"tensor parallelism over {W} ranks needs {W} | query heads ({hq}) and {sizes}, "
                f"and {W} | KV heads ({hkv}) or KV heads | {W} (then each KV head is replicated on {W} / KV heads "
                "ranks)"
            )
        # KV heads: sharded (W | hkv: rank r keeps hkv/W of them), or replicated (hkv | W, e.g. MQA:
        # rank r keeps KV head r // (W / hkv), the one its hq/W query heads all read)
        self.kv_replicas = max(1, W // hkv)
        self.head_dim, self.hq, self.hkv = D, hq // W, max(1, hkv // W)
        self.n_rep = self.hq // self.hkv
        self.hidden = attn.o_proj.out_features
        self.scaling = float(getattr(attn, "scaling", D**-0.5))

        def rows(lin: nn.Linear, n: int, i: int = r):
            w = lin.weight[i * n : (i + 1) * n]
            b = lin.bias[i * n : (i + 1) * n] if lin.bias is not None else None
            return w, b

        kv_shard = r // self.kv_replicas
        qw, qb = rows(attn.q_proj, self.hq * D)
        kw, kb = rows(attn.k_proj, self.hkv * D, kv_shard)
        vw, vb = rows(attn.v_proj, self.hkv * D, kv_shard)
        self.qkv_weight = _param(torch.cat([qw, kw, vw]))
        self.qkv_bias = _param(torch.cat([qb, kb, vb])) if qb is not None else None
        # Granite: residual + out * residual_multiplier after attention and MLP -> folded into the
        # row-parallel weights and biases (1.0 elsewhere: unchanged); with sandwich norms (HyperCLOVA X)
        # into the output norms' weights instead (a norm would undo it on the weights)
        res_mult = float(getattr(hf_layer, "residual_multiplier", 1.0))
        sandwich = _sandwich_norms(hf_layer, model_type)
        norms_res_mult, res_mult = (res_mult, 1.0) if sandwich else (1.0, res_mult)

        def scaled(t):
            return t if t is None or res_mult == 1.0 else t * res_mult

        self.o_weight = _param(scaled(attn.o_proj.weight[:, r * self.hq * D : (r + 1) * self.hq * D]))
        # Row-parallel biases are added once, by rank 0, to its partial sum.
        self.o_bias = _param(scaled(attn.o_proj.bias)) if attn.o_proj.bias is not None and r == 0 else None
        self.moe = None  # the MoE families: a copy of the HF block, its experts sharded (_shard_moe)
        self.res_mult = res_mult
        if moe:
            self.moe = _shard_moe(mlp, W, r)
            self.gate_up_weight = self.gate_up_bias = self.down_weight = self.down_bias = self.act_fn = None
        else:
            il = inters["intermediate size"] // W
            gw, gb = rows(mlp.gate_proj, il)
            uw, ub = rows(mlp.up_proj, il)
            self.gate_up_weight = _param(torch.cat([gw, uw]))
            self.gate_up_bias = _param(torch.cat([gb, ub])) if gb is not None else None
            self.down_weight = _param(scaled(mlp.down_proj.weight[:, r * il : (r + 1) * il]))
            self.down_bias = _param(scaled(mlp.down_proj.bias)) if mlp.down_proj.bias is not None and r == 0 else None
            self.act_fn = mlp.act_fn
        # per-head q/k RMSNorms: before RoPE (Qwen3's q_norm / k_norm), or after it (HunYuan's
        # query_layernorm / key_layernorm)
        qn, kn = _QK_NORMS_AFTER_ROPE.get(model_type, ("q_norm", "k_norm"))
        self.qk_norm_after_rope = model_type in _QK_NORMS_AFTER_ROPE
        self.q_norm = copy.deepcopy(getattr(attn, qn)) if getattr(attn, qn, None) is not None else None
        self.k_norm = copy.deepcopy(getattr(attn, kn)) if getattr(attn, kn, None) is not None else None
        self.input_norm_weight = _param(_norm_weight(hf_layer.input_layernorm))
        self.input_norm_eps = _norm_eps(hf_layer.input_layernorm)
        # Sandwich norms (_SANDWICH_TYPES: Gemma 2 / 3, HyperCLOVA X): the all-reduced attention and MLP
        # outputs are normed before each residual add, and the MLP's input norm is another one.
        # post_norm_*: the MLP's input norm either way; attn_out_norm / mlp_out_norm: (weight, eps) of
        # the output norms, or None.
        self.attn_out_norm = self.mlp_out_norm = None
        mlp_in = hf_layer.post_attention_layernorm
        if sandwich:
            attn_out, mlp_in, mlp_out = sandwich

            def out_norm(m):
                w = _norm_weight(m)
                return _param(w if norms_res_mult == 1.0 else (w.float() * norms_res_mult).to(w.dtype)), _norm_eps(m)

            self.attn_out_norm, self.mlp_out_norm = out_norm(attn_out), out_norm(mlp_out)
        self.post_norm_weight = _param(_norm_weight(mlp_in))
        self.post_norm_eps = _norm_eps(mlp_in)
        # Gemma 2: attention-logit softcapping, every score s -> c * tanh(s / c) (SDPA has none: _sdpa's math)
        cap = getattr(attn, "attn_logit_softcapping", getattr(cfg, "attn_logit_softcapping", None))
        self.softcap = float(cap) if cap else None
        # gpt-oss: a learned per-head attention sink (an extra logit in each softmax denominator): this
        # rank's query heads' (SDPA has none: _sdpa's math)
        sinks = getattr(attn, "sinks", None)
        self.sinks = _param(sinks[r * self.hq : (r + 1) * self.hq]) if isinstance(sinks, torch.Tensor) else None
        # Gemma 3: sliding and full layers take different rotary tables (the model passes each its own)
        types = getattr(cfg, "layer_types", None)
        self.layer_type = types[self.layer_idx] if types and self.layer_idx is not None else None
        # the rotary table this layer takes, where a model has several (None: the one every layer takes):
        # Gemma 3's per layer type; Granite SWA's per-layer RoPE base (layer_rope_theta; 0: NoPE, no table)
        self.rope_key = self.layer_type if model_type in _PER_TYPE_ROPE_TYPES else None
        thetas = getattr(cfg, "layer_rope_theta", None)
        if thetas and self.layer_idx is not None:
            self.rope_key = float(thetas[self.layer_idx])
            if self.rope_key == 0:
                self.use_rope = False
        self.is_sliding = bool(getattr(attn, "is_sliding", self.window is not None))
        # transformers 4.x layers return a tuple (hidden_states, ...), 5.x a tensor: answer alike so
        # the wrapper drops into the model's own layer loop.
        ann = getattr(type(hf_layer).forward, "__annotations__", {}).get("return", "")
        # (transformers 5 layers all return the tensor; some keep a stale tuple annotation: Gemma 3's)
        self.returns_tuple = "tuple" in str(ann).lower() and _transformers_major() < 5
        if device is not None:
            self.to(device)

    # -- pieces ---------------------------------------------------------------------------------

    @property
    def gemm_cols(self) -> int:
        """Output columns of the layer's widest GEMM (what the wave-aware split is shaped for)."""
        # (an MoE layer's expert GEMMs take a varying number of tokens each: the QKV GEMM shapes the split)
        return max(self.qkv_weight.shape[0], self.gate_up_weight.shape[0] if self.moe is None else 0)

    def handle(self, device: torch.device) -> AllReduceRMSNorm:
        return get_allreduce_rmsnorm(self.group, device, self.config)

    def _band(self, qs: int, qe: int, device) -> torch.Tensor:
        """(qe-qs, qe) bool: query position p in [qs, qe) sees key t iff t <= p (and p - t < window)."""
        d = torch.arange(qs, qe, device=device)[:, None] - torch.arange(qe, device=device)[None, :]
        m = d >= 0
        return m & (d < self.window) if self.window is not None else m

    def _windowed(self, m: torch.Tensor, qs: int, qe: int) -> torch.Tensor:
        """A caller's mask rows [qs, qe) x keys [0, qe), with the layer's window applied too (a mask that
        already holds it is unchanged: the band is AND-ed in; bool or additive float masks)."""
        if self.window is None or self.window >= qe:
            return m
        d = torch.arange(qs, qe, device=m.device)[:, None] - torch.arange(qe, device=m.device)[None, :]
        far = d >= self.window
        if m.dtype == torch.bool:
            return m & ~far
        return m.masked_fill(far, torch.finfo(m.dtype).min)

    def attention_into(self, y, t0, t1, cos, sin, mask, batch, seqlen, k_store, v_store, out, kv=None,
                       pos=None) -> None:
        """Row-parallel attention partial of tokens [t0, t1) (flattened B*S order) into `out` (n x H).

        y: (n, H) normed input of those tokens; cos/sin: (B*S, D); k_store/v_store: (B*S, Hkv_local, D),
        this call's keys/values, filled here for [t0, t1) and read for earlier tokens of the same
        sequences (a split inside a sequence); kv: the layer's _LayerKV (a KV cache's kept past
        keys in front of this call's; None: no cache). mask: (B, 1|H, S, P + S) over the kept past
        P keys and this call's S, or None (causal from position P, within the window). pos: (B*S,) the
        tokens' position_ids (needed by layers that scale queries by position: query_pos_scale)."""
        n, D = t1 - t0, self.head_dim
        kv = kv if kv is not None else _LayerKV(None, None, k_store, v_store, batch, seqlen)
        qkv = F.linear(y, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.hq * D, self.hkv * D, self.hkv * D], dim=-1)
        q, k, v = q.reshape(n, self.hq, D), k.reshape(n, self.hkv, D), v.reshape(n, self.hkv, D)
        if not self.qk_norm_after_rope:
            q, k = self._qk_norms(q, k)
        if self.use_rope and self.rope_fn is not None:  # the family's own RoPE
            q, k = self.rope_fn(q, k, cos[t0:t1], sin[t0:t1], unsqueeze_dim=1)
            q, k = q.to(y.dtype), k.to(y.dtype)
        elif self.use_rope:
            c, s = cos[t0:t1, None, :], sin[t0:t1, None, :]
            q, k = (q * c + _rotate_half(q) * s).to(y.dtype), (k * c + _rotate_half(k) * s).to(y.dtype)
        if self.qk_norm_after_rope:
            q, k = self._qk_norms(q, k)
        if self.query_pos_scale is not None:
            fn, beta, max_pos = self.query_pos_scale
            q = q * fn(pos[None, t0:t1], beta, max_pos).reshape(n, 1, 1).to(q.dtype)
        k_store[t0:t1] = k
        v_store[t0:t1] = v
        if kv.commit_early:  # one range holds the whole call: append it to the cache now, attend to what it returns
            kv.commit()
        P = kv.past
        mask = kv.layer_mask(self, mask)
        attn = q.new_empty(n, self.hq, D)
        # whole sequences inside [t0, t1) (one batched call) and at most two partial ones at its ends,
        # found without a Python loop over the batch (a decode step of B sequences is B whole ones)
        b_lo, b_hi = -(-t0 // seqlen), t1 // seqlen  # whole: [b_lo, b_hi)
        ends = [b for b in sorted({t0 // seqlen, (t1 - 1) // seqlen}) if not b_lo <= b < b_hi]
        full = range(b_lo, b_hi) if b_lo < b_hi else []
        for b in ends:
            qs, qe = max(t0, b * seqlen) - b * seqlen, min(t1, (b + 1) * seqlen) - b * seqlen
            rows = slice(b * seqlen + qs - t0, b * seqlen + qe - t0)
            qb = q[rows].transpose(0, 1)[None]  # 1 x hq x m x D
            kb, vb = (self._kv_heads(t) for t in kv.keys(b, 1, qe))  # 1 x hq x (P + qe) x D
            if mask is not None:
                m = self._windowed(mask[b : b + 1, :, qs:qe, : P + qe], P + qs, P + qe)
            else:  # query at position P+qs+i sees keys 0..P+qs+i (bottom-right causal), within the window
                m = self._band(P + qs, P + qe, q.device)
            o = self._sdpa(qb, kb, vb, attn_mask=m)
            attn[rows] = o[0].transpose(0, 1)
        if full:
            b0, nb = b_lo, b_hi - b_lo  # consecutive sequences
            rows = slice(b0 * seqlen - t0, (b0 + nb) * seqlen - t0)
            qb = q[rows].reshape(nb, seqlen, self.hq, D).transpose(1, 2)
            kr, vr = kv.keys(b0, nb, seqlen)  # nb x Hkv_local x (P + S) x D
            if mask is None and seqlen == 1 and (self.window is None or self.window > P):
                # a decode step sees every kept key: no mask, and the KV heads shared in place (no copy
                # of the whole cache per query head group)
                o = self._sdpa(qb, kr, vr, enable_gqa=self.n_rep > 1)
            else:
                kb, vb = self._kv_heads(kr), self._kv_heads(vr)  # nb x hq x (P + S) x D
                if mask is not None:
                    o = self._sdpa(qb, kb, vb, attn_mask=self._windowed(mask[b0 : b0 + nb], P, P + seqlen))
                elif P > 0 or (self.window is not None and self.window < seqlen):
                    o = self._sdpa(qb, kb, vb, attn_mask=self._band(P, P + seqlen, q.device))
                else:
                    o = self._sdpa(qb, kb, vb, is_causal=True)
            attn[rows] = o.transpose(1, 2).reshape(nb * seqlen, self.hq, D)
        a = attn.reshape(n, self.hq * D)
        if self.o_bias is not None:
            torch.addmm(self.o_bias, a, self.o_weight.t(), out=out)
        else:
            torch.mm(a, self.o_weight.t(), out=out)

    def _sdpa(self, q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        """F.scaled_dot_product_attention at the layer's scale; with a softcap (Gemma 2) or attention sinks
        (gpt-oss), the same in eager math (scores in fp32, float64 for float64), the cap applied before
        the mask, the sink as one more logit per row of the softmax."""
        if self.softcap is None and self.sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scaling,
                                                  enable_gqa=enable_gqa)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        if is_causal:  # (SDPA's top-left causal; only used with as many queries as keys)
            attn_mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(acc)
        if self.sinks is not None:  # one more logit per row, dropped after the softmax
            sink = self.sinks.to(acc).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
            return torch.matmul(torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1], v.to(acc)).to(q.dtype)
        return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)

    def _qk_norms(self, q: torch.Tensor, k: torch.Tensor):
        """The layer's per-head q/k RMSNorms, where it has them ((n, heads, D) each)."""
        return (self.q_norm(q) if self.q_norm is not None else q), (self.k_norm(k) if self.k_norm is not None else k)

    def _layer_mask(self, mask, P: int, S: int):
        """The caller's mask as this layer attends with it: (B, 1|Hq_local, S, P + S), or None."""
        if mask is None:
            return None
        if mask.shape[-1] > P + S:
            # a mask over more keys than this layer's cache keeps (layer 0's mask in a fused model, for a
            # sliding layer): the kept keys are the most recent, i.e. its last columns
            mask = mask[..., -(P + S):]
        if mask.dim() == 2:  # (B, P + S) key padding of a flash-attention-style model
            mask = self._padding_mask(mask, P, S)
        if mask.shape[1] not in (1, self.hq):  # a per-head mask: this rank's query heads
            if mask.shape[1] != self.hq * self.world_size:
                raise ValueError(f"attention_mask has {mask.shape[1]} heads; expected 1 or the model's "
                                 f"{self.hq * self.world_size} query heads")
            mask = mask[:, self.rank * self.hq : (self.rank + 1) * self.hq]
        if mask.shape[-1] != P + S:
            raise ValueError(
                f"attention_mask has {mask.shape[-1]} key columns; this layer attends to {P} cached + {S} new keys "
                f"(expected (B, 1|H, {S}, {P + S}))")
        return mask

    def _padding_mask(self, pad: torch.Tensor, P: int, S: int) -> torch.Tensor:
        """(B, P + S) 0/1 key padding -> (B, 1, S, P + S) bool: causal from position P, real keys only; a
        query with no real key in reach (a padded position) sees itself, so no row is empty (no NaN)."""
        if pad.shape[-1] != P + S:
            raise ValueError(f"attention_mask (2-D) has {pad.shape[-1]} columns; this layer attends to {P} cached + "
                             f"{S} new keys (expected (B, {P + S}))")
        keep = pad.bool()[:, None, None, :] & self._band(P, P + S, pad.device)[None, None]
        own = torch.arange(P + S, device=pad.device)[None, :] == (P + torch.arange(S, device=pad.device))[:, None]
        return keep | (~keep.any(-1, keepdim=True) & own)

    def _kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(nb, Hkv_local, m, D) -> (nb, Hq_local, m, D): GQA heads repeated to the query heads."""
        return t.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else t

    def mlp_into(self, y: torch.Tensor, out: torch.Tensor) -> None:
        """Row-parallel MLP partial of y (n x H) into `out` (n x H)."""
        if self.moe is not None:  # the HF block on sharded experts: this rank's partial sum of every expert
            o = self.moe(y[None])
            o = (o[0] if isinstance(o, tuple) else o).reshape(out.shape)  # (4.x blocks also return router logits)
            if self.res_mult != 1.0:
                o = o * self.res_mult
            out.copy_(o)
            return
        g, u = F.linear(y, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        a = self.act_fn(g) * u
        if self.down_bias is not None:
            torch.addmm(self.down_bias, a, self.down_weight.t(), out=out)
        else:
            torch.mm(a, self.down_weight.t(), out=out)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        position_embeddings = _pick_position_embeddings(self, position_embeddings, kwargs)
        return _hf_layer_forward([self], hidden_states, attention_mask, position_ids, past_key_values,
                                 position_embeddings, kwargs)


def _pick_position_embeddings(layer, position_embeddings, kwargs: dict):
    """Gemma 3 on transformers 4.x hands every layer both rotary tables (position_embeddings_global /
    _local, popped from kwargs here): the layer's own, by whether it slides."""
    if "position_embeddings_global" in kwargs:
        glob, loc = kwargs.pop("position_embeddings_global"), kwargs.pop("position_embeddings_local", None)
        if position_embeddings is None:
            position_embeddings = loc if layer.is_sliding else glob
    return position_embeddings


def split_min_tokens_default() -> int:
    return split_min_tokens()


class TokenWeaveDecoderStack(nn.Module):
    """Consecutive decoder layers (+ the model's final norm) with every MLP all-reduce fused into the
    next layer's input norm (TokenWeave's layer-boundary fusion), token-split across layers.

    forward(hidden_states (B, S, H), position_embeddings=(cos, sin), attention_mask=None) ->
    final_norm(layers(hidden_states)) (or layers(hidden_states) without a final norm).
    """

    def __init__(self, layers, final_norm: nn.Module | None = None, group=None, *, token_split: bool | None = None,
                 split_min_tokens: int | None = None, config: TokenWeaveConfig | None = None, device=None):
        super().__init__()
        wrapped = [
            l if isinstance(l, TokenWeaveDecoderLayer) else TokenWeaveDecoderLayer(
                l, group, token_split=token_split, split_min_tokens=split_min_tokens, config=config, device=device)
            for l in layers
        ]  # fmt: skip
        self.layers = nn.ModuleList(wrapped)
        self.final_norm_weight = _param(_norm_weight(final_norm)) if final_norm is not None else None
        self.final_norm_eps = _norm_eps(final_norm) if final_norm is not None else None
        if device is not None and self.final_norm_weight is not None:
            self.final_norm_weight.data = self.final_norm_weight.data.to(device)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                position_ids=None, **kwargs):
        first = self.layers[0]
        return run_tokenweave_layers(
            list(self.layers), hidden_states, position_embeddings, attention_mask,
            self.final_norm_weight, self.final_norm_eps,
            token_split=first.token_split, split_min_tokens=first.split_min_tokens,
            **_model_call(past_key_values, position_ids, kwargs),
        )  # fmt: skip


# transformers' padding-free names (FlashAttentionKwargs), handed to every layer by the model's forward
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_mask(mask, position_ids, flash_kwargs, B: int, S: int, cache, device):
    """The 4-D bool mask of packed sequences that a flash-attention-style model hands its layers only
    as position_ids restarting at 0 (mask None or 2-D) or as cu_seq_lens_q/k: causal inside each
    document (AND the 2-D padding); else the mask unchanged. The sdpa / eager masks (4-D) already
    hold the packing. Without a cache only, as transformers detects packing."""
    if flash_kwargs:
        cu_q, cu_k = flash_kwargs.get("cu_seq_lens_q"), flash_kwargs.get("cu_seq_lens_k")
        if cache is not None or B != 1 or cu_q is None or (cu_k is not None and not torch.equal(
                torch.as_tensor(cu_q).cpu(), torch.as_tensor(cu_k).cpu())):
            raise NotImplementedError(
                "TokenWeave layers take packed sequences (cu_seq_lens_q/k) for one flattened row (batch 1), q and k "
                "boundaries equal, without a KV cache")
        cu = torch.as_tensor(cu_q).to(device=device, dtype=torch.long)
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != S or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seq_lens_q must be 0, then strictly increasing document ends up to {S}, got {cu.tolist()}")
        doc = torch.bucketize(torch.arange(S, device=device), cu[1:-1], right=True)[None]  # (1, S)
    elif cache is not None or position_ids is None or S == 1 or (mask is not None and mask.dim() == 4):
        return mask
    else:
        pos = position_ids.to(device).expand(B, S)
        step = pos[:, 1:] - pos[:, :-1]
        new = step != 1
        if mask is not None:  # left padding: only a restart between two real tokens starts a document
            real = mask[:, -S:].bool()
            new = new & real[:, 1:] & real[:, :-1]
        if not bool(new.any()):
            return mask
        doc = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), new.long().cumsum(-1)], dim=1)  # (B, S)
    i = torch.arange(S, device=device)
    keep = (doc[:, :, None] == doc[:, None, :]) & (i[None, :, None] >= i[None, None, :])  # (B, S, S)
    if mask is not None:  # 2-D padding
        keep = keep & mask[:, None, -S:].bool()
        keep = keep | torch.eye(S, dtype=torch.bool, device=device)[None]  # padded queries: themselves (no NaN)
    return keep[:, None]


class _LayerKV:
    """The keys/values one layer's attention reads in one call: a KV cache's kept past (B, Hkv_local,
    P, D) in front of this call's own (k_store/v_store, (B*S, Hkv_local, D)).

    With a cache, this call's keys are appended with one `cache.update(k, v, layer_idx)` (HF's Cache
    API, transformers 4.53-5.x): right after the projections when one range holds the whole call
    (commit_early: attention then reads the tensors update returns), else after every half's
    attention (a split; the past is read first by appending nothing). Whatever the cache keeps is
    what is attended: a sliding-window layer's cache keeps its last window - 1 keys, and key j of
    the P kept precedes the call's first query by P - j positions either way."""

    def __init__(self, cache, layer_idx, k_store, v_store, batch, seqlen, commit_early=False):
        self.cache, self.layer_idx = cache, layer_idx
        self.k_store, self.v_store, self.batch, self.seqlen = k_store, v_store, batch, seqlen
        self.commit_early = cache is not None and commit_early
        self.past, self.pk, self.pv, self.full = 0, None, None, None
        self._mask = None  # (the caller's mask, as this layer attends with it): prepared once per layer call
        if cache is not None and (held := _held_keys(cache, layer_idx)) is not None:
            self._check(held, 0)  # before any update: a mismatched cache is refused unchanged
        if cache is not None and not commit_early:
            k, v = self._new()
            self.pk, self.pv = cache.update(k[:, :, :0], v[:, :, :0], layer_idx)
            self._check(self.pk, 0)
            self.past = self.pk.shape[-2]

    def _new(self):
        """This call's keys and values as (B, Hkv_local, S, D) views of k_store/v_store."""
        B, S = self.batch, self.seqlen
        return tuple(t.view(B, S, *t.shape[1:]).transpose(1, 2) for t in (self.k_store, self.v_store))

    def _check(self, k: torch.Tensor, new: int) -> None:
        B, hkv, D = self.batch, self.k_store.shape[1], self.k_store.shape[2]
        if k.dim() != 4 or k.shape[0] != B or k.shape[1] != hkv or k.shape[3] != D or k.shape[2] < new:
            raise ValueError(
                f"the KV cache of layer {self.layer_idx} holds keys of shape {tuple(k.shape)}; this tensor-parallel "
                f"rank needs (batch {B}, {hkv} local KV heads, >= {new} positions, head_dim {D}) -- a cache filled "
                "by the unsharded model or at another tensor-parallel size cannot be reused")

    def commit(self) -> None:
        """Append this call's keys/values to the cache (once per layer and call)."""
        k, v = self.cache.update(*self._new(), self.layer_idx)
        S = self.seqlen
        self._check(k, S)
        if self.commit_early:  # attend to what the cache returns: its kept past, then this call's keys
            self.past, self.full = k.shape[-2] - S, (k, v)
        elif k.shape[-2] != self.past + S:
            raise RuntimeError(
                f"the KV cache of layer {self.layer_idx} returned {k.shape[-2]} positions after appending {S} to the "
                f"{self.past} it returned before; TokenWeaveDecoderLayer needs a cache that keeps a suffix of the "
                "keys (DynamicCache)")

    def layer_mask(self, layer, mask):
        """layer._layer_mask(mask) for this call's kept past, once for all of the call's token ranges."""
        if self._mask is None or self._mask[0] is not mask:
            self._mask = (mask, layer._layer_mask(mask, self.past, self.seqlen))
        return self._mask[1]

    def keys(self, b0: int, nb: int, qe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nb, Hkv_local, P + qe, D) keys and values of sequences [b0, b0 + nb): the kept past, then
        this call's first qe positions."""
        end = self.past + qe
        if self.full is not None:
            return tuple(t[b0 : b0 + nb, :, :end] for t in self.full)
        S = self.seqlen
        cur = tuple(t[b0 * S : (b0 + nb) * S].view(nb, S, *t.shape[1:])[:, :qe].transpose(1, 2)
                    for t in (self.k_store, self.v_store))  # fmt: skip
        if self.past == 0:
            return cur
        return tuple(torch.cat([p[b0 : b0 + nb], c], dim=2) for p, c in zip((self.pk, self.pv), cur))


def _held_keys(cache, layer_idx: int):
    """The keys a HF cache already holds for layer_idx ((B, Hkv, P, D)), or None when it holds none
    yet (or keeps them where this does not look: then update's own checks apply)."""
    layers = getattr(cache, "layers", None)  # transformers >= 4.56: one CacheLayer per layer
    if isinstance(layers, (list, tuple)):
        if layer_idx < len(layers) and getattr(layers[layer_idx], "is_initialized", True):
            k = getattr(layers[layer_idx], "keys", None)
            return k if torch.is_tensor(k) and k.dim() == 4 else None
        return None
    kc = getattr(cache, "key_cache", None)  # 4.x DynamicCache
    if isinstance(kc, list) and layer_idx < len(kc) and torch.is_tensor(kc[layer_idx]) and kc[layer_idx].dim() == 4:
        return kc[layer_idx]
    return None


def _model_call(past_key_values, position_ids, kwargs) -> dict:
    """run_tokenweave_layers' keywords from what a HF model's loop passes a layer: the Cache it appends
    to (transformers 5: past_key_values; 4.x: past_key_value; use_cache without a cache object caches
    nothing, as in the HF layers), position_ids, and the padding-free FlashAttentionKwargs."""
    return dict(past_key_values=past_key_values if past_key_values is not None else kwargs.get("past_key_value"),
                position_ids=position_ids,
                flash_kwargs={k: kwargs[k] for k in _FLASH_KWARGS if kwargs.get(k) is not None})


def _hf_layer_forward(layers, hidden_states, attention_mask, position_ids, past_key_values, position_embeddings,
                      kwargs):
    """`layers` called from a HF model's own loop, answering like its decoder layer (a tuple on
    transformers 4.x): the TokenWeave schedule without a final norm (the model applies its own)."""
    first = layers[0]
    out = run_tokenweave_layers(
        layers, hidden_states, position_embeddings, attention_mask, None, None,
        token_split=first.token_split, split_min_tokens=first.split_min_tokens,
        **_model_call(past_key_values, position_ids, kwargs),
    )  # fmt: skip
    return (out,) if first.returns_tuple else out


class _FusedDecoderLayers(nn.Module):
    """All of a HF model's TokenWeave layers as the one entry of its layer list (apply_tokenweave's
    fuse_layers): the model's loop calls it once with layer 0's arguments; it runs the layers as
    TokenWeaveDecoderStack does (without the final norm: the model applies its own) and answers
    like a HF layer (a tuple on transformers 4.x)."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        first = layers[0]
        if hasattr(first, "attention_type"):  # 4.x Qwen2 picks the mask by it: layer 0's
            self.attention_type = first.attention_type

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        # (one table for all: apply_tokenweave refused layers whose rotary tables differ)
        position_embeddings = _pick_position_embeddings(self.layers[0], position_embeddings, kwargs)
        return _hf_layer_forward(list(self.layers), hidden_states, attention_mask, position_ids, past_key_values,
                                 position_embeddings, kwargs)


class _Half:
    """A token range [t0, t1) moving through the layers: its normed input y, its residual (full
    rows or this rank's token shard of the range), the event its last fused op finished on."""

    def __init__(self, t0, t1, slot, y, residual):
        self.t0, self.t1, self.slot = t0, t1, slot
        self.y, self.residual, self.sharded, self.done = y, residual, False, None

    @property
    def n(self):
        return self.t1 - self.t0


# Eager under torch.compile (a graph break around the layers): the overlap schedule is side
# streams, events and views of symmetric-memory buffers written with out= GEMMs, which must run
# in exactly the order written; the model code around the layers still compiles.
@torch.compiler.disable(reason="ringattn TokenWeave layers: the token-split overlap schedule (side streams, "
                               "events, symmetric-memory buffers) runs eagerly, in the order written")
def run_tokenweave_layers(layers, hidden_states, position_embeddings, attention_mask, final_weight, final_eps, *,
                          token_split=True, split_min_tokens=1024, past_key_values=None, position_ids=None,
                          flash_kwargs=None):
    """The TokenWeave schedule over `layers` (see the module docstring). Returns the last layer's
    output hidden states, or final_norm(them) when final_weight is given. past_key_values: a HF
    Cache this call's keys/values are appended to (each layer at its layer_idx) and attended after
    what it already holds (prefill, chunked prefill, decode)."""
    cache = past_key_values
    if cache is not None:
        if not hasattr(cache, "update"):
            raise TypeError(f"past_key_values must be a Hugging Face Cache (DynamicCache), got {type(cache).__name__}")
        if getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                f"TokenWeaveDecoderLayer: {type(cache).__name__} is a fixed-size (static) cache, whose update returns "
                "unfilled slots; use DynamicCache (generate's default) or cache_implementation='dynamic'")
        if missing := [i for i, l in enumerate(layers) if l.layer_idx is None]:
            raise ValueError(f"layers {missing} have no layer_idx (their HF self_attn.layer_idx), needed to use a KV cache")
    for l in layers:
        if l.training and (drops := {n: p for n, p in l.dropouts.items() if p}):
            raise ValueError(
                f"TokenWeaveDecoderLayer (layer {l.layer_idx}): the HF layer's config has dropout {drops} and the layer "
                "is in training mode; the TokenWeave layers apply no dropout, so set those to 0.0 (or call .eval())")
    if position_embeddings is None and any(l.use_rope for l in layers):
        raise ValueError("position_embeddings=(cos, sin) are required (as HF Llama models pass them to their layers)")
    if problem := _rope_types_problem(layers):
        raise ValueError(problem)
    if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.dim() not in (2, 4)):
        raise NotImplementedError("attention_mask must be None, a 2-D (B, cached + S) padding mask (flash-attention "
                                  "models) or a 4-D (B, 1|H, S, cached + S) tensor mask")
    first = layers[0]
    B, S, H = hidden_states.shape
    attention_mask = _packed_mask(attention_mask, position_ids, flash_kwargs or {}, B, S, cache, hidden_states.device)
    if H != first.hidden:
        raise ValueError(f"hidden_states must be (B, S, {first.hidden}), got {tuple(hidden_states.shape)}")
    N, dtype, device = B * S, hidden_states.dtype, hidden_states.device
    h = hidden_states.reshape(N, H).contiguous()
    pos = None
    if any(l.query_pos_scale is not None for l in layers):
        if position_ids is None:
            raise ValueError(f"position_ids are required: {type(layers[0]).__name__}s of this model_type scale their "
                             "queries by position (as the HF model passes them to its layers)")
        pos = torch.as_tensor(position_ids, device=hidden_states.device).expand(B, S).reshape(N)
    cos = sin = None  # (NoPE layers only: none given, none needed)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos = cos.expand(B, S, cos.shape[-1]).reshape(N, -1)
        sin = sin.expand(B, S, sin.shape[-1]).reshape(N, -1)
    handle = first.handle(device)
    if handle.config.check_inputs and first.world_size > 1:
        _check_replicated(hidden_states, first.group)
    with torch.no_grad():
        ranges = split_ranges(N, token_split, split_min_tokens, first.gemm_cols, num_sms(device))
        side = SideStream(device) if len(ranges) > 1 else None
        halves = [_Half(t0, t1, s, _rmsnorm(h[t0:t1], first.input_norm_weight, first.input_norm_eps), h[t0:t1])
                  for s, (t0, t1) in enumerate(ranges)]  # fmt: skip

        def reduce_norm_add(half: _Half, partial, weight, eps, shard_out: bool, out_norm):
            if out_norm is None:  # the fused op: y = norm(all_reduce(partial) + residual)
                kw = dict(shard_residual_in=half.sharded, shard_residual_out=shard_out, slot=half.slot, copy_out=False)
                return handle(partial, half.residual, weight, eps, **kw)
            # sandwich norms: z = out_norm(all_reduce(partial)) (the fused op on a zero residual), then
            # residual += z and y = norm(residual) locally (the residual stays full: shard_out is False)
            z, _ = handle(partial, torch.zeros_like(half.residual), out_norm[0], out_norm[1], slot=half.slot,
                          copy_out=False)
            return _add_rmsnorm(z, half.residual, weight, eps)

        def fused(half: _Half, partial, weight, eps, shard_out: bool, out_norm=None):
            """half.(y, residual) <- fused(partial + residual, weight), on the side stream if split.
            out_norm: (weight, eps) of a sandwich norm applied to the all-reduced partial first."""
            if side is None:
                half.y, half.residual = reduce_norm_add(half, partial, weight, eps, shard_out, out_norm)
            else:
                side.launch()  # the side stream waits for the partial (an event, not the whole stream)
                with side.run():
                    half.y, half.residual = reduce_norm_add(half, partial, weight, eps, shard_out, out_norm)
                    half.done = side.done()
                side.hand_to_main(half.residual, half.y if out_norm is not None else None)
            half.sharded = shard_out

        def shard_between(half: _Half, *ls) -> bool:
            # keep the residual token-sharded when the call runs two-shot / rs_ag (agreed values only);
            # never around sandwich-norm layers (their residual add is local, on full rows)
            return (all(l.attn_out_norm is None for l in ls)
                    and handle.path_for(half.n, H, dtype) in ("symm_twoshot", "multimem", "rs_ag"))

        hkv, D = first.hkv, first.head_dim
        for li, layer in enumerate(layers):
            last = li == len(layers) - 1
            k_store = torch.empty(N, hkv, D, dtype=dtype, device=device)
            v_store = torch.empty(N, hkv, D, dtype=dtype, device=device)
            kv = _LayerKV(cache, layer.layer_idx, k_store, v_store, B, S, commit_early=len(halves) == 1)
            for half in halves:
                if side is not None:
                    side.join(half.done)
                buf = handle.input_buffer(half.n, H, dtype, slot=half.slot)
                layer.attention_into(half.y, half.t0, half.t1, cos, sin, attention_mask, B, S, k_store, v_store, buf, kv,
                                     pos)
                fused(half, buf, layer.post_norm_weight, layer.post_norm_eps, shard_between(half, layer), layer.attn_out_norm)
            if cache is not None and not kv.commit_early:  # a split: every half's keys are in k_store now
                kv.commit()
            for half in halves:
                if side is not None:
                    side.join(half.done)
                buf = handle.input_buffer(half.n, H, dtype, slot=half.slot)
                layer.mlp_into(half.y, buf)
                if not last:
                    nxt = layers[li + 1]
                    fused(half, buf, nxt.input_norm_weight, nxt.input_norm_eps, shard_between(half, layer, nxt),
                          layer.mlp_out_norm)
                elif final_weight is not None:
                    fused(half, buf, final_weight, final_eps, False, layer.mlp_out_norm)
                else:  # a lone layer: only the new residual (full) is wanted; y is a by-product
                    fused(half, buf, layer.post_norm_weight, layer.post_norm_eps, False, layer.mlp_out_norm)
        out = torch.empty(N, H, dtype=dtype, device=device)
        for half in halves:
            if side is not None:
                side.join(half.done)
            out[half.t0 : half.t1] = half.y if final_weight is not None else half.residual
    out = out.view(B, S, H)
    if torch.is_grad_enabled() and hidden_states.requires_grad:  # in a graph: a backward through it must fail loudly
        out = _NoBackward.apply(hidden_states, out)
    return out


def _rope_types_problem(layers) -> str | None:
    """Layers run in one call share its rotary tables: refused where a family's layer types take different ones."""
    rope_types = {l.rope_key for l in layers if l.use_rope}
    if len(rope_types) > 1:
        return (f"TokenWeave layers of rotary tables {sorted(rope_types, key=str)} in one call: their tables differ "
                "(Gemma 3's sliding and full layers, Granite SWA's per-layer RoPE bases) and one call takes one; run "
                "them one layer per call (apply_tokenweave(fuse_layers=False))")
    return None


def _check_replicated(hidden_states: torch.Tensor, group) -> None:
    """ValueError on every rank when the ranks' input hidden states differ (TokenWeaveConfig.check_inputs)."""
    from ringattn.comm import control_group

    pg, dev = control_group(group, hidden_states.device)
    h = hidden_states.detach().double()
    local = torch.stack([h.sum(), h.square().sum(), h.new_tensor(float(h.numel()))]).to(dev)
    got = [torch.empty_like(local) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(got, local, group=pg)
    rows = torch.stack(got).cpu()
    bad = [r for r in range(rows.shape[0]) if not torch.equal(rows[r], rows[0])]
    if bad:
        raise ValueError(
            f"TokenWeave layers: the input hidden states of rank(s) {bad} differ from rank 0's (sum, sum of squares, "
            f"numel: {rows.tolist()}); tensor-parallel ranks must run the same tokens (when sampling, seed every "
            "rank alike or sample on one rank and broadcast)")


class _NoBackward(torch.autograd.Function):
    """The layers' output joined to the autograd graph of their input, so that a backward through
    them raises instead of silently giving the layers below (and their inputs) no gradient."""

    @staticmethod
    def forward(ctx, hidden_states, out):
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "TokenWeave layers are inference-only (prefill/decode): they have no backward. Train with the "
            "unsharded layers (or ringattn's sequence parallelism); run TokenWeave under torch.no_grad() / "
            "torch.inference_mode() to keep autograd from recording it")


def apply_tokenweave(model: nn.Module, group=None, *, fuse_layers: bool = False, token_split: bool | None = None,
                     split_min_tokens: int | None = None, config: TokenWeaveConfig | None = None) -> nn.Module:
    """Swap every decoder layer of a Hugging Face Llama-style model (a *ForCausalLM or the bare
    model) for a TokenWeaveDecoderLayer tensor-parallel over `group` (default: the world). Every
    rank of the group calls it on the same model (same weights); each keeps its 1/W shard of the
    layers' weights and the originals are dropped. Embeddings, the final norm and lm_head stay
    replicated. Returns the same model, modified in place; its forward and generate() run as
    before (KV cache included). Nothing is changed when a layer is refused (every layer is wrapped
    before any is swapped). Inference only. Not combinable with apply_sequence_parallel.

    fuse_layers=True: the model's layer list becomes ONE module that runs all layers as
    TokenWeaveDecoderStack does -- each MLP all-reduce fused with the next layer's input norm, the
    residual token-sharded between layers, the token halves overlapping across layer boundaries --
    so only the last layer gathers a full residual for the model's final norm (per layer one
    all-gather of the residual less than the per-layer swap). The model's loop then sees one
    layer: its masks are layer 0's (each sliding-window layer ANDs its own window in), so layer 0
    must be a full-attention layer or every layer have the same window; per-layer hidden states
    are not recorded (output_hidden_states raises)."""
    if getattr(model, "ringattn_plan", None) is not None:
        raise ValueError("apply_tokenweave: this model runs ringattn sequence parallelism (apply_sequence_parallel); "
                         "tensor-parallel TokenWeave layers are not combined with it")
    base = getattr(model, "base_model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList) and isinstance(getattr(model, "model", None), nn.Module):
        base = model.model  # (Gemma 3's causal LM on transformers 4.x names a base model prefix it does not have)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"apply_tokenweave: {type(model).__name__} has no decoder layers at base_model.layers")
    group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    present = list(layers[0].layers) if isinstance(layers[0], _FusedDecoderLayers) else list(layers)
    done = [isinstance(l, TokenWeaveDecoderLayer) for l in present]
    if all(done) and all(l.group is group for l in present) and isinstance(layers[0], _FusedDecoderLayers) == fuse_layers:
        return model  # applied before, with this group and mode
    if any(done):
        raise ValueError("apply_tokenweave: the model's layers are already (partly) TokenWeave layers of another group "
                         "or fuse_layers mode")
    wrapped = [TokenWeaveDecoderLayer(l, group, token_split=token_split, split_min_tokens=split_min_tokens, config=config)
               for l in layers]  # fmt: skip
    if fuse_layers:
        windows = [w.window for w in wrapped]
        if windows[0] is not None and len(set(windows)) > 1:
            raise ValueError(
                f"apply_tokenweave(fuse_layers=True): the fused layers get layer 0's mask, a sliding-window one "
                f"(window {windows[0]}), while other layers' windows are {sorted(set(windows), key=str)}; use "
                "fuse_layers=False")
        if problem := _rope_types_problem(wrapped):
            raise ValueError(f"apply_tokenweave(fuse_layers=True): {problem}")
        base.layers = nn.ModuleList([_FusedDecoderLayers(wrapped)])
    else:
        for i, w in enumerate(wrapped):
            layers[i] = w
    model.tokenweave_group = group
    model.register_forward_pre_hook(_refuse_attention_outputs, with_kwargs=True)
    model.register_forward_hook(_check_hidden_state_outputs, with_kwargs=True)
    return model


def _wants(module, kwargs, name: str) -> bool:
    v = kwargs.get(name)
    return bool(getattr(getattr(module, "config", None), name, False) if v is None else v)


def _refuse_attention_outputs(module, args, kwargs):
    if _wants(module, kwargs, "output_attentions"):
        raise NotImplementedError("output_attentions: TokenWeave layers compute no attention weights (SDPA); "
                                  "call without output_attentions")


def _check_hidden_state_outputs(module, args, kwargs, output):
    """output_hidden_states: the model's own loop records them on transformers 4.x; versions that record
    by hooks on their decoder-layer class find none on TokenWeave layers -- raised, not returned short."""
    hs = getattr(output, "hidden_states", None)
    n = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if _wants(module, kwargs, "output_hidden_states") and (hs is None or (n is not None and len(hs) != n + 1)):
        raise NotImplementedError(
            f"output_hidden_states: this transformers version recorded {0 if hs is None else len(hs)} hidden states "
            f"through TokenWeave layers (expected {n} + 1: it records them by hooks on its own decoder-layer class)")
