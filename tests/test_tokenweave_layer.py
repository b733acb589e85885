"""TokenWeaveDecoderLayer / TokenWeaveDecoderStack against the unsharded Hugging Face layers, and
the wave-aware token split.

CPU tier: tiny random Llama configs built here (transformers on CPU, no downloads), W real gloo
ranks (1, 2, 4); every rank builds the same model from a seed, runs the tensor-parallel wrapper and
compares with the unsharded layer. float64 cases must match to a few float32 ulps (HF's RMSNorm
runs in float32 even for float64; sharding and the fused op are exact rearrangements otherwise); bf16 cases follow the "2x the HF layer's own
error against float64" rule. Paths: the gloo fallbacks, and the fused kernel's protocol through
the CPU host-simulation kernel (fp32; two-shot with the token-sharded residual).
GPU tier (`-m gpu`): 2 ranks on cuda:0 (MPS), symm path, split on/off, bf16 vs the HF layer.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from conftest import get_pool
from ringattn.tokenweave import token_split as ts

transformers = pytest.importorskip("transformers")

HAS_CUDA = torch.cuda.is_available()
_ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}


# ---- token split (pure) ------------------------------------------------------------------------------


def test_wave_aware_split_never_adds_a_wave_when_avoidable():
    sms = 132
    for T in (2, 3, 37, 1000, 1024, 4096, 4097, 8192, 12345):
        for cols in (1536, 6144, 28672):
            m = ts.wave_aware_split(T, cols, sms)
            assert 0 < m < T
            waves = ts.gemm_waves(m, cols, sms) + ts.gemm_waves(T - m, cols, sms)
            best = min(ts.gemm_waves(k, cols, sms) + ts.gemm_waves(T - k, cols, sms) for k in range(max(1, int(0.3 * T)), min(T - 1, int(0.7 * T) + 1) + 1))
            assert waves <= best + (1 if T < 256 else 0), (T, cols, m, waves, best)
            assert 0.3 * T - 1 <= m <= 0.7 * T + 1, (T, m)


def test_split_ranges_threshold_and_switch():
    assert ts.split_ranges(4096, False, 0, 4096, 132) == [(0, 4096)]
    assert ts.split_ranges(512, True, 1024, 4096, 132) == [(0, 512)]
    (a, m), (m2, b) = ts.split_ranges(4096, True, 1024, 4096, 132)
    assert a == 0 and m == m2 and b == 4096 and m % 128 == 0


# ---- model helpers (inside the workers) ------------------------------------------------------------


def build_model(seed, dtype, *, heads=8, kv_heads=4, hidden=64, inter=96, layers=2, bias=False, attn="sdpa"):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=layers, vocab_size=32, max_position_embeddings=256, rms_norm_eps=1e-5,
        attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that attention and MLP matter next to the residual
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def inputs(model, seed, B, S, dtype, mask=False):
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, model.config.hidden_size, generator=g).to(dtype).to(dev)
    pos = torch.arange(S, device=dev)[None].expand(B, S)
    cos, sin = model.rotary_emb(h, pos)
    m = None
    if mask:  # causal, and batch 1 never sees key 1 (except itself): exercises the mask slicing
        keep = torch.ones(S, S).tril().bool()[None, None].repeat(B, 1, 1, 1)
        keep[1, :, 2:, 1] = False
        m = torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(dev)
    return h, (cos, sin), m


def _causal_mask(B: int, S: int, device=None) -> torch.Tensor:
    """(B, 1, S, S) additive causal mask, as a HF model hands its layers (0 or -inf)."""
    upper = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(B, 1, S, S, device=device).masked_fill(upper, float("-inf"))


def _hf_layer_kwargs(model, layer, h, pos) -> dict:
    """What a HF model hands `layer` for hidden states h at positions pos: its rotary table (by layer
    type where the model has several; Gemma 3 on transformers 4.x: both), position_ids and a causal mask."""
    import inspect

    rope, lt = model.rotary_emb, getattr(model.config, "layer_types", None)
    pe = rope(h, pos) if not isinstance(getattr(rope, "rope_type", None), dict) else rope(h, pos, lt[layer.self_attn.layer_idx])
    kw = dict(position_embeddings=pe)
    if "position_embeddings_global" in inspect.signature(type(layer).forward).parameters:  # Gemma 3 on 4.x
        kw = dict(position_embeddings_global=pe, position_embeddings_local=model.rotary_emb_local(h, pos))
    return dict(kw, position_ids=pos, attention_mask=_causal_mask(h.shape[0], h.shape[1], h.device))


def _t(x):
    """HF decoder layers return a tensor (transformers 5) or a tuple (4.x)."""
    return x[0] if isinstance(x, tuple) else x


def _assert_close(tag, got, ref64, same_dtype, dtype):
    got, ref64, same_dtype = _t(got), _t(ref64), _t(same_dtype)
    err = (got.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    # HF's LlamaRMSNorm computes in float32 even for float64 inputs (its rotary tables too), so the
    # "float64" HF layer is float32-accurate in places: the floor is float32 ulps for float64.
    floor = 64 * _ULP[torch.float32 if dtype == torch.float64 else dtype] * ref64.abs().max().item()
    assert err <= 2 * base + floor, f"{tag}: max err {err:.3e} > 2 x HF's own {base:.3e} + {floor:.3e}"


def _w_layer_cases(cases, path=None, symm_backend="cuda", one_shot_max_tokens=64):
    """Each case: (dtype, B, S, split, mask, bias, stack). Returns the paths the fused op took."""
    from ringattn.tokenweave import TokenWeaveConfig, TokenWeaveDecoderLayer, TokenWeaveDecoderStack

    cfg = TokenWeaveConfig(path=path, symm_backend=symm_backend, one_shot_max_tokens=one_shot_max_tokens, timeout_s=20)
    group = dist.group.WORLD
    paths = set()
    for i, (dtype, B, S, split, mask, bias, stack) in enumerate(cases):
        attn = "eager" if mask else "sdpa"
        ref_model = build_model(7 + i, torch.float64, bias=bias, attn=attn)
        model = build_model(7 + i, dtype, bias=bias, attn=attn)
        h, pe, m = inputs(model, 100 + i, B, S, dtype, mask)
        h64, pe64, m64 = inputs(ref_model, 100 + i, B, S, torch.float64, mask)
        tag = f"rank {dist.get_rank()} case {i} {dtype} B={B} S={S} split={split} mask={mask} bias={bias} stack={stack}"
        with torch.no_grad():
            if stack:
                ref64 = ref_model.norm(_t(ref_model.layers[1](_t(ref_model.layers[0](h64, attention_mask=m64, position_embeddings=pe64)),
                                                              attention_mask=m64, position_embeddings=pe64)))
                same = model.norm(_t(model.layers[1](_t(model.layers[0](h, attention_mask=m, position_embeddings=pe)),
                                                     attention_mask=m, position_embeddings=pe)))
                tw = TokenWeaveDecoderStack(model.layers, model.norm, group, token_split=split, split_min_tokens=0, config=cfg)
                out = tw(h, position_embeddings=pe, attention_mask=m)
            else:
                ref64 = ref_model.layers[0](h64, attention_mask=m64, position_embeddings=pe64)
                same = model.layers[0](h, attention_mask=m, position_embeddings=pe)
                tw = TokenWeaveDecoderLayer(model.layers[0], group, token_split=split, split_min_tokens=0, config=cfg)
                out = tw(h, attention_mask=m, position_embeddings=pe)
        out = _t(out)  # like the HF layer: a tuple on transformers 4.x
        assert out.shape == h.shape and out.dtype == dtype, tag
        _assert_close(tag, out, ref64, same, dtype)
        handle = tw.layers[0].handle(h.device) if stack else tw.handle(h.device)
        N = B * S
        halves = ts.split_ranges(N, split, 0, 1, 132)
        paths.update(handle.path_for(t1 - t0, h.shape[-1], dtype) for t0, t1 in halves)
        if path == "symm":
            # Every rank reads its pad before any rank starts the next case: the handle (and its
            # pads) is shared across cases, and a peer's next call writes into our pad.
            dist.barrier()
            zero = handle.signal_pads_zero()
            dist.barrier()
            assert zero, tag
    return sorted(paths)


# (dtype, B, S, split, mask, bias, stack); S odd and B*S odd so splits fall inside sequences
_F64_CASES = [
    (torch.float64, 2, 13, False, False, False, False),
    (torch.float64, 1, 37, True, False, False, False),
    (torch.float64, 3, 7, True, True, False, False),
    (torch.float64, 2, 9, True, False, True, False),
    (torch.float64, 3, 11, True, False, False, True),
]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layer_matches_hf_float64(world):
    paths = get_pool(world).run(_w_layer_cases, _F64_CASES, timeout=240)
    assert all(p == (["local"] if world == 1 else ["allreduce"]) for p in paths), paths


def test_layer_matches_hf_rs_ag_path():
    paths = get_pool(2).run(_w_layer_cases, _F64_CASES[1:3] + _F64_CASES[4:], "rs_ag", timeout=240)
    assert all(p == ["rs_ag"] for p in paths), paths


def test_layer_matches_hf_bf16():
    cases = [(torch.bfloat16, 2, 13, True, False, False, False), (torch.bfloat16, 3, 11, True, False, False, True)]
    get_pool(2).run(_w_layer_cases, cases, timeout=240)


@pytest.mark.skipif(
    not __import__("ringattn.tokenweave.fused_allreduce_rmsnorm", fromlist=["_op_has_kernel"])._op_has_kernel("cpu"),
    reason="ringattn._C predates the tw op (rebuild the extension)",
)
@pytest.mark.parametrize("world", [2, 4])
def test_layer_matches_hf_fused_kernel_protocol_host_sim(world):
    """The symm path end to end (host-simulation kernel): partials written into the symmetric
    buffer, two slots, views instead of copies, token-sharded residual between the fused calls."""
    cases = [
        (torch.float32, 2, 13, False, False, False, False),
        (torch.float32, 1, 37, True, False, False, False),
        (torch.float32, 3, 11, True, True, True, True),
    ]
    fp32 = [(torch.float32,) + c[1:] for c in cases]
    paths = get_pool(world).run(_w_layer_cases, fp32, "symm", "host-sim", 4, timeout=240)
    assert all(p == ["symm_twoshot"] for p in paths), paths


def _w_model_drop_in(attn):
    """Swap every layer of a HF LlamaModel for TokenWeaveDecoderLayer: the model's own loop (its
    mask, rotary tables, layer calling convention) gives the unsharded model's output."""
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    model = build_model(11, torch.float64, attn=attn)
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 9, model.config.hidden_size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = model(inputs_embeds=h, use_cache=False).last_hidden_state
        for i, layer in enumerate(model.layers):
            model.layers[i] = TokenWeaveDecoderLayer(layer, dist.group.WORLD, token_split=True, split_min_tokens=0)
        got = model(inputs_embeds=h, use_cache=False).last_hidden_state
    err = (got - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"rank {dist.get_rank()} attn={attn}: max err {err:.3e}"
    return err


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_in_replacement_inside_hf_model(attn):
    get_pool(2).run(_w_model_drop_in, attn, timeout=240)


def _w_refusals():
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    out = []
    model = build_model(1, torch.float32)
    try:
        TokenWeaveDecoderLayer(model.layers[0], dist.group.WORLD)
        out.append("built")
    except ValueError as e:
        out.append(str(e))
    return out


def test_refuses_heads_not_divisible_by_world():
    out = get_pool(3).run(_w_refusals)
    assert all("needs 3 | query heads (8)" in o[0] for o in out), out


def test_refuses_missing_rotary_and_non_llama_layers():
    """(KV caches are supported and their refusals tested in test_tokenweave_kv_cache.py.)"""
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    model = build_model(2, torch.float32)
    layer = TokenWeaveDecoderLayer(model.layers[0], None)
    h, _, _ = inputs(model, 3, 1, 5, torch.float32)
    with pytest.raises(ValueError, match="position_embeddings"):
        layer(h)
    with pytest.raises(TypeError, match="Llama-style"):
        TokenWeaveDecoderLayer(torch.nn.Linear(3, 3), None)


def _w_moe_shards():
    """The MoE families' layers on this world: which parameters the sharded block copy holds, and
    whether the HF block was left untouched (same tensors, same values) and shares no storage with it."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available, tiny_config

    from ringattn.tokenweave import TokenWeaveDecoderLayer

    out = {}
    for family in ("qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "glm4_moe"):
        if not family_available(family):
            continue
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(tiny_config(family)).float().eval()
        layer = model.layers[-1]  # (GLM-4-MoE's first layer is dense)
        block = getattr(layer, "mlp", None) or layer.block_sparse_moe  # (Mixtral on 4.x)
        if family == "gpt_oss":
            with torch.no_grad():
                block.experts.down_proj_bias.fill_(0.5)  # (initialised to zeros)
        before = {n: (p, p.detach().clone()) for n, p in block.named_parameters()}
        try:
            tw = TokenWeaveDecoderLayer(layer, dist.group.WORLD)
        except ValueError as e:
            out[family] = ("refused", str(e))
            continue
        after = dict(block.named_parameters())
        untouched = after.keys() == before.keys() and all(after[n] is p and torch.equal(p, v) for n, (p, v) in before.items())
        ptrs = {p.data_ptr() for p in block.parameters()}
        shared = [n for n, p in tw.moe.named_parameters() if p.data_ptr() in ptrs]
        full = {n: p.numel() for n, p in block.named_parameters()}
        out[family] = ("ran", {n: (p.numel(), full.get(n)) for n, p in tw.moe.named_parameters()}, untouched, shared,
                       not tw.moe.training)
        if family == "gpt_oss":  # the down bias, inside each weighted expert output: rank 0's partial only
            out[family] += (bool(tw.moe.experts.down_proj_bias.abs().sum() > 0),)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_moe_layers_shard_the_experts_and_leave_the_hf_block_alone(world):
    """MoE families (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert, gpt-oss with its biases): each rank's copy of the
    block keeps 1/W of every expert's intermediate dimension and the whole router; the HF block is not
    modified and shares no storage with it. At 3 ranks the expert intermediate size (not divisible) is
    refused by name. (Outputs against the HF layer: test_tokenweave_families_match_or_are_refused.)"""
    for rank, out in enumerate(get_pool(world).run(_w_moe_shards, timeout=240)):
        assert "qwen3_moe" in out and "mixtral" in out, (rank, out)
        for family, r in out.items():
            if world == 3:
                assert r[0] == "refused" and "expert intermediate size (" in r[1], (rank, family, r)
                continue
            assert r[0] == "ran", (rank, family, r)
            params, untouched, shared, eval_mode = r[1:5]
            assert untouched and not shared and eval_mode, (rank, family, untouched, shared)
            for name, (n, full) in params.items():
                # whole: the router, the shared-expert gate, gpt-oss's down bias (zero but on rank 0)
                whole = (("experts" not in name and not name.startswith("shared_expert."))
                         or name.endswith("down_proj_bias"))
                assert n == full if whole else 2 * n == full, (rank, family, name, n, full)
            if family == "gpt_oss":
                assert r[5] == (rank == 0), (rank, r[5])
            assert any("experts" in name for name in params), (rank, family, params)


def test_position_scaled_queries_need_position_ids():
    """Ministral 3 scales its queries by position: a call without position_ids is refused by name
    (the HF model always passes them; the scale is checked against the HF layer in the families test)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available, tiny_config

    from ringattn.tokenweave import TokenWeaveDecoderLayer

    if not family_available("ministral3"):
        pytest.skip("this transformers has no Ministral 3")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(tiny_config("ministral3")).float().eval()
    layer = TokenWeaveDecoderLayer(model.layers[0], None)
    h = torch.randn(1, 9, model.config.hidden_size)
    kw = _hf_layer_kwargs(model, model.layers[0], h, torch.arange(9)[None])
    with torch.no_grad(), pytest.raises(ValueError, match="position_ids are required"):
        layer(h, position_embeddings=kw["position_embeddings"])
    with torch.no_grad():
        ref = _t(model.layers[0](h, **kw))
        got = _t(layer(h, position_embeddings=kw["position_embeddings"], position_ids=kw["position_ids"]))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("post_norm", [True, False])
def test_hyperclovax_with_and_without_post_norms(post_norm):
    """HyperCLOVA X: with use_post_norm its attention / MLP outputs are normed before the residual add
    (post_norm1 / post_norm2, a sandwich) and residual_multiplier is folded into those norms' weights;
    without, its post norms are nn.Identity and the multiplier is folded into o_proj / down_proj, as
    Granite's. Both against the HF layer (the families test runs the default, post norms on, at 2 ranks)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available, tiny_config, weights_that_matter

    from ringattn.tokenweave import TokenWeaveDecoderLayer

    if not family_available("hyperclovax"):
        pytest.skip("this transformers has no HyperCLOVA X")
    torch.manual_seed(0)
    cfg = tiny_config("hyperclovax", use_post_norm=post_norm, residual_multiplier=0.5, attention_multiplier=0.3)
    model = transformers.AutoModel.from_config(cfg).float().eval()
    g = weights_that_matter(model, "hyperclovax")
    layer = model.layers[0]
    tw = TokenWeaveDecoderLayer(layer, None)
    assert (tw.attn_out_norm is not None) == post_norm
    h = torch.randn(2, 9, model.config.hidden_size, generator=g)
    kw = _hf_layer_kwargs(model, layer, h, torch.arange(9)[None].expand(2, 9))
    with torch.no_grad():
        ref, got = _t(layer(h, **kw)), _t(tw(h, **kw))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_refuses_training_with_dropout_it_would_skip():
    """A HF layer whose config has dropout (Seed-OSS defaults: 0.1 on attention and residuals) runs
    in eval mode; in training mode it is refused, naming the dropouts, instead of run without them."""
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    model = build_model(2, torch.float32)
    model.config.attention_dropout = 0.1
    layer = TokenWeaveDecoderLayer(model.layers[0], None)
    assert layer.dropouts["attention_dropout"] == 0.1
    h, pe, _ = inputs(model, 3, 1, 5, torch.float32)
    layer.eval()
    with torch.no_grad():
        out = layer(h, position_embeddings=pe)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()  # (a tuple on transformers 4.x)
    layer.train()
    with pytest.raises(ValueError, match=r"dropout \{'attention_dropout': 0\.1\}.*training mode"):
        layer(h, position_embeddings=pe)


# ---- GPU tier -----------------------------------------------------------------------------------------


def _gpu_layer(split):
    from ringattn.tokenweave import TokenWeaveConfig, TokenWeaveDecoderLayer

    dev = torch.device("cuda", 0)
    cfg = TokenWeaveConfig(path="symm", timeout_s=30)
    out = {}
    for i, (B, S) in enumerate([(1, 37), (2, 1000), (1, 3001)]):
        model = build_model(5 + i, torch.bfloat16, hidden=512, inter=1024, heads=8, kv_heads=4).to(dev)
        ref_model = build_model(5 + i, torch.float64, hidden=512, inter=1024, heads=8, kv_heads=4).to(dev)
        h, pe, _ = inputs(model, 9 + i, B, S, torch.bfloat16)
        h64, pe64, _ = inputs(ref_model, 9 + i, B, S, torch.float64)
        with torch.no_grad():
            ref64 = ref_model.layers[0](h64, position_embeddings=pe64)
            same = model.layers[0](h, position_embeddings=pe)
            tw = TokenWeaveDecoderLayer(model.layers[0], dist.group.WORLD, token_split=split, split_min_tokens=0, config=cfg)
            got = _t(tw(h, position_embeddings=pe))
            again = _t(tw(h, position_embeddings=pe))
        torch.cuda.synchronize()
        _assert_close(f"rank {dist.get_rank()} B={B} S={S} split={split}", got, ref64, same, torch.bfloat16)
        assert torch.equal(got, again), "not deterministic across calls"
        out[(B, S)] = tw.handle(dev).path_for(B * S, 512, torch.bfloat16)
    assert tw.handle(dev).signal_pads_zero()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("split", [False, True])
def test_gpu_layer_matches_hf_symm(split):
    from test_fused_allreduce_rmsnorm import run_gpu_world

    print(run_gpu_world(2, "test_tokenweave_layer:_gpu_layer", split))


def _gpu_family_layer(family):
    """A layer of `family` (the HF tests' tiny config widened to hidden 256, 8 heads) on the GPU in
    fp32 through the symmetric-memory path with token splitting, against the HF layer: the sandwich
    norms' zero-residual fused op and local add_rmsnorm (gemma3_text), MoE blocks copied into the
    symmetric buffer (qwen3_moe), sinks in eager math with MoE (gpt_oss)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import tiny_config, weights_that_matter

    from ringattn.tokenweave import TokenWeaveConfig, TokenWeaveDecoderLayer

    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    over = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32, attn_implementation="eager")
    model = transformers.AutoModel.from_config(tiny_config(family, **over)).float().eval()
    g = weights_that_matter(model, family)
    model = model.to(dev)
    layer = model.layers[-1]
    tw = TokenWeaveDecoderLayer(layer, dist.group.WORLD, token_split=True, split_min_tokens=0,
                                config=TokenWeaveConfig(path="symm", timeout_s=30))
    B, S = 2, 300
    h = torch.randn(B, S, 256, generator=g).to(dev)
    kw = _hf_layer_kwargs(model, layer, h, torch.arange(S, device=dev)[None].expand(B, S))
    with torch.no_grad():
        ref, got, again = _t(layer(h, **kw)), _t(tw(h, **kw)), _t(tw(h, **kw))
    torch.cuda.synchronize()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"rank {dist.get_rank()} {family}: rel err {err}"
    assert torch.equal(got, again), "not deterministic across calls"
    assert tw.handle(dev).signal_pads_zero()
    return err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe", "gpt_oss"])
def test_gpu_sandwich_and_moe_layers_match_hf(family):
    from test_fused_allreduce_rmsnorm import run_gpu_world

    print(run_gpu_world(2, "test_tokenweave_layer:_gpu_family_layer", family))


def _w_sliding_window_drop_in(family, attn):
    """Sliding-window models (Mistral: every layer; Qwen2: layer 0 full, layer 1 sliding) with every
    layer swapped for TokenWeaveDecoderLayer: the model's own (sliding) masks, or none (the layer's
    band alone: a single layer against the HF layer given the band as its mask), equal the
    unsharded model; and the window changes that model's output (so the test sees it)."""
    import transformers

    from ringattn.tokenweave import TokenWeaveDecoderLayer

    W_ = 4
    extra = dict(sliding_window=W_) if family == "mistral" else dict(use_sliding_window=True, sliding_window=W_,
                                                                     max_window_layers=1)
    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]

    def make(**over):
        cfg = cls(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
                  num_hidden_layers=2, vocab_size=32, max_position_embeddings=256, **dict(extra, **over))
        cfg._attn_implementation = attn
        torch.manual_seed(3)
        model = transformers.AutoModel.from_config(cfg).eval().double()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[1] ** 0.5)
        return model

    model = make()
    nowin = make(sliding_window=None, **({} if family == "mistral" else dict(use_sliding_window=False)))
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 13, 64, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = model(inputs_embeds=h, use_cache=False).last_hidden_state
        differs = (nowin(inputs_embeds=h, use_cache=False).last_hidden_state - ref).abs().max().item()
        # one windowed layer, no mask given: the layer's own band against the HF layer with it as a mask
        li = 1
        pos = torch.arange(13)[None].expand(2, 13)
        pe = model.rotary_emb(h, pos)
        d = torch.arange(13)[:, None] - torch.arange(13)[None, :]
        band = torch.zeros(13, 13, dtype=torch.float64).masked_fill(~((d >= 0) & (d < W_)), torch.finfo(torch.float64).min)
        one_ref = _t(model.layers[li](h, attention_mask=band[None, None].expand(2, 1, 13, 13), position_embeddings=pe))
        one = _t(TokenWeaveDecoderLayer(model.layers[li], dist.group.WORLD, token_split=True, split_min_tokens=0)(
            h, attention_mask=None, position_embeddings=pe))
        windows = []
        for i, layer in enumerate(model.layers):
            model.layers[i] = TokenWeaveDecoderLayer(layer, dist.group.WORLD, token_split=True, split_min_tokens=0)
            windows.append(model.layers[i].window)
        got = model(inputs_embeds=h, use_cache=False).last_hidden_state
    scale = ref.abs().max().item()
    return dict(err=(got - ref).abs().max().item() / scale, one=(one - one_ref).abs().max().item() / scale,
                differs=differs / scale, windows=windows)


