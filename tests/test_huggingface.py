"""Hugging Face integration: Llama / Mistral / Qwen2 tiny random models (built here, no downloads)
wrapped by apply_sequence_parallel on W real gloo ranks give the single-process model's logits
(per shard), loss and parameter gradients (summed over ranks). Refusals: one test each."""
import copy

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import ringattn.integrations.huggingface as rhf  # noqa: E402

# fp32 everywhere. The ring merges partial softmaxes in fp32 in another order than one softmax
# over the row, and rank-summed gradients add W partial sums in another order, so results differ
# from the single-process fp32 model by rounding only. Measured (W = 2, 3, both algorithms and
# layouts): logits 2.4e-7, loss 9.5e-7, gradients 1.3e-6 of each tensor's largest entry; the
# bounds are ~10x that. Logits and loss absolute (O(1) and O(5) values), gradients relative to
# each tensor's largest entry.
TOL = {"logits": 2e-6, "loss": 1e-5, "grad": 2e-5}
# Per-family overrides. Gemma 3's sandwich norms (an RMSNorm right after attention) rescale the
# attention output, so the fp32 rounding of ringattn's merges reaches its logits ~10x larger than
# in the other families (max |ref logits| 1.28 there): measured 2.03e-6 at W=3 (transformers
# 4.53.3, 2026-12-07, AMD EPYC VM; 1.6e-6 with ring) against <= 4.8e-7 for every other family --
# and 1.1e-6 with the whole model in float64, since the merge accumulators are fp32 either way.
# MiniCPM3's tiny model has logits ~45x larger than Llama's (max |ref logits| 26.8 vs 0.61: its
# embedding / depth scales), so the same relative rounding is 3.8e-6 absolute (W=2, 2026-12-07).
FAMILY_TOL = {"gemma3_text": {"logits": 1e-5}, "minicpm3": {"logits": 1e-5}}
FAMILIES = ("llama", "mistral", "qwen2")
# Uneven global lengths on purpose: chunks differ by one token.
SEQ = {1: 20, 2: 23, 3: 29}


# Every family apply_sequence_parallel accepts: (config class, what its tiny config needs besides
# the common sizes: no sliding window, head_dim where the class defaults to a big one, a pad id
# inside the 96-token vocabulary, a few experts for the MoE ones).
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", {}), "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(head_dim=16)), "phi3": ("Phi3Config", dict(pad_token_id=0, sliding_window=None)),
    "olmo": ("OlmoConfig", {}), "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      logits_scaling=2.0)),
    "cohere": ("CohereConfig", {}), "starcoder2": ("Starcoder2Config", dict(sliding_window=None)),
    "glm": ("GlmConfig", dict(head_dim=16, pad_token_id=0)), "helium": ("HeliumConfig", dict(head_dim=16)),
    "smollm3": ("SmolLM3Config", dict(pad_token_id=0)),
    # (sliding layers by default; a window longer than any test sequence, the windowed tests set 5)
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, pad_token_id=0,
                                             sliding_window=4096)),
    # attention sinks (s_aux) in every layer, alternating sliding/full layers, MoE, YaRN RoPE
    # (transformers >= 4.55: skipped on older versions)
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                     sliding_window=4096, rope_parameters=dict(
                                         rope_type="yarn", factor=8.0, original_max_position_embeddings=32,
                                         rope_theta=150000.0, beta_fast=32.0, beta_slow=1.0, truncate=False))),
    # MLA (multi-head latent attention): q/k head dim 24 (16 nope + 8 RoPE), v head dim 16 -- v's
    # head dim differs (ringattn.head_dims); LoRA'd queries (v3) or not (v2), MoE after layer 0
    "deepseek_v2": ("DeepseekV2Config", dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16, head_dim=8, n_routed_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                             first_k_dense_replace=1, num_key_value_heads=4, pad_token_id=0)),
    "deepseek_v3": ("DeepseekV3Config", dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                             v_head_dim=16, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                             n_group=2, topk_group=1, moe_intermediate_size=32, n_shared_experts=1,
                                             first_k_dense_replace=1, num_key_value_heads=4, pad_token_id=0)),
    # Llama 4 (text): chunked-attention layers (chunks of 5 tokens, so chunks span ranks) and a
    # NoPE full-attention layer with attention-temperature tuning (floor_scale 4: the scale
    # changes every 4 positions), L2 q/k norms, MoE every other layer
    "llama4_text": ("Llama4TextConfig", dict(num_hidden_layers=4, head_dim=16, intermediate_size_mlp=128,
                                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                             layer_types=["chunked_attention"] * 3 + ["full_attention"],
                                             no_rope_layers=[1, 1, 1, 0], attention_chunk_size=5, floor_scale=4,
                                             attn_scale=0.5, attn_temperature_tuning=True, pad_token_id=0)),
    # -- added 2026-12-07: the same checks on the model's own code around the attention call --
    "apertus": ("ApertusConfig", {}), "arcee": ("ArceeConfig", dict(head_dim=16)),
    "dots1": ("Dots1Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1)),
    "ernie4_5": ("Ernie4_5Config", dict(head_dim=16)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "glm4": ("Glm4Config", dict(head_dim=16, pad_token_id=0)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       n_shared_experts=1, first_k_dense_replace=1)),
    # MLA (v's head dim 16, q/k 24) with MoE
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, head_dim=8, n_routed_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, attention_multiplier=0.3,
                                            embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                                        shared_intermediate_size=32, attention_multiplier=0.3)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(head_dim=16)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_topk=2)),
    # mixture of attention heads (query / output projections are experts)
    "jetmoe": ("JetMoeConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "minimax_m2": ("MiniMaxM2Config", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "nemotron": ("NemotronConfig", dict(head_dim=16)),  # partial rotary
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "phi": ("PhiConfig", {}),  # partial rotary, parallel attention + MLP
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                                    input_jitter_noise=0.0, sliding_window=None)),
    "stablelm": ("StableLmConfig", dict(qk_layernorm=True)),
    "flex_olmo": ("FlexOlmoConfig", dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0)),
    "nanochat": ("NanoChatConfig", {}), "jais2": ("Jais2Config", dict(head_dim=16)),
    "mellum": ("MellumConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "solar_open": ("SolarOpenConfig", dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, n_shared_experts=1)),
    # YaRN and Llama-4-style query scaling by position (original 4 positions: the scale changes
    # within the test sequences, so local positions would be caught)
    "ministral3": ("Ministral3Config", dict(head_dim=16, pad_token_id=0, rope_parameters=dict(
        rope_type="yarn", rope_theta=1000000.0, factor=16.0, original_max_position_embeddings=4, beta_fast=32.0,
        beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.5))),
    "hyperclovax": ("HyperCLOVAXConfig", dict(head_dim=16)),
    "minicpm3": ("MiniCPM3Config", dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32)),
    "seed_oss": ("SeedOssConfig", dict(head_dim=16, attention_dropout=0.0, residual_dropout=0.0)),
    # multi-head attention without num_key_value_heads in the config (fused qkv projection)
    "gpt_neox": ("GPTNeoXConfig", dict(num_key_value_heads=None)),
    "persimmon": ("PersimmonConfig", dict(num_key_value_heads=None, qk_layernorm=True)),
    # sliding-window families (windows longer than the sequence here; test_hf_sliding_window.py
    # runs them at 5)
    "cohere2": ("Cohere2Config", dict(head_dim=16, pad_token_id=0, sliding_window=4096)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(head_dim=16, pad_token_id=0, num_experts=4, num_experts_per_tok=2,
                                             sliding_window=4096)),
    "olmo3": ("Olmo3Config", dict(sliding_window=4096)), "exaone4": ("Exaone4Config", dict(sliding_window=4096)),
    "exaone_moe": ("ExaoneMoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           num_shared_experts=1, first_k_dense_replace=1, sliding_window=4096)),
    "ministral": ("MinistralConfig", dict(head_dim=16, sliding_window=4096)),
    "cwm": ("CwmConfig", dict(head_dim=16, sliding_window=4096)),
    "afmoe": ("AfmoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  num_shared_experts=1, sliding_window=4096)),
    "laguna": ("LagunaConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=32, sliding_window=4096)),
    # attention sinks (a sigmoid(lse - sink) output scale) and sliding layers
    "granite_swa": ("GraniteSWAConfig", dict(sliding_window=4096)),
    # attention-logit softcapping (cap 5, with q/k projections x10 in tiny_model so the scores
    # reach it and the tanh bends them -- test_softcap_matters), alternating sliding / full layers,
    # final-logit softcapping
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, pad_token_id=0, sliding_window=4096,
                                    attn_logit_softcapping=5.0)),
    "vaultgemma": ("VaultGemmaConfig", dict(head_dim=16, query_pre_attn_scalar=16, pad_token_id=0,
                                            sliding_window=4096, attn_logit_softcapping=5.0)),
}


# Families ringattn runs from a later transformers than MIN_TRANSFORMERS on (refused before it).
FAMILY_MIN_MAJOR = {**rhf.MIN_TRANSFORMERS_MAJOR, "llama4_text": 5}


def family_available(family: str) -> bool:
    """Whether the installed transformers has this family's config class (and ringattn runs it there)."""
    return (hasattr(transformers, FAMILY_CONFIGS[family][0])
            and rhf._transformers_major() >= FAMILY_MIN_MAJOR.get(family, 0))


needs_llama4 = pytest.mark.skipif(not family_available("llama4_text"),
                                  reason="Llama 4 runs under ringattn from transformers 5 on")


def tiny_config(family: str, **overrides):
    """hidden 64, 2 layers, 4 query heads, 2 key/value heads (GQA), RoPE."""
    cls, extra = FAMILY_CONFIGS[family]
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              attn_implementation="eager")
    kw.update(extra)  # (a family's own sizes win: MLA has as many KV heads as query heads)
    kw.update(overrides)
    return getattr(transformers, cls)(**kw)


def weights_that_matter(model, family: str, seed: int = 1):
    """Re-draw a tiny model's weights so every part shows in the output (the TokenWeave tests): norms
    away from 1 (Gemma's 1 + w must show), matrices ~ 1/sqrt(fan-in), vectors ~ N(0, 1/25); attention
    sinks ~ N(0, 4) (gpt-oss, Granite SWA: initialised near 0); Gemma 2's q/k x10 (scores of O(10),
    which its attention-logit cap bends)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name and p.dim() == 1
                    else torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 5))
            if name.endswith(".sinks"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            if family in rhf.SOFTCAP_MODEL_TYPES and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    return g


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)  # same weights on every rank
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):  # initialised near 0: made large enough to matter, seeded
                p.normal_(0.0, 2.0)
            if family in rhf.SOFTCAP_MODEL_TYPES and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)  # scores of O(10): the attention-logit cap (5) bends them
    return model


def global_batch(seq_len: int, batch: int = 2, vocab: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    labels = input_ids.clone()
    labels[:, :2] = -100  # ignored positions (e.g. a prompt) must not count in the mean
    labels[0, seq_len // 2] = -100
    return input_ids, labels


def reference(model, input_ids, labels):
    """The single-process model on the full sequence: logits, loss, gradients."""
    ref = copy.deepcopy(model)
    out = ref(input_ids=input_ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: _grad(p) for n, p in ref.named_parameters()}


def _grad(p):
    """p's gradient, zeros where backward left none (a MoE expert no token chose, a parameter
    outside the loss's graph such as a router's score bias): the same in both runs."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def sp_step(model, input_ids, labels):
    """One sequence-parallel forward/backward on this rank; gradients summed over ranks."""
    batch = rhf.shard_batch(model, input_ids, labels)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = rhf.sequence_parallel_loss(logits, batch["labels"])
    loss.backward()
    return logits.detach(), loss.detach(), summed_grads(model)


def summed_grads(model) -> dict:
    """Every parameter's gradient summed over the ranks (each rank's covers its own tokens)."""
    grads = {}
    for n, p in model.named_parameters():
        g = _grad(p).clone()  # (every rank reduces every parameter, with or without a gradient)
        dist.all_reduce(g)
        grads[n] = g
    return grads


def compare(plan, ref, got) -> dict:
    ref_logits, ref_loss, ref_grads = ref
    logits, loss, grads = got
    err = {
        "logits": (logits - plan.shard(ref_logits, dim=1)).abs().max().item(),
        "loss": abs(loss.item() - ref_loss.item()),
        "grad": max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                    for n, g in ref_grads.items()),
    }
    missing = set(ref_grads) ^ set(grads)
    assert not missing, f"parameters without a compared gradient: {missing}"
    return err


def _check_family(family, algorithms, layouts, seq_len, **apply_kw):
    """Worker: every (algorithm, layout) on this rank; returns {(alg, layout): errors}."""
    out = {}
    input_ids, labels = global_batch(seq_len)
    for algorithm in algorithms:
        for layout in layouts:
            model = tiny_model(family)
            ref = reference(model, input_ids, labels)
            rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout, **apply_kw)
            out[(algorithm, layout)] = compare(model.ringattn_plan, ref, sp_step(model, input_ids, labels))
    return out