@pytest.mark.parametrize("family, attn", [("mistral", "sdpa"), ("qwen2", "eager")])
def test_sliding_window_layers_inside_hf_model(family, attn):
    for rank, r in enumerate(get_pool(2).run(_w_sliding_window_drop_in, family, attn, timeout=240)):
        assert r["err"] < 1e-6 and r["one"] < 1e-6, (rank, r)
        assert r["differs"] > 1e-3, (rank, r)  # the window matters for this model
        assert r["windows"] == ([4, 4] if family == "mistral" else [None, 4]), (rank, r)


# ---- families: which HF decoder layers the wrapper reproduces, and which it refuses ----------------


def _w_families():
    """Every family of the HF tests' FAMILY_CONFIGS the installed transformers has: a layer of the
    TOKENWEAVE_MODEL_TYPES, tensor-parallel over this world, against the unsharded HF layer
    (fp32, causal mask); any other family's layer must be refused, naming its model_type."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import FAMILY_CONFIGS, family_available, tiny_config, weights_that_matter

    from ringattn.tokenweave import TokenWeaveDecoderLayer
    from ringattn.tokenweave.layer import TOKENWEAVE_MODEL_TYPES

    out = {}
    for family in FAMILY_CONFIGS:
        if not family_available(family):
            continue
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(tiny_config(family, attn_implementation="eager")).float().eval()
        g = weights_that_matter(model, family)
        layer = model.layers[0]
        try:
            tw = TokenWeaveDecoderLayer(layer, token_split=False)
        except TypeError as e:
            out[family] = ("refused", str(e))
            continue
        B, S = 2, 11
        h = torch.randn(B, S, model.config.hidden_size, generator=g)
        kw = _hf_layer_kwargs(model, layer, h, torch.arange(S)[None].expand(B, S))
        with torch.no_grad():
            ref, got = _t(layer(h, **kw)), _t(tw(h, **kw))
        out[family] = ("ran", (got - ref).abs().max().item() / ref.abs().max().item(), family in TOKENWEAVE_MODEL_TYPES)
    return out


# HF families apply_sequence_parallel took on after the TokenWeave families were chosen (2026-12-07)
LATER_FAMILIES = ("apertus", "arcee", "dots1", "ernie4_5", "ernie4_5_moe", "glm4", "glm4_moe", "glm4_moe_lite",
                  "granitemoe", "granitemoeshared", "hunyuan_v1_dense", "hunyuan_v1_moe", "jetmoe", "minimax_m2",
                  "nemotron", "olmoe", "phi", "phimoe", "stablelm", "flex_olmo", "nanochat", "mellum", "jais2",
                  "solar_open", "ministral3", "hyperclovax", "minicpm3", "qwen2_moe", "seed_oss", "gpt_neox",
                  "persimmon", "cohere2", "cohere2_moe", "olmo3", "exaone4", "exaone_moe", "ministral", "cwm",
                  "afmoe", "laguna", "granite_swa", "gemma2", "vaultgemma")


def test_tokenweave_families_match_or_are_refused():
    from ringattn.tokenweave.layer import TOKENWEAVE_MODEL_TYPES

    for rank, out in enumerate(get_pool(2).run(_w_families, timeout=240)):
        ran = {f for f, r in out.items() if r[0] == "ran"}
        assert ran == set(TOKENWEAVE_MODEL_TYPES) & set(out), (rank, ran)
        for family, r in out.items():
            if r[0] == "ran":
                assert r[1] < 1e-5 and r[2], (rank, family, r)  # fp32 rounding only
            elif family in ("phi3", "olmo2", "cohere", "starcoder2", "glm",
                            "deepseek_v2", "deepseek_v3", "llama4_text"):  # (MLA: no k_proj / v_proj; Llama 4: no mlp)
                assert " lacks [" in r[1], (rank, family, r)  # a Llama part missing by name
            else:  # refused by model_type, or (families added later) for a part it lacks: named either way
                assert f"model_type='{family}'" in r[1] or (family in LATER_FAMILIES and " lacks [" in r[1]), \
                    (rank, family, r)