def assert_close(results, tol=TOL):
    bad = []
    for rank, per_case in enumerate(results):
        for case, err in per_case.items():
            family = case[0] if isinstance(case, tuple) and case else None
            t = dict(tol, **FAMILY_TOL.get(family, {}))
            for key, e in err.items():
                if not e <= t[key]:
                    bad.append(f"rank {rank} {case} {key}: {e:.3e} > {t[key]:.0e}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_single_process(dist_pool, family, world):
    results = dist_pool(world).run(_check_family, family, ("ring", "token_ring"), ("contiguous", "zigzag"),
                                   SEQ[world], timeout=180)
    assert_close(results)


def _check_ulysses(seq_len):
    """algorithm="ulysses" (1-D, ringattn's own all-to-all): heads the group splits match the
    single-process model; heads it cannot split are refused when wrapping, on every rank."""
    world = dist.get_world_size()
    if world == 3:  # the tiny models have 4 query heads
        try:
            rhf.apply_sequence_parallel(tiny_model("llama"), algorithm="ulysses")
        except ValueError as e:
            return {"refused": str(e)}
        return {"refused": None}
    out = {}
    for family, layouts in (("llama", ("contiguous", "zigzag")), ("qwen2", ("zigzag",))):
        for (alg, layout), err in _check_family(family, ("ulysses",), layouts, seq_len).items():
            out[(family, alg, layout)] = err
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ulysses_matches_single_process(dist_pool, world):
    results = dist_pool(world).run(_check_ulysses, SEQ[world], timeout=180)
    if world == 3:
        for r in results:
            assert r["refused"] and "heads_q=4 must be a multiple of the group size 3" in r["refused"], r
        return
    assert all(len(r) == 3 for r in results), results
    assert_close(results)


# Every other supported family, once per algorithm (different norms, q/k norms, NoPE layers,
# MoE MLPs, attention/embedding/logit multipliers, parallel blocks: the model's own code around
# the same attention call).
MORE_FAMILIES = tuple(f for f in rhf.SUPPORTED_MODEL_TYPES if f not in FAMILIES and family_available(f))


def _check_more_families(seq_len):
    out = {}
    input_ids, labels = global_batch(seq_len)
    for family in MORE_FAMILIES:
        for algorithm, layout in (("ring", "zigzag"), ("token_ring", "contiguous")):
            model = tiny_model(family)
            assert model.config.model_type == family
            ref = reference(model, input_ids, labels)
            rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout)
            out[(family, algorithm, layout)] = compare(model.ringattn_plan, ref, sp_step(model, input_ids, labels))
    return out


def test_every_supported_family_has_a_config():
    assert set(FAMILY_CONFIGS) == set(rhf.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("world", [2, 3])
def test_more_families_match_single_process(dist_pool, world):
    assert_close(dist_pool(world).run(_check_more_families, SEQ[world], timeout=240))


# ---------------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens): the wrapped model on a packed batch == the single-process model
# run on every document on its own (positions restart, no attention or prediction across borders).
# ---------------------------------------------------------------------------------------------
PACKED = {1: [0, 7, 8, 20], 2: [0, 1, 9, 17, 23], 3: [0, 12, 13, 27, 29],
          # W = 4 (the 2-D tests, 29 tokens): borders inside a Ulysses piece (5), a one-token
          # document (12-13) and one inside the last zigzag chunk (24)
          4: [0, 5, 12, 13, 24, 29]}


def packed_reference(model, input_ids, labels, docs):
    ref = copy.deepcopy(model)
    logits, total, count = [], 0.0, 0
    for s, e in zip(docs[:-1], docs[1:]):
        lg = ref(input_ids=input_ids[:, s:e]).logits
        tgt = rhf.shift_labels(labels[:, s:e])
        total = total + torch.nn.functional.cross_entropy(lg.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                                          reduction="sum")
        count += int((tgt != -100).sum())
        logits.append(lg)
    loss = total / count
    loss.backward()
    return torch.cat(logits, 1).detach(), loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def packed_step(model, input_ids, labels, docs, *, pass_positions=True, as_tensor=True):
    """sp_step on a packed batch: shard_batch(..., cu_seqlens=docs), the boundaries passed on."""
    batch = rhf.shard_batch(model, input_ids, labels, cu_seqlens=torch.tensor(docs) if as_tensor else docs)
    kw = dict(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
    if pass_positions:  # else the pre-hook fills in the per-document positions itself
        kw["position_ids"] = batch["position_ids"]
    logits = model(**kw).logits
    loss = rhf.sequence_parallel_loss(logits, batch["labels"])
    loss.backward()
    return logits.detach(), loss.detach(), summed_grads(model)


def _check_packed(family, world):
    out = {}
    input_ids, labels = global_batch(SEQ[world])
    docs = PACKED[world]
    for i, (algorithm, layout) in enumerate((("ring", "zigzag"), ("token_ring", "contiguous"),
                                             ("token_ring", "zigzag"), ("auto", "zigzag"))):
        model = tiny_model(family)
        ref = packed_reference(model, input_ids, labels, docs)
        rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout)
        got = packed_step(model, input_ids, labels, docs, pass_positions=i != 2, as_tensor=i % 2 == 1)
        out[(algorithm, layout)] = compare(model.ringattn_plan, ref, got)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("family", ("llama", "qwen2", pytest.param("llama4_text", marks=needs_llama4)))
# (Llama 4: chunks from each document's start)
def test_packed_sequences_match_each_document_alone(dist_pool, family, world):
    if family == "llama4_text" and world == 1:
        pytest.skip("Llama 4 packed: 2 and 3 ranks (its chunk rule is the same on one)")
    assert_close(dist_pool(world).run(_check_packed, family, world, timeout=180))


def _check_padding_free(world):
    """transformers' padding-free batches: a DataCollatorWithFlattening batch through
    shard_batch(model, **batch), then the model given cu_seqlens, or the collator's own
    FlashAttentionKwargs (global, as it made them) instead: == each document alone."""
    from transformers import DataCollatorWithFlattening

    docs = PACKED[world]
    ids, _ = global_batch(SEQ[world], batch=1)
    features = [{"input_ids": ids[0, s:e].tolist()} for s, e in zip(docs[:-1], docs[1:])]
    out = {}
    for flash in (False, True):
        collated = DataCollatorWithFlattening(return_flash_attn_kwargs=flash, return_seq_idx=flash)(features)
        model = tiny_model("llama")
        ref = packed_reference(model, collated["input_ids"], collated["labels"], docs)
        rhf.apply_sequence_parallel(model, algorithm="auto", layout="zigzag")
        batch = rhf.shard_batch(model, **collated)
        assert batch["cu_seqlens"].tolist() == docs, (batch["cu_seqlens"], docs)
        kw = {k: v for k, v in batch.items() if k != "labels"}
        if flash:
            del kw["cu_seqlens"]
            kw.update({k: collated[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        logits = model(**kw).logits
        loss = rhf.sequence_parallel_loss(logits, batch["labels"])
        loss.backward()
        out[("collator", "flash_kwargs" if flash else "cu_seqlens")] = compare(
            model.ringattn_plan, ref, (logits.detach(), loss.detach(), summed_grads(model)))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_padding_free_collator_batches(dist_pool, world):
    assert_close(dist_pool(world).run(_check_padding_free, world, timeout=180))


# ---------------------------------------------------------------------------------------------
# Padded batches (attention_mask with left/right padding) and per-row packings: the wrapped model
# == the single-process model on every row's documents alone, under that row's mask; compared on
# the real tokens (a padded token's output is not defined), loss and gradients exactly.
# ---------------------------------------------------------------------------------------------
PER_ROW = {1: ([0, 7, 20], [0, 3, 10, 20], [0, 20]), 2: ([0, 7, 23], [0, 3, 10, 23], [0, 23]),
           3: ([0, 7, 29], [0, 3, 10, 17, 29], [0, 29]), 4: ([0, 5, 29], [0, 3, 10, 24, 29], [0, 29])}


def padded_batch(seq_len: int, packed: bool):
    """3 rows: left-padded (3), right-padded (4), and either unpadded or, packed as [0, 9, L],
    padded at the end of its first document (tokens 7, 8). Labels -100 at pads, as collators do."""
    input_ids, labels = global_batch(seq_len, batch=3)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    mask[1, -4:] = 0
    if packed:
        mask[2, 7:9] = 0
    labels = labels.masked_fill(mask == 0, -100)
    return input_ids, labels, mask


def rows_reference(model, input_ids, labels, row_docs, mask=None, position_ids=None):
    """Every row's documents through the single-process model on their own (with the row's mask
    slice and position slice); targets at padded tokens ignored. Returns logits (B, L, V), loss,
    gradients."""
    ref = copy.deepcopy(model)
    rows, total, count = [], 0.0, 0
    for b, docs in enumerate(row_docs):
        parts = []
        for s, e in zip(docs[:-1], docs[1:]):
            kw = {}
            if mask is not None:
                kw["attention_mask"] = mask[b:b + 1, s:e]
            if position_ids is not None:
                kw["position_ids"] = position_ids[b:b + 1, s:e]
            lg = ref(input_ids=input_ids[b:b + 1, s:e], **kw).logits
            tgt = rhf.shift_labels(labels[b:b + 1, s:e])
            if mask is not None:
                tgt = tgt.masked_fill(mask[b:b + 1, s:e] == 0, -100)
            total = total + torch.nn.functional.cross_entropy(lg.flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                                              reduction="sum")
            count += int((tgt != -100).sum())
            parts.append(lg)
        rows.append(torch.cat(parts, 1))
    loss = total / count
    loss.backward()
    return torch.cat(rows, 0).detach(), loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def compare_real(plan, ref, got, mask) -> dict:
    """compare() with the logits compared on the real (mask 1) tokens only."""
    err = compare(plan, ref, got)
    if mask is not None:
        real = plan.shard(mask, dim=1).bool()[..., None]
        err["logits"] = ((got[0] - plan.shard(ref[0], dim=1)).abs() * real).max().item()
    return err


def generate_style_positions(mask):
    """What generate() feeds a left-padded batch: cumsum(mask) - 1, padded tokens at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


ROW_CASES = (("ring", "zigzag", "padded"), ("token_ring", "contiguous", "padded_no_positions"),
             ("auto", "zigzag", "padded_generate_positions"), ("token_ring", "zigzag", "padded_packed"),
             ("ring", "contiguous", "per_row_position_ids"), ("token_ring", "zigzag", "per_row_cu_seqlens"),
             ("auto", "contiguous", "per_row_padded"))


def _check_rows(world, cases=ROW_CASES, family="llama", **apply_kw):
    out = {}
    L = SEQ.get(world, 29)
    per_row = [list(r) for r in PER_ROW[world]]
    for algorithm, layout, variant in cases:
        model = tiny_model(family)
        ids, labels, mask = padded_batch(L, packed=variant in ("padded_packed", "per_row_padded"))
        pos = None
        kw = {}
        if variant == "padded_packed":
            row_docs = [[0, 9, L]] * 3
            kw["cu_seqlens"] = [0, 9, L]
        elif variant == "per_row_padded":  # per-row packings and padding inside their documents
            row_docs = [per_row[0], per_row[1], [0, 9, L]]
            n = max(map(len, row_docs))  # a 2-D tensor, rows padded by repeating their last value
            kw["cu_seqlens"] = torch.tensor([r + [r[-1]] * (n - len(r)) for r in row_docs])
        elif variant.startswith("per_row"):
            row_docs, mask = per_row, None
            labels = global_batch(L, batch=3)[1]
            if variant == "per_row_position_ids":  # a collator's per-row packed positions
                kw["position_ids"] = rhf._global_positions(L, tuple(map(tuple, per_row)), None)
            else:
                kw["cu_seqlens"] = per_row
        else:
            row_docs = [[0, L]] * 3
        if variant == "padded_generate_positions":
            pos = generate_style_positions(mask)
            kw["position_ids"] = pos
        ref = rows_reference(model, ids, labels, row_docs, mask, pos)
        rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout, **apply_kw)
        batch = rhf.shard_batch(model, ids, labels, attention_mask=mask, **kw)
        if mask is not None:
            assert torch.equal(batch["attention_mask"], model.ringattn_plan.shard(mask, dim=1))
        if variant.startswith("per_row"):
            got_docs, _ = __import__("ringattn.documents", fromlist=["as_documents"]).as_documents(batch["cu_seqlens"])
            assert [list(r) for r in got_docs] == row_docs, (got_docs, row_docs)
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        if variant == "padded_no_positions":
            del fwd["position_ids"]
        logits = model(**fwd).logits
        loss = rhf.sequence_parallel_loss(logits, batch["labels"])
        loss.backward()
        out[(algorithm, layout, variant)] = compare_real(model.ringattn_plan, ref,
                                                         (logits.detach(), loss.detach(), summed_grads(model)), mask)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_padded_and_per_row_batches_match_single_process(dist_pool, world):
    assert_close(dist_pool(world).run(_check_rows, world, timeout=240))


@needs_llama4
def test_llama4_padded_and_per_row_batches(dist_pool):
    """Llama 4's chunked layers count chunks from each row's first real token (transformers'
    chunked mask) and from each packed document's start; its temperature tuning counts positions
    with the padding (as transformers does) and inside each document: == the single-process model."""
    cases = (("ring", "zigzag", "padded"), ("token_ring", "zigzag", "padded_packed"),
             ("ring", "contiguous", "per_row_cu_seqlens"), ("token_ring", "contiguous", "per_row_padded"))
    assert_close(dist_pool(2).run(_check_rows, 2, cases, "llama4_text", timeout=240))


# ---------------------------------------------------------------------------------------------
# Serving: rhf.generate (sequence-parallel prefill, sharded KV cache, sharded_kv_attention per
# decode step) == a plain greedy loop of the single-process model over the full sequence.
# ---------------------------------------------------------------------------------------------
def greedy_reference(model, input_ids, steps):
    tokens, logits = input_ids, []
    with torch.no_grad():
        for _ in range(steps):
            lg = model(input_ids=tokens).logits[:, -1].float()
            logits.append(lg)
            tokens = torch.cat([tokens, lg.argmax(-1, keepdim=True)], 1)
    return tokens, logits


def processed_reference(model, input_ids, steps, processors, generator=None):
    """The single-process model step by step on the full sequence, its next-token logits through
    `processors` (transformers' LogitsProcessorList), then argmax, or a draw with `generator`."""
    tokens = input_ids
    with torch.no_grad():
        for _ in range(steps):
            scores = processors(tokens, model(input_ids=tokens).logits[:, -1].float())
            nxt = (scores.argmax(-1) if generator is None else
                   torch.multinomial(scores.softmax(-1), 1, generator=generator).flatten())
            tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens


def _check_generate(world):
    prompt, _ = global_batch(SEQ[world])
    steps = 7
    model = tiny_model("llama")
    ref_tokens, ref_logits = greedy_reference(copy.deepcopy(model), prompt, steps)
    out = {}
    for algorithm, layout in (("ring", "zigzag"), ("token_ring", "contiguous"), ("auto", "zigzag")):
        m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm=algorithm, layout=layout)
        tokens, logits = rhf.generate(m, prompt, max_new_tokens=steps, return_logits=True)
        out[(algorithm, layout)] = {
            "tokens_equal": torch.equal(tokens, ref_tokens), "steps": len(logits),
            "logits": max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))}
    # sampling with top_k=1 is greedy; with top_k=5 every rank returns the same tokens (rank 0 decides)
    m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm="auto", layout="zigzag")
    out["top_k=1"] = torch.equal(rhf.generate(m, prompt, max_new_tokens=steps, do_sample=True, top_k=1,
                                              generator=torch.Generator().manual_seed(dist.get_rank())), ref_tokens)
    sampled = rhf.generate(m, prompt, max_new_tokens=steps, do_sample=True, top_k=5, temperature=0.7,
                           generator=torch.Generator().manual_seed(dist.get_rank()))
    gathered = [torch.empty_like(sampled) for _ in range(world)]
    dist.all_gather(gathered, sampled)
    out["sampled_same_on_every_rank"] = all(torch.equal(g, sampled) for g in gathered)
    # transformers' logits processors (they see every token so far) and top_p: against a loop of the
    # single-process model through the same processors / warpers and the same generator
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, \
        TopPLogitsWarper

    pen = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    out["repetition_penalty"] = torch.equal(
        rhf.generate(m, prompt, max_new_tokens=steps, logits_processor=pen),
        processed_reference(copy.deepcopy(model), prompt, steps, pen))
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8)])
    out["top_p"] = torch.equal(
        rhf.generate(m, prompt, max_new_tokens=steps, do_sample=True, temperature=0.7, top_p=0.8,
                     generator=torch.Generator().manual_seed(11)),
        processed_reference(copy.deepcopy(model), prompt, steps, warp, torch.Generator().manual_seed(11)))
    out["penalty_changes_tokens"] = not torch.equal(processed_reference(copy.deepcopy(model), prompt, steps, pen),
                                                    ref_tokens)
    # eos: row 0 stops at its 2nd token, pads with eos after it; generation goes on for row 1
    eos = int(ref_tokens[0, prompt.shape[1] + 1])
    row1_hits = (ref_tokens[1, prompt.shape[1]:] == eos).nonzero()
    stop = min(steps, int(row1_hits[0]) + 1) if len(row1_hits) else steps
    got = rhf.generate(m, prompt, max_new_tokens=steps, eos_token_id=eos)
    want = ref_tokens[:, :prompt.shape[1] + stop].clone()
    want[0, prompt.shape[1] + 2:] = eos
    out["eos"] = (torch.equal(got, want), tuple(got.shape), tuple(want.shape))
    # after generate() the model trains as before (the cache refusal is back)
    out["train_after"] = compare(m.ringattn_plan, reference(model, *global_batch(SEQ[world])),
                                 sp_step(m, *global_batch(SEQ[world])))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_generate_matches_single_process_greedy(dist_pool, world):
    for rank, out in enumerate(dist_pool(world).run(_check_generate, world, timeout=180)):
        for case in (("ring", "zigzag"), ("token_ring", "contiguous"), ("auto", "zigzag")):
            r = out[case]
            assert r["tokens_equal"] and r["steps"] == 7 and r["logits"] < 2e-5, (rank, case, r)
        assert out["top_k=1"], rank
        assert out["sampled_same_on_every_rank"], rank
        assert out["repetition_penalty"] and out["top_p"] and out["penalty_changes_tokens"], (rank, out)
        assert out["eos"][0], (rank, out["eos"])
        assert_close([{"train_after": out["train_after"]}])


def padded_greedy_reference(model, input_ids, mask, steps):
    """transformers' generate() semantics for a left-padded batch, step by step on the full
    sequence: positions cumsum(mask) - 1, padded keys masked."""
    tokens, logits = input_ids, []
    with torch.no_grad():
        for _ in range(steps):
            pos = generate_style_positions(mask)
            lg = model(input_ids=tokens, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            logits.append(lg)
            tokens = torch.cat([tokens, lg.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return tokens, logits


def _check_generate_padded(world, cases=(("ring", "zigzag"), ("token_ring", "contiguous"), ("auto", "zigzag")),
                           family="llama", **apply_kw):
    """Left-padded prompts of 3 lengths (pads 0, 3, 3 + a whole chunk's worth) through generate()."""
    L = SEQ.get(world, 29)
    prompt, _ = global_batch(L, batch=4)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    mask[2, :L // 2] = 0
    mask[3, :3] = 0
    steps = 6
    model = tiny_model(family)
    ref_tokens, ref_logits = padded_greedy_reference(copy.deepcopy(model), prompt, mask, steps)
    hf = copy.deepcopy(model).generate(prompt, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                       pad_token_id=0)
    out = {"hf_generate_agrees": torch.equal(hf, ref_tokens)}
    for algorithm, layout in cases:
        m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm=algorithm, layout=layout, **apply_kw)
        tokens, logits = rhf.generate(m, prompt, max_new_tokens=steps, return_logits=True, attention_mask=mask)
        out[(algorithm, layout)] = {
            "tokens_equal": torch.equal(tokens, ref_tokens), "steps": len(logits),
            "logits": max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))}
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_generate_left_padded_prompts_match_single_process(dist_pool, world):
    for rank, out in enumerate(dist_pool(world).run(_check_generate_padded, world, timeout=180)):
        assert out.pop("hf_generate_agrees"), "the reference loop is not transformers' generate()"
        for case, r in out.items():
            assert r["tokens_equal"] and r["steps"] == 6 and r["logits"] < 2e-5, (rank, case, r)


def _check_generate_packed(world, family="llama"):
    """Packed prompts (per-row packings, one row also left-padded inside its last document): each
    row's generation equals the single-process model continuing that row's last document alone."""
    L = SEQ[world]
    prompt, _ = global_batch(L, batch=3)
    docs = [[0, 7, L], [0, 3, 10, L], [0, L]]
    mask = torch.ones_like(prompt)
    mask[1, 10:13] = 0  # left padding of row 1's last document
    mask[2, :2] = 0
    steps = 5
    model = tiny_model(family)
    want_tokens, want_logits = [], []
    for b, r in enumerate(docs):
        s = r[-2]
        t, lg = padded_greedy_reference(copy.deepcopy(model), prompt[b:b + 1, s:], mask[b:b + 1, s:], steps)
        want_tokens.append(t[0, L - s:])
        want_logits.append(torch.cat(lg))
    out = {}
    for algorithm, layout, with_mask in (("ring", "zigzag", True), ("token_ring", "contiguous", True),
                                         ("auto", "zigzag", False)):
        m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm=algorithm, layout=layout)
        kw = dict(attention_mask=mask) if with_mask else {}
        tokens, logits = rhf.generate(m, prompt, max_new_tokens=steps, return_logits=True, cu_seqlens=docs, **kw)
        rows = range(3) if with_mask else (0,)  # without the mask only row 0 (unpadded) is comparable
        out[(algorithm, layout, with_mask)] = {
            "prompt_kept": torch.equal(tokens[:, :L], prompt), "steps": len(logits),
            "tokens_equal": all(torch.equal(tokens[b, L:], want_tokens[b]) for b in rows),
            "logits": max((torch.stack([lg[b] for lg in logits]) - want_logits[b]).abs().max().item() for b in rows)}
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_generate_packed_prompts_continue_each_rows_last_document(dist_pool, world):
    for rank, out in enumerate(dist_pool(world).run(_check_generate_packed, world, timeout=180)):
        for case, r in out.items():
            assert r["prompt_kept"] and r["tokens_equal"] and r["steps"] == 5 and r["logits"] < 2e-5, (rank, case, r)


@needs_llama4
def test_llama4_chunked_attention_and_temperature_generate(dist_pool):
    """Llama 4: chunked layers (chunks of 5 tokens, from each row's first real token / each packed
    document's start) and the NoPE layer's temperature tuning (from global positions) in generate():
    left-padded and packed prompts equal the single-process model (transformers' own generate()
    for the padded ones), token for token, logits to 2e-5."""
    world = 2
    for rank, out in enumerate(dist_pool(world).run(_check_generate_padded, world, (("ring", "zigzag"),
                                                    ("token_ring", "contiguous")), "llama4_text", timeout=180)):
        assert out.pop("hf_generate_agrees"), "the reference loop is not transformers' generate()"
        for case, r in out.items():
            assert r["tokens_equal"] and r["steps"] == 6 and r["logits"] < 2e-5, (rank, case, r)
    for rank, out in enumerate(dist_pool(world).run(_check_generate_packed, world, "llama4_text", timeout=180)):
        for case, r in out.items():
            assert r["prompt_kept"] and r["tokens_equal"] and r["steps"] == 5 and r["logits"] < 2e-5, (rank, case, r)


def _llama4_refusal():
    try:
        rhf.apply_sequence_parallel(tiny_model("llama4_text"))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.skipif(rhf._transformers_major() >= 5 or not hasattr(transformers, "Llama4TextConfig"),
                    reason="transformers >= 5 runs Llama 4")
def test_llama4_refused_before_transformers_5(dist_pool):
    for msg in dist_pool(2).run(_llama4_refusal, timeout=60):
        assert "needs transformers >= 5" in msg and "first real token" in msg, msg


def _generate_every_family():
    prompt, _ = global_batch(23)
    out = {}
    for family in (f for f in FAMILY_CONFIGS if family_available(f)):
        model = tiny_model(family)
        ref, _ = greedy_reference(copy.deepcopy(model), prompt, 5)
        rhf.apply_sequence_parallel(model, algorithm="auto", layout="zigzag")
        out[family] = torch.equal(rhf.generate(model, prompt, max_new_tokens=5), ref)
    return out


def test_generate_every_family(dist_pool):
    for rank, out in enumerate(dist_pool(2).run(_generate_every_family, timeout=240)):
        assert all(out.values()), (rank, {f: ok for f, ok in out.items() if not ok})


# ---------------------------------------------------------------------------------------------
# Refusals: clear errors naming what to change.
# ---------------------------------------------------------------------------------------------
def _raises(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _refusals():
    msgs = {}
    msgs["unsupported_model"] = _raises(lambda: rhf.apply_sequence_parallel(
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))))
    msgs["not_a_model"] = _raises(lambda: rhf.apply_sequence_parallel(torch.nn.Linear(2, 2)))
    # sliding windows run for the families whose attention passes them (test_hf_sliding_window.py);
    # elsewhere a window in the config is refused, and so are layer types other than full/sliding
    msgs["llama_sliding_window"] = _raises(lambda: rhf.apply_sequence_parallel(tiny_model("llama", sliding_window=16)))
    chunked = tiny_model("qwen2")
    chunked.config.layer_types = ["full_attention", "chunked_attention"]
    msgs["qwen2_chunked_layers"] = _raises(lambda: rhf.apply_sequence_parallel(chunked))
    msgs["softcap"] = _raises(lambda: rhf.apply_sequence_parallel(tiny_model("llama", attn_logit_softcapping=30.0)))
    msgs["dropout"] = _raises(lambda: rhf.apply_sequence_parallel(tiny_model("llama", attention_dropout=0.1)))
    msgs["dynamic_rope"] = _raises(lambda: rhf.apply_sequence_parallel(
        tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})))
    msgs["bad_algorithm"] = _raises(lambda: rhf.apply_sequence_parallel(tiny_model("llama"), algorithm="ringz"))
    moe = rhf.apply_sequence_parallel(tiny_model("mixtral"))
    moe_ids = rhf.shard_batch(moe, global_batch(12)[0])["input_ids"]
    msgs["moe_router_aux_loss"] = _raises(lambda: moe(input_ids=moe_ids, output_router_logits=True))

    model = rhf.apply_sequence_parallel(tiny_model("llama"), layout="zigzag")
    rank = dist.get_rank()
    ids, labels = global_batch(12)
    b = rhf.shard_batch(model, ids, labels)
    msgs["too_short"] = _raises(lambda: rhf.shard_batch(model, ids[:, :3]))
    # rank 1 shards a 14-token sequence while rank 0 shards a 12-token one
    mism = rhf.shard_batch(model, global_batch(12 if rank == 0 else 14)[0])["input_ids"]
    msgs["mismatched_shards"] = _raises(lambda: model(input_ids=mism))
    mask = torch.ones_like(b["input_ids"])
    if rank == 1:
        mask[0, -1] = 0  # padding between real tokens, on one rank only: every rank must refuse (no hang)
    msgs["padding_mask"] = _raises(lambda: model(input_ids=b["input_ids"], attention_mask=mask))
    msgs["mask_4d"] = _raises(lambda: model(input_ids=b["input_ids"], attention_mask=torch.ones(2, 1, 6, 6)))
    msgs["mask_global_on_one_rank"] = _raises(lambda: model(
        input_ids=b["input_ids"], attention_mask=torch.ones_like(ids) if rank == 0 else torch.ones_like(b["input_ids"])))
    msgs["cu_seqlens_rows_not_batch"] = _raises(lambda: model(
        input_ids=b["input_ids"], cu_seqlens=[[0, 5, 12], [0, 6, 12], [0, 12]]))
    hole = torch.ones_like(ids)
    hole[1, 4] = 0
    msgs["shard_batch_mask_hole"] = _raises(lambda: rhf.shard_batch(model, ids, attention_mask=hole))
    msgs["shard_batch_mask_shape"] = _raises(lambda: rhf.shard_batch(model, ids, attention_mask=hole[:, 1:]))
    left = torch.ones_like(ids)
    left[:, :2] = 0
    msgs["shard_batch_mask_positions"] = _raises(lambda: rhf.shard_batch(
        model, ids, attention_mask=left, position_ids=torch.arange(12).flip(0).expand(2, -1)))
    contiguous_pos = torch.arange(6 * rank, 6 * rank + 6).expand(2, -1)  # wrong for zigzag
    msgs["wrong_positions"] = _raises(lambda: model(input_ids=b["input_ids"], position_ids=contiguous_pos))
    msgs["labels_to_model"] = _raises(lambda: model(input_ids=b["input_ids"], labels=b["labels"]))
    msgs["kv_cache"] = _raises(lambda: model(input_ids=b["input_ids"], use_cache=True))
    # packed sequences: ranks passing different boundaries, or the local instead of the global end
    msgs["cu_seqlens_disagree"] = _raises(lambda: model(input_ids=b["input_ids"],
                                                        cu_seqlens=[0, 5, 12] if rank == 0 else [0, 7, 12]))
    msgs["cu_seqlens_local_end"] = _raises(lambda: model(input_ids=b["input_ids"], cu_seqlens=[0, 2, 6]))
    msgs["cu_seqlens_invalid_on_one_rank"] = _raises(lambda: model(
        input_ids=b["input_ids"], cu_seqlens=[0, 5, 12] if rank == 0 else [0, 5, 5, 12]))
    pb = rhf.shard_batch(model, ids, labels, cu_seqlens=[0, 5, 12])
    # per-document positions without the boundaries: the positions check refuses (never a silent
    # full-causal attention over the packed documents)
    msgs["packed_positions_without_cu_seqlens"] = _raises(lambda: model(input_ids=pb["input_ids"],
                                                                        position_ids=pb["position_ids"]))
    msgs["shard_batch_cu_seqlens_end"] = _raises(lambda: rhf.shard_batch(model, ids, cu_seqlens=[0, 5, 11]))
    msgs["generate_bad_max_new_tokens"] = _raises(lambda: rhf.generate(model, ids, max_new_tokens=-1))
    msgs["generate_float_prompt"] = _raises(lambda: rhf.generate(model, ids.float(), max_new_tokens=2))
    msgs["generate_too_short"] = _raises(lambda: rhf.generate(model, ids[:, :3], max_new_tokens=2))
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    msgs["generate_right_padded"] = _raises(lambda: rhf.generate(model, ids, max_new_tokens=2, attention_mask=right))
    msgs["generate_cu_seqlens_end"] = _raises(lambda: rhf.generate(model, ids, max_new_tokens=2, cu_seqlens=[0, 5, 11]))
    msgs["generate_cu_seqlens_rows"] = _raises(lambda: rhf.generate(model, ids, max_new_tokens=2,
                                                                    cu_seqlens=[[0, 5, 12], [0, 6, 12], [0, 12]]))
    msgs["generate_mask_shape"] = _raises(lambda: rhf.generate(model, ids, max_new_tokens=2,
                                                               attention_mask=right[:, 1:]))
    # transformers' FlashAttentionKwargs: taken as the boundaries (never ignored), so they must agree
    msgs["flash_kwargs_disagree"] = _raises(lambda: model(input_ids=pb["input_ids"], position_ids=pb["position_ids"],
                                                          cu_seqlens=pb["cu_seqlens"], cu_seq_lens_q=[0, 6, 12],
                                                          cu_seq_lens_k=[0, 6, 12]))
    msgs["flash_kwargs_q_vs_k"] = _raises(lambda: model(input_ids=pb["input_ids"], position_ids=pb["position_ids"],
                                                        cu_seq_lens_q=torch.tensor([0, 5, 12], dtype=torch.int32),
                                                        cu_seq_lens_k=torch.tensor([0, 12], dtype=torch.int32)))
    msgs["flash_kwargs_max_length"] = _raises(lambda: model(input_ids=pb["input_ids"], position_ids=pb["position_ids"],
                                                            cu_seq_lens_q=[0, 5, 12], cu_seq_lens_k=[0, 5, 12],
                                                            max_length_q=7 if rank == 0 else 6, max_length_k=7))
    # shard_batch reads a packing from GLOBAL position_ids; they must restart at 0 per document and
    # agree with boundaries given alongside
    bad_pos = torch.cat([torch.arange(5), torch.arange(7) + 1]).unsqueeze(0)
    msgs["shard_batch_positions_not_packed"] = _raises(lambda: rhf.shard_batch(model, ids, position_ids=bad_pos))
    msgs["shard_batch_positions_vs_cu_seqlens"] = _raises(lambda: rhf.shard_batch(
        model, ids, position_ids=torch.arange(12).expand(2, -1), cu_seqlens=[0, 5, 12]))
    # rows packed differently: per-row boundaries (a 2-D tensor, rows padded with their last value)
    msgs["per_row_positions_ok"] = rhf.shard_batch(
        model, ids, position_ids=torch.stack([torch.arange(12), torch.cat([torch.arange(5), torch.arange(7)])])
    )["cu_seqlens"].tolist()
    attn = model.model.layers[0].self_attn
    q = torch.zeros(2, 4, 6, 16)
    kv = torch.zeros(2, 2, 6, 16)
    msgs["attention_sinks"] = _raises(lambda: rhf._attention_forward(attn, q, kv, kv, None, s_aux=torch.zeros(4)))
    msgs["flash_kwargs_bypassing_hook"] = _raises(lambda: rhf._attention_forward(attn, q, kv, kv, None,
                                                                                cu_seq_lens_q=torch.tensor([0, 12])))
    # a mask left all ones is accepted (the same as no mask), and the model still works after refusals
    ok = model(input_ids=b["input_ids"], attention_mask=torch.ones_like(b["input_ids"])).logits
    msgs["all_ones_mask_ok"] = tuple(ok.shape)
    # and it can be unwrapped again (e.g. before save_pretrained): full-sequence forward works
    rhf.remove_sequence_parallel(model)
    msgs["unwrapped"] = (model.config._attn_implementation, tuple(model(input_ids=ids).logits.shape))
    return msgs


REFUSALS = {
    "unsupported_model": ["GPT2LMHeadModel", "model_type='gpt2'", "llama, mistral, qwen2"],
    "not_a_model": ["PreTrainedModel", "Linear"],
    "llama_sliding_window": ["sliding_window=16", "sliding_window=None", "mistral"],
    "qwen2_chunked_layers": ["chunked_attention", "full_attention and sliding_attention"],
    "softcap": ["softcapping"],
    "dropout": ["attention_dropout=0.1", "0.0"],
    "dynamic_rope": ["'dynamic'"],
    "bad_algorithm": ["'ringz'", "token_ring"],
    "too_short": ["3 tokens is too short for 2 ranks", "at least 4 tokens"],
    "mismatched_shards": ["mismatched shards", "ranks hold [6, 7]", "shard_batch"],
    "padding_mask": ["row 0 has padding (0) at token 8 between real tokens 0 and 11", "left or right padding"],
    "mask_4d": ["ranks [0, 1]", "2-D (batch, seq_local) 0/1 padding mask", "4-D"],
    "mask_global_on_one_rank": ["ranks [0]:", "2-D (batch, seq_local)"],
    "cu_seqlens_rows_not_batch": ["cu_seqlens has 3 rows", "the batch has 2 rows"],
    "shard_batch_mask_hole": ["row 1 has padding (0) at token 4", "left or right padding"],
    "shard_batch_mask_shape": ["attention_mask (2, 11)", "input_ids' shape (2, 12)"],
    "shard_batch_mask_positions": ["position_ids of row 0", "cumsum(attention_mask) - 1"],
    "wrong_positions": ["position_ids", "ranks [0, 1]"],
    "labels_to_model": ["labels=", "sequence_parallel_loss"],
    "kv_cache": ["KV cache", "generate()"],
    "cu_seqlens_disagree": ["different cu_seqlens", "GLOBAL"],
    "cu_seqlens_local_end": ["cu_seqlens ends at 6", "12 tokens"],
    "cu_seqlens_invalid_on_one_rank": ["ranks [1]", "cu_seqlens must be the global document boundaries"],
    "packed_positions_without_cu_seqlens": ["position_ids", "cu_seqlens"],
    "shard_batch_cu_seqlens_end": ["ends at 11", "12 tokens"],
    "attention_sinks": ["attention sinks"],
    "moe_router_aux_loss": ["output_router_logits=True", "load-balancing loss", "shard"],
    "generate_bad_max_new_tokens": ["max_new_tokens must be an int >= 0"],
    "generate_float_prompt": ["integer token ids", "GLOBAL prompt"],
    "generate_too_short": ["3 tokens is too short for 2 ranks"],
    "generate_right_padded": ["LEFT-padded", "rows [1] end in padding"],
    "generate_cu_seqlens_end": ["generate() cu_seqlens [0, 5, 11]", "ending at its length 12"],
    "generate_cu_seqlens_rows": ["one row per prompt row (2)"],
    "generate_mask_shape": ["attention_mask (2, 11)", "prompt's shape (2, 12)"],
    "flash_kwargs_disagree": ["ranks [0, 1]", "FlashAttentionKwargs", "the same as cu_seqlens"],
    "flash_kwargs_q_vs_k": ["ranks [0, 1]", "q and k the same"],
    "flash_kwargs_max_length": ["ranks [1]", "max_length_q/k at least the longest document"],
    "shard_batch_positions_not_packed": ["at token 5: 1, expected 5", "restart at 0"],
    "shard_batch_positions_vs_cu_seqlens": ["position_ids says the documents are [0, 12]", "[0, 5, 12]"],
    "flash_kwargs_bypassing_hook": ["cu_seq_lens_q reached the attention", "pre-hook"],
}


@pytest.fixture(scope="module")
def refusals(dist_pool):
    return dist_pool(2).run(_refusals, timeout=180)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_clearly(refusals, case):
    for rank, msgs in enumerate(refusals):
        for needle in REFUSALS[case]:
            assert needle in msgs[case], f"rank {rank} {case}: {needle!r} not in {msgs[case]!r}"
        assert msgs["all_ones_mask_ok"] == (2, 6, 96)
        assert msgs["per_row_positions_ok"] == [[0, 12, 12], [0, 5, 12]]
        assert msgs["unwrapped"] == ("eager", (2, 12, 96))


def test_refuses_uninitialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised.*init_distributed"):
        rhf.apply_sequence_parallel(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="not initialised"):
        rhf.sequence_parallel_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))


def test_layout_lengths():
    from ringattn.layout import SequenceLayout

    for n in (8, 13, 29, 64):
        for w in (1, 2, 3, 4):
            for layout in ("contiguous", "zigzag"):
                if n >= 2 * w:  # the plan's bookkeeping is ringattn.layout's
                    assert rhf.layout_lengths(n, w, layout) == list(SequenceLayout.build(n, w, layout).local_lengths)
    assert rhf.layout_lengths(10, 3, "contiguous") == [4, 3, 3]
    assert rhf.layout_lengths(13, 2, "zigzag") == [4 + 3, 3 + 3]   # chunks 4,3,3,3: r0 = c0+c3
    assert rhf.split_sizes(7, 3) == [3, 2, 2]
    labels = torch.tensor([[5, 6, 7, -100, 9]])
    assert rhf.shift_labels(labels).tolist() == [[6, 7, -100, 9, -100]]


def test_refuses_transformers_older_than_the_registries(monkeypatch):
    monkeypatch.setattr(rhf, "_transformers_version", lambda: "4.52.4")
    with pytest.raises(ImportError, match=r"needs transformers >= 4\.53.*found 4\.52\.4"):
        rhf.apply_sequence_parallel(tiny_model("llama"))
    monkeypatch.setattr(rhf, "_transformers_version", lambda: "4.53.0.dev0")
    rhf._check_transformers_version()  # accepted


@pytest.mark.skipif(not family_available("nemotron"), reason="this transformers has no Nemotron ringattn runs")
def test_families_checked_on_transformers_5_only_are_refused_before_it(monkeypatch):
    """Families whose 4.x attention bypassed AttentionInterface (MIN_TRANSFORMERS_MAJOR) are refused
    there, by name, before anything runs; on 5.x the same model is accepted."""
    model = tiny_model("nemotron")
    rhf.check_supported(model)
    monkeypatch.setattr(rhf, "_transformers_version", lambda: "4.53.3")
    with pytest.raises(ValueError, match=r"model_type='nemotron'\) needs transformers >= 5.*found 4\.53\.3"):
        rhf.check_supported(model)
    assert set(rhf.MIN_TRANSFORMERS_MAJOR) <= set(rhf.SUPPORTED_MODEL_TYPES)


def _bypassing_layer(seq_len):
    """Layer 1's attention is made to dispatch to transformers' eager attention (its own config
    copy): it attends over this rank's shard alone. The wrapped model must raise, not return."""
    model = tiny_model("llama")
    rhf.apply_sequence_parallel(model, algorithm="ring", layout="zigzag")
    input_ids, labels = global_batch(seq_len)
    batch = rhf.shard_batch(model, input_ids, labels)
    ok = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.shape[1]
    attn = model.model.layers[1].self_attn
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = "eager"
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        return ok, "no error"
    except RuntimeError as e:
        return ok, str(e)


def test_attention_that_bypasses_ringattn_raises(dist_pool):
    for rank, (ok, msg) in enumerate(dist_pool(2).run(_bypassing_layer, SEQ[2], timeout=60)):
        assert ok > 0, rank
        assert "1 of the 2 attention layers of LlamaModel reached ringattn" in msg and "output is wrong" in msg, \
            (rank, msg)


@pytest.mark.parametrize("family", ["gemma2", "vaultgemma"])
def test_softcap_matters(family):
    """The softcapped families' tiny configs are sensitive to the cap (so a wrapped model that
    dropped it would fail the family tests): without it the single-process logits differ."""
    if not family_available(family):
        pytest.skip(f"this transformers has no {family}")
    ids, labels = global_batch(23)
    capped = reference(tiny_model(family), ids, labels)[0]
    plain = reference(tiny_model(family, attn_logit_softcapping=None), ids, labels)[0]
    assert (capped - plain).abs().max() > 0.05 * capped.abs().max()
