"""TokenWeaveDecoderLayer with a Hugging Face KV cache: prefill, chunked prefill, decode and
generate() inside HF causal-LM models, tensor-parallel over real gloo ranks, against the unsharded
model running with its own cache.

Every rank builds the same tiny random model from a seed (transformers on CPU, no downloads),
swaps its decoder layers for TokenWeaveDecoderLayer (each rank's cache then holds its own KV-head
shard) and compares, step by step, with the unsharded float64 model:
- greedy generate() (and beam search): the same tokens, and per-step logits within tolerance, with left padding
  (the model's 4-D masks over cached + new keys), token splitting on (prefill halves inside a
  sequence: the past is read, then this call's keys appended after every half) and off (one range:
  the keys appended first, attention reads what the cache returns);
- a manual schedule (prefill 7, a chunk of 9 on top of the cache, three single-token steps) with
  sdpa (no mask: the layer's own causal band from position P) and eager (a float mask), and with
  Mistral sliding windows shorter than the context (transformers 5 keeps only the last window - 1
  keys per layer; 4.53 keeps all and masks), on the gloo fallbacks and on the fused kernel's
  protocol (host simulation, fp32);
- the stack (TokenWeaveDecoderStack + final norm) with a cache;
- refusals: a static cache, a cache filled by the unsharded model, a layer without layer_idx.
Tolerances: float64 runs compare within 1e-5 of the output's scale (HF's RMSNorm and rotary tables
run in float32 even for float64 models, so float64 is float32-accurate in places); fp32 runs within
2x the fp32 HF model's own error against float64 plus a 64-ulp floor.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import get_pool

transformers = pytest.importorskip("transformers")

_TOL64 = 1e-5


def _lm(family: str, seed: int, dtype=torch.float64, attn: str = "sdpa", window: int | None = None, hidden=64, inter=96,
        kv_heads=4):
    """A tiny random causal LM (Llama, or Mistral with `window`), weights scaled so attention and the
    MLP matter next to the residual."""
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    # Mistral: every layer windowed; Qwen2: layer 0 full, layer 1 windowed
    extra = {"mistral": dict(sliding_window=window), "llama": {},
             "qwen2": dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=1)}[family]
    cfg = cls(hidden_size=hidden, intermediate_size=inter, num_attention_heads=8, num_key_value_heads=kv_heads, num_hidden_layers=2,
              vocab_size=40, max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
              eos_token_id=None, **extra)  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.to(dtype)


def _dynamic_cache(model):
    try:
        return transformers.DynamicCache(config=model.config)  # transformers 5: sliding layers per config
    except TypeError:
        return transformers.DynamicCache()  # 4.x


def _swap(model, split: bool, config=None, fuse: bool = False):
    """Every decoder layer swapped for a TokenWeaveDecoderLayer over the world (the one-call API);
    fuse: all of them as one fused module (apply_tokenweave(fuse_layers=True))."""
    from ringattn.tokenweave import TokenWeaveDecoderLayer, apply_tokenweave

    n = len(model.model.layers)
    assert apply_tokenweave(model, token_split=split, split_min_tokens=0, config=config, fuse_layers=fuse) is model
    layers = model.model.layers[0].layers if fuse else model.model.layers
    assert len(model.model.layers) == (1 if fuse else n) and len(layers) == n
    assert all(isinstance(l, TokenWeaveDecoderLayer) for l in layers)
    return model


def _ids(seed: int, B: int, S: int, pad_row: int = 0):
    """Token ids (B, S) and the 2-D attention mask; the last row left-padded by pad_row tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if pad_row:
        ids[-1, :pad_row], am[-1, :pad_row] = 0, 0
    return ids, am


def _rel(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / b.double().abs().max().item()


# ---- generate() --------------------------------------------------------------------------------------


def _w_generate(split: bool, family: str, window, fuse=False):
    ref = _lm(family, 5, window=window)
    tw = _swap(_lm(family, 5, window=window), split, fuse=fuse)
    ids, am = _ids(6, 3, 9, pad_row=3)  # 27 prompt tokens: the prefill split falls inside sequence 1
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = tw.generate(ids, **kw)
    tag = f"rank {dist.get_rank()} split={split} {family} window={window} fuse={fuse}"
    assert a.sequences.tolist() == b.sequences.tolist(), f"{tag}: tokens {b.sequences.tolist()} != {a.sequences.tolist()}"
    errs = [_rel(y, x) for x, y in zip(a.logits, b.logits)]
    assert len(errs) == 6 and max(errs) < _TOL64, f"{tag}: per-step logits rel err {errs}"
    # beam search: HF expands the batch and reorders the cache's rows every step
    beam = dict(attention_mask=am, max_new_tokens=5, num_beams=3, num_return_sequences=2, pad_token_id=0,
                eos_token_id=None, do_sample=False)
    with torch.no_grad():
        a_b, b_b = ref.generate(ids, **beam), tw.generate(ids, **beam)
    assert a_b.tolist() == b_b.tolist(), f"{tag}: beam search {b_b.tolist()} != {a_b.tolist()}"
    return b.sequences.tolist()


@pytest.mark.parametrize("world, split, fuse", [(1, True, False), (2, True, False), (2, False, False),
                                               (4, True, False), (2, True, True), (4, False, True)])
def test_generate_matches_unsharded_model(world, split, fuse):
    seqs = get_pool(world).run(_w_generate, split, "llama", None, fuse, timeout=240)
    assert all(s == seqs[0] for s in seqs), "ranks generated different tokens"


@pytest.mark.parametrize("family, fuse", [("mistral", False), ("mistral", True), ("qwen2", True)])
def test_generate_sliding_window_past_the_window(family, fuse):
    """Window 4 < 9 prompt + 6 new tokens: the cache keeps (transformers 5) or masks (4.x) what the
    window drops. Qwen2: layer 0 full, layer 1 windowed; fused, both get layer 0's mask (layer 1's
    cache keeps fewer keys than it covers: its last columns)."""
    get_pool(2).run(_w_generate, True, family, 4, fuse, timeout=240)


def _family_lm(family: str, **over):
    """The HF tests' tiny config of `family` with 4 layers, float64, weights that matter
    (test_huggingface.weights_that_matter).
    Returns (model, attn implementation). sdpa, as HF's eager float64 turns left-padded rows into NaN;
    eager for Gemma 2, gpt-oss and Granite SWA, whose softcap / attention sinks have no sdpa path in
    transformers 5."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import tiny_config, weights_that_matter

    import ringattn.integrations.huggingface as rhf
    from ringattn.tokenweave.layer import _MOE_TYPES

    torch.manual_seed(0)
    moe = dict(experts_implementation="eager") if family in _MOE_TYPES else {}  # (grouped_mm takes no float64)
    attn = "eager" if family in rhf.SOFTCAP_MODEL_TYPES + ("gpt_oss", "granite_swa") else "sdpa"  # (no sdpa: softcap, sinks)
    kw = dict(num_hidden_layers=4, attn_implementation=attn, **moe)
    kw.update(over)
    m = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **kw)).double().eval()
    weights_that_matter(m, family)
    return m, attn


def _generate_both(ref, tw, pad_row: int):
    """Greedy generate() of both models (a batch of 2, 7 prompt tokens, 5 new): (same tokens, max
    per-step logits relative error)."""
    ids, am = _ids(3, 2, 7, pad_row=pad_row)
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        a, b = ref.generate(ids, **kw), tw.generate(ids, **kw)
    return a.sequences.tolist() == b.sequences.tolist(), max(_rel(y, x) for x, y in zip(a.logits, b.logits))


def _w_families_generate():
    """Every TokenWeave family the installed transformers has (_family_lm: 4 layers, so SmolLM3's
    NoPE layer 3 is in it), float64, every layer swapped: greedy generate() with left padding (sdpa
    models) gives the unsharded model's tokens and per-step logits. (Before 2026-12-07 SmolLM3's
    NoPE layers got RoPE: 6.6%.) Gemma 2 / 3: sliding and full layers alternating with a window of 4
    (shorter than the 12 tokens), so Gemma 3's two rotary tables (local and global) are both in play;
    Granite SWA: two RoPE bases and NoPE layers, windowed, attention sinks."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import FAMILY_CONFIGS, family_available

    from ringattn.tokenweave.layer import TOKENWEAVE_MODEL_TYPES

    win = {"gemma2": dict(sliding_window=4),
           "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
           # Granite SWA: layer 0 full, the rest sliding; RoPE bases per layer, 0 for NoPE layers (no table)
           "granite_swa": dict(sliding_window=4, layer_rope_theta=[10000.0, 0, 500000.0, 0], residual_multiplier=0.5)}
    out = {}
    for family in TOKENWEAVE_MODEL_TYPES:
        if family not in FAMILY_CONFIGS or not family_available(family):
            continue
        (ref, attn), (tw, _) = (_family_lm(family, **win.get(family, {})) for _ in range(2))
        out[family] = _generate_both(ref, _swap(tw, True), pad_row=2 if attn == "sdpa" else 0)  # (eager: no padding)
    return out


def _w_gemma3_fused():
    """Gemma 3 with apply_tokenweave(fuse_layers=True): all-sliding layers (one rotary table) generate
    like the unsharded model, the sandwich norms fused across layer boundaries; with full and sliding
    layers mixed (two tables) it is refused and the model left unchanged."""
    ref, _ = _family_lm("gemma3_text", layer_types=["sliding_attention"] * 4)
    tw, _ = _family_lm("gemma3_text", layer_types=["sliding_attention"] * 4)
    same, err = _generate_both(ref, _swap(tw, True, fuse=True), pad_row=2)
    mixed, _ = _family_lm("gemma3_text", layer_types=["full_attention", "sliding_attention"] * 2)
    before = list(mixed.model.layers)
    from ringattn.tokenweave import apply_tokenweave

    try:
        apply_tokenweave(mixed, fuse_layers=True)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return same, err, refusal, list(mixed.model.layers) == before


def _w_granite_swa_fused_refused():
    from ringattn.tokenweave import apply_tokenweave

    model, _ = _family_lm("granite_swa", layer_rope_theta=[10000.0, 0, 500000.0, 0])
    before = list(model.model.layers)
    try:
        apply_tokenweave(model, fuse_layers=True)
    except ValueError as e:
        return str(e), list(model.model.layers) == before
    return None, False


def test_granite_swa_layers_of_different_rope_bases_are_not_fused():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available

    if not family_available("granite_swa"):
        pytest.skip("this transformers has no Granite SWA")
    for msg, unchanged in get_pool(2).run(_w_granite_swa_fused_refused, timeout=120):
        assert msg and "rotary tables [10000.0, 500000.0]" in msg and unchanged, msg


def _w_fused_family(family):
    # (fused layers take layer 0's mask: gpt-oss's sliding and full layers could not be fused)
    over = dict(layer_types=["full_attention"] * 4) if family == "gpt_oss" else {}
    ref, attn = _family_lm(family, **over)
    tw, _ = _family_lm(family, **over)
    return _generate_both(ref, _swap(tw, True, fuse=True), pad_row=2 if attn == "sdpa" else 0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "hyperclovax"])
def test_fused_layers_of_moe_and_sandwich_families_generate_like_the_unsharded_model(family):
    """apply_tokenweave(fuse_layers=True) (each MLP all-reduce fused with the next layer's input norm,
    the token halves overlapping across layers) on an MoE family, gpt-oss (MoE with attention sinks;
    full-attention layers only: fused layers take layer 0's mask) and a sandwich-norm family."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available

    if not family_available(family):
        pytest.skip(f"this transformers has no {family}")
    for same, err in get_pool(2).run(_w_fused_family, family, timeout=240):
        assert same and err < _TOL64, (family, same, err)


def test_gemma3_fused_layers_generate_or_are_refused():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import family_available

    if not family_available("gemma3_text"):
        pytest.skip("this transformers has no Gemma 3")
    for same, err, refusal, unchanged in get_pool(2).run(_w_gemma3_fused, timeout=240):
        assert same and err < _TOL64, (same, err)
        assert refusal and "their tables differ" in refusal and unchanged, refusal


def test_every_tokenweave_family_generates_like_the_unsharded_model():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_huggingface import FAMILY_CONFIGS, family_available

    from ringattn.tokenweave.layer import TOKENWEAVE_MODEL_TYPES

    import ringattn.integrations.huggingface as rhf

    want = {f for f in TOKENWEAVE_MODEL_TYPES if f in FAMILY_CONFIGS and family_available(f)}
    for o in get_pool(2).run(_w_families_generate, timeout=300):
        assert set(o) == want, (sorted(o), sorted(want))
    # (transformers 4.53 predates gpt-oss, Granite SWA, ERNIE 4.5, HunYuan, Ministral 3, HyperCLOVA X)
    assert {"llama", "mistral", "qwen2", "gemma", "granite", "helium", "qwen3_moe", "mixtral", "gemma2",
            "gemma3_text"} <= want, sorted(want)
    if rhf._transformers_major() >= 5:
        assert {"gpt_oss", "granite_swa", "ernie4_5", "hunyuan_v1_dense", "ministral3", "hyperclovax",
                "qwen2_moe", "glm4_moe"} <= want, sorted(want)
        bad = {f: v for f, v in o.items() if not v[0] or v[1] > _TOL64}
        assert not bad, f"families whose TP generate differs (same tokens, max logits rel err): {bad}"


# ---- flash-attention-style models: 2-D padding masks, packing by position_ids / cu_seq_lens ----------


def _fa2_sim(model):
    """Make `model` hand its layers what a flash-attention model does (no flash_attn on CPU): its mask
    function is transformers' flash_attention_mask (a 2-D padding mask sliced to the keys, or None;
    packed sequences only as position_ids), so the swapped layers see exactly those inputs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("tw_fa2_sim", sdpa_attention_forward)
    AttentionMaskInterface.register("tw_fa2_sim", flash_attention_mask)
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation("tw_fa2_sim")
    else:
        model.config._attn_implementation = "tw_fa2_sim"
    return model


def _w_flash_style(family, window, fuse=False):
    ref = _lm(family, 20, window=window)
    tw = _fa2_sim(_swap(_lm(family, 20, window=window), True, fuse=fuse))
    seen = []  # the masks the layers were handed
    tag = f"rank {dist.get_rank()} {family} window={window}"
    # generate with left padding: 2-D masks over cached + new keys reach the layers
    ids, am = _ids(21, 3, 9, pad_row=3)
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True, output_logits=True)
    layer0 = tw.model.layers[0]  # (the fused module when fuse)
    hook = layer0.register_forward_pre_hook(
        lambda m, a, k: seen.append(None if k.get("attention_mask") is None else k["attention_mask"].dim()),
        with_kwargs=True)
    with torch.no_grad():
        a, b = ref.generate(ids, **kw), tw.generate(ids, **kw)
    hook.remove()
    assert 2 in seen and 4 not in seen, f"{tag}: the layers were handed masks of dims {seen}"
    assert a.sequences.tolist() == b.sequences.tolist(), f"{tag}: {b.sequences.tolist()} != {a.sequences.tolist()}"
    errs = [_rel(y, x) for x, y in zip(a.logits, b.logits)]
    assert max(errs) < _TOL64, f"{tag}: per-step logits rel err {errs}"
    # packed rows by position_ids (no cache): row 0 = documents of 5 and 7 tokens, row 1 = one of 12
    ids, _ = _ids(22, 2, 12)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].repeat(2, 1)
    pos[1] = torch.arange(12)
    with torch.no_grad():
        want = ref.model(ids, position_ids=pos, use_cache=False).last_hidden_state
        got = tw.model(ids, position_ids=pos, use_cache=False).last_hidden_state
        whole = ref.model(ids, position_ids=torch.arange(12)[None].repeat(2, 1), use_cache=False).last_hidden_state
    assert _rel(got, want) < _TOL64, f"{tag}: packed by position_ids, rel err {_rel(got, want):.3e}"
    assert _rel(want[0, 5:], whole[0, 5:]) > 1e-3, "the packing must change row 0's second document"
    # packed by cu_seq_lens alone (one flattened row: documents of 4, 4, 3, 4 -- none longer than
    # the windows, so one mask serves every layer; positions 0..14 on both sides, so only the
    # boundaries separate the documents): against the block-diagonal causal mask
    ids, _ = _ids(23, 1, 15)
    pos = torch.arange(15)[None]
    cu = torch.tensor([0, 4, 8, 11, 15], dtype=torch.int32)
    doc = torch.tensor([0] * 4 + [1] * 4 + [2] * 3 + [3] * 4)
    block = (doc[:, None] == doc[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    with torch.no_grad():
        want = ref.model(ids, attention_mask=block[None, None], use_cache=False).last_hidden_state
        got = tw.model(ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                       max_length_k=6).last_hidden_state
    assert _rel(got, want) < _TOL64, f"{tag}: packed by cu_seq_lens, rel err {_rel(got, want):.3e}"
    out = {}
    with torch.no_grad():
        for name, extra in (("batch", dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)),
                            ("q_ne_k", dict(cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 5, 8, 11, 15])))):
            x = ids.repeat(2, 1) if name == "batch" else ids
            try:
                tw.model(x, position_ids=pos.expand(x.shape[0], -1), use_cache=False, **extra)
                out[name] = "ran"
            except NotImplementedError as e:
                out[name] = str(e)
    return out


@pytest.mark.parametrize("family, window, fuse", [("llama", None, False), ("mistral", 4, False), ("qwen2", 4, True)])
def test_flash_attention_style_masks_and_packing(family, window, fuse):
    for o in get_pool(2).run(_w_flash_style, family, window, fuse, timeout=240):
        assert all("one flattened row (batch 1), q and k boundaries equal" in v for v in o.values()), o


def _w_replicated_kv():
    """Fewer KV heads than ranks (MQA, or 2 KV heads at 4 ranks): each KV head replicated on W / Hkv
    ranks; greedy generate() (split prefill, decode) equals the unsharded model, and each rank's cache
    holds exactly its KV head r // (W / Hkv)."""
    W, r = dist.get_world_size(), dist.get_rank()
    out = {}
    for hkv in (1, 2):
        if W % hkv or W <= hkv:
            continue
        ref = _lm("llama", 24, kv_heads=hkv)
        tw = _swap(_lm("llama", 24, kv_heads=hkv), True)
        ids, am = _ids(25, 3, 9, pad_row=2)
        kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            a, b = ref.generate(ids, **kw), tw.generate(ids, **kw)
            c_ref, c_tw = _dynamic_cache(ref), _dynamic_cache(tw)
            ref.model(ids, past_key_values=c_ref, use_cache=True)
            tw.model(ids, past_key_values=c_tw, use_cache=True)
        k_ref = c_ref.update(torch.zeros(3, hkv, 0, 8, dtype=torch.float64), torch.zeros(3, hkv, 0, 8, dtype=torch.float64), 0)[0]
        k_tw = c_tw.update(torch.zeros(3, 1, 0, 8, dtype=torch.float64), torch.zeros(3, 1, 0, 8, dtype=torch.float64), 0)[0]
        head = r // (W // hkv)
        out[hkv] = dict(tokens=a.sequences.tolist() == b.sequences.tolist(),
                        logits=max(_rel(y, x) for x, y in zip(a.logits, b.logits)),
                        cache=_rel(k_tw, k_ref[:, head : head + 1]), heads=k_tw.shape[1])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_kv_heads_replicated_when_fewer_than_ranks(world):
    for o in get_pool(world).run(_w_replicated_kv, timeout=240):
        assert set(o) == ({1, 2} if world == 4 else {1}), o
        for hkv, v in o.items():
            assert v["tokens"] and v["logits"] < _TOL64 and v["cache"] < _TOL64 and v["heads"] == 1, (hkv, v)


def _w_per_head_mask():
    """A (B, Hq, S, S) mask (a different key hidden from each head) reaches each rank as its query
    heads' slice: the layer equals the unsharded HF layer given the whole mask."""
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    model = _lm("llama", 26, attn="eager")
    B, S = 2, 7
    g = torch.Generator().manual_seed(27)
    h = torch.randn(B, S, 64, generator=g, dtype=torch.float64)
    pe = model.model.rotary_emb(h, torch.arange(S)[None])
    keep = torch.ones(S, S, dtype=torch.bool).tril()[None, None].repeat(B, 8, 1, 1)
    for head in range(8):
        keep[:, head, head % (S - 1) + 1 :, head % (S - 1)] = False  # each head loses one earlier key
    m = torch.zeros(B, 8, S, S, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    layer = model.model.layers[0]
    with torch.no_grad():
        want = layer(h, attention_mask=m, position_embeddings=pe)
        got = TokenWeaveDecoderLayer(layer, dist.group.WORLD, token_split=True, split_min_tokens=0)(
            h, attention_mask=m, position_embeddings=pe)
        plain = layer(h, attention_mask=m[:, :1], position_embeddings=pe)
    want, got, plain = (x[0] if isinstance(x, tuple) else x for x in (want, got, plain))
    return _rel(got, want), _rel(plain, want)


def test_per_head_mask_is_sliced_to_each_ranks_heads():
    for err, differs in get_pool(2).run(_w_per_head_mask, timeout=240):
        assert err < _TOL64 and differs > 1e-3, (err, differs)


# ---- manual schedule: prefill, chunk on top of the cache, decode steps ---------------------------------


def _w_chunks(family: str, attn: str, window, dtype, split: bool, path, symm_backend, fuse=False):
    from ringattn.tokenweave import TokenWeaveConfig

    config = TokenWeaveConfig(path=path, symm_backend=symm_backend or "cuda", one_shot_max_tokens=4, timeout_s=20) if path else None
    ref = _lm(family, 8, attn=attn, window=window)
    same = _lm(family, 8, dtype, attn=attn, window=window)
    tw = _swap(_lm(family, 8, dtype, attn=attn, window=window), split, config, fuse)
    B = 3  # 21 and 27 tokens: each split falls inside sequence 1
    ids, _ = _ids(9, B, 19)
    steps = [(0, 7), (7, 16), (16, 17), (17, 18), (18, 19)]  # prefill, a chunk of 9, three decode steps
    caches = {m: _dynamic_cache(m) for m in (ref, same, tw)}
    out = []
    with torch.no_grad():
        for s0, s1 in steps:
            h = {m: m.model(ids[:, s0:s1], past_key_values=caches[m], use_cache=True).last_hidden_state
                 for m in (ref, same, tw)}  # fmt: skip
            tag = (f"rank {dist.get_rank()} {family}/{attn} window={window} {dtype} split={split} path={path} "
                   f"fuse={fuse} step [{s0},{s1})")
            assert h[tw].shape == (B, s1 - s0, 64) and h[tw].dtype == dtype, tag
            err = _rel(h[tw], h[ref])
            if dtype == torch.float64:
                assert err < _TOL64, f"{tag}: rel err {err:.3e}"
            else:
                base = _rel(h[same], h[ref])
                assert err <= 2 * base + 64 * 2.0**-23, f"{tag}: rel err {err:.3e} > 2 x HF's own {base:.3e}"
            out.append(err)
    # the TP caches hold this rank's KV-head shard of every position the reference holds (or keeps)
    for li in range(2):
        k_ref = caches[ref].update(torch.zeros(B, 4, 0, 8, dtype=torch.float64),
                                   torch.zeros(B, 4, 0, 8, dtype=torch.float64), li)[0]  # fmt: skip
        k_tw = caches[tw].update(torch.zeros(B, 4 // dist.get_world_size(), 0, 8, dtype=dtype),
                                 torch.zeros(B, 4 // dist.get_world_size(), 0, 8, dtype=dtype), li)[0]  # fmt: skip
        hs = slice(dist.get_rank() * k_tw.shape[1], (dist.get_rank() + 1) * k_tw.shape[1])
        assert k_tw.shape[2] == k_ref.shape[2], (li, k_tw.shape, k_ref.shape)
        assert _rel(k_tw, k_ref[:, hs]) < (_TOL64 if dtype == torch.float64 else 1e-5), f"layer {li} cached keys"
    return out


@pytest.mark.parametrize("family, attn, window", [("llama", "sdpa", None), ("llama", "eager", None),
                                                  ("mistral", "sdpa", 4), ("mistral", "eager", 5)])
def test_chunked_prefill_and_decode_match(family, attn, window):
    get_pool(2).run(_w_chunks, family, attn, window, torch.float64, True, None, None, timeout=240)


@pytest.mark.parametrize("family, attn, window", [("llama", "eager", None), ("mistral", "sdpa", 4),
                                                  ("qwen2", "eager", 5), ("qwen2", "sdpa", 4)])
def test_chunked_prefill_and_decode_match_fused_layers(family, attn, window):
    get_pool(2).run(_w_chunks, family, attn, window, torch.float64, True, None, None, True, timeout=240)


def test_chunked_prefill_and_decode_match_four_ranks_no_split():
    get_pool(4).run(_w_chunks, "llama", "sdpa", None, torch.float64, False, None, None, timeout=240)


def test_chunked_prefill_and_decode_rs_ag_path():
    get_pool(2).run(_w_chunks, "mistral", "sdpa", 4, torch.float64, True, "rs_ag", None, timeout=240)


@pytest.mark.skipif(
    not __import__("ringattn.tokenweave.fused_allreduce_rmsnorm", fromlist=["_op_has_kernel"])._op_has_kernel("cpu"),
    reason="ringattn._C predates the tw op (rebuild the extension)",
)
@pytest.mark.parametrize("fuse", [False, True])
def test_chunked_prefill_and_decode_fused_kernel_protocol_host_sim(fuse):
    """The symm path (host-simulation kernel, fp32): two-shot for the prefill chunks, one-shot for
    the decode steps (one_shot_max_tokens=4 > 3 tokens); fused layers keep the residual sharded."""
    get_pool(2).run(_w_chunks, "llama", "eager", None, torch.float32, True, "symm", "host-sim", fuse, timeout=240)


# ---- the stack ---------------------------------------------------------------------------------------


def _w_stack():
    from ringattn.tokenweave import TokenWeaveDecoderStack

    ref = _lm("llama", 10)
    model = _lm("llama", 10)
    stack = TokenWeaveDecoderStack(model.model.layers, model.model.norm, dist.group.WORLD, token_split=True,
                                   split_min_tokens=0)  # fmt: skip
    ids, _ = _ids(11, 2, 12)
    c_ref, c_tw = _dynamic_cache(ref), _dynamic_cache(model)
    errs = []
    with torch.no_grad():
        for s0, s1 in [(0, 10), (10, 11), (11, 12)]:
            want = ref.model(ids[:, s0:s1], past_key_values=c_ref, use_cache=True).last_hidden_state
            h = model.model.embed_tokens(ids[:, s0:s1])
            pos = torch.arange(s0, s1)[None].expand(2, s1 - s0)
            got = stack(h, position_embeddings=model.model.rotary_emb(h, pos), past_key_values=c_tw)
            errs.append(_rel(got, want))
    assert max(errs) < _TOL64, f"rank {dist.get_rank()}: stack with a cache, rel errs {errs}"
    return errs


def test_stack_with_cache_matches():
    get_pool(2).run(_w_stack, timeout=240)


# ---- apply_tokenweave ---------------------------------------------------------------------------------


def _w_apply():
    from ringattn.integrations.huggingface import apply_sequence_parallel
    from ringattn.tokenweave import TokenWeaveDecoderLayer, apply_tokenweave

    out = {}
    ids, _ = _ids(16, 2, 6)
    ref = _lm("llama", 17)
    with torch.no_grad():
        want = ref(ids).logits
    # atomic: a layer it cannot wrap leaves every layer as it was
    model = _lm("llama", 17)
    first = model.model.layers[0]
    model.model.layers[1] = torch.nn.Linear(3, 3)
    try:
        apply_tokenweave(model)
        out["atomic"] = "applied"
    except TypeError as e:
        out["atomic"] = str(e) if model.model.layers[0] is first else "layer 0 was swapped: " + str(e)
    # applied once; a second call with the same group changes nothing
    model = apply_tokenweave(_lm("llama", 17))
    layers = list(model.model.layers)
    apply_tokenweave(model, dist.group.WORLD)
    out["idempotent"] = all(a is b for a, b in zip(layers, model.model.layers))
    # a forward in a graph (train mode, grad on): the same logits; a backward through the layers raises
    model.train()
    logits = model(ids).logits
    out["train_forward_err"] = _rel(logits, want)
    try:
        logits.sum().backward()
        out["backward"] = "ran"
    except RuntimeError as e:
        out["backward"] = str(e)
    # not combined with sequence parallelism
    sp = apply_sequence_parallel(_lm("llama", 17), algorithm="ring")
    try:
        apply_tokenweave(sp)
        out["sp"] = "applied"
    except ValueError as e:
        out["sp"] = str(e)
    out["layer_types"] = sorted({type(l).__name__ for l in model.model.layers})
    # attention weights: refused; hidden states: the reference's (transformers 4.x, recorded by the
    # model's loop) or refused (versions recording them by hooks on their own layer class)
    model.eval()
    with torch.no_grad():
        try:
            model(ids, output_attentions=True)
            out["attentions"] = "ran"
        except NotImplementedError as e:
            out["attentions"] = str(e)
        try:
            hs = model(ids, output_hidden_states=True).hidden_states
            want_hs = ref(ids, output_hidden_states=True).hidden_states
            out["hidden"] = max(_rel(a, b) for a, b in zip(hs, want_hs)) if len(hs) == len(want_hs) == 3 else len(hs)
        except NotImplementedError as e:
            out["hidden"] = str(e)
    # fused layers: one module in the model's loop; per-layer hidden states refused on every version
    fused = apply_tokenweave(_lm("llama", 17), fuse_layers=True)
    with torch.no_grad():
        out["fused_err"] = _rel(fused(ids).logits, want)
        try:
            fused(ids, output_hidden_states=True)
            out["fused_hidden"] = "ran"
        except NotImplementedError as e:
            out["fused_hidden"] = str(e)
    # fused layers get layer 0's mask: a windowed layer 0 with other windows elsewhere is refused
    odd = _lm("llama", 17)
    odd.model.layers[0].self_attn.sliding_window = 3
    try:
        apply_tokenweave(odd, fuse_layers=True)
        out["fused_window"] = "applied"
    except ValueError as e:
        out["fused_window"] = str(e) if not isinstance(odd.model.layers[0], TokenWeaveDecoderLayer) else "changed: " + str(e)
    return out


def test_apply_tokenweave_one_call():
    for o in get_pool(2).run(_w_apply, timeout=240):
        assert "Llama-style" in o["atomic"] and not o["atomic"].startswith("layer 0"), o
        assert o["idempotent"] is True and o["layer_types"] == ["TokenWeaveDecoderLayer"], o
        assert o["train_forward_err"] < _TOL64, o
        assert "inference-only" in o["backward"], o
        assert "sequence parallelism" in o["sp"], o
        assert "compute no attention weights" in o["attentions"], o
        assert o["fused_err"] < _TOL64 and "hidden states through TokenWeave layers (expected 2 + 1" in o["fused_hidden"], o
        assert "layer 0's mask, a sliding-window one (window 3)" in o["fused_window"], o
        assert (isinstance(o["hidden"], float) and o["hidden"] < _TOL64) or "recorded 0 hidden states" in str(o["hidden"]), o


def _w_check_inputs():
    """check_inputs: ranks fed different tokens (sampling with unequal seeds) get a ValueError on
    every rank; equal seeds sample the same tokens and pass."""
    from ringattn.tokenweave import TokenWeaveConfig

    model = _swap(_lm("llama", 18), True, TokenWeaveConfig(check_inputs=True))
    ids, _ = _ids(19, 2, 6)
    kw = dict(max_new_tokens=4, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    out = {}
    with torch.no_grad():
        torch.manual_seed(123)  # every rank alike
        out["same_seed"] = model.generate(ids, **kw).tolist()
        torch.manual_seed(1000 + dist.get_rank())  # ranks sample differently
        try:
            model.generate(ids, **kw)
            out["rank_seed"] = "ran"
        except ValueError as e:
            out["rank_seed"] = str(e)
    return out


def test_check_inputs_catches_ranks_sampling_differently():
    res = get_pool(2).run(_w_check_inputs, timeout=240)
    assert res[0]["same_seed"] == res[1]["same_seed"], res
    for o in res:
        assert "differ from rank 0's" in o["rank_seed"] and "seed every rank alike" in o["rank_seed"], o


# ---- refusals ----------------------------------------------------------------------------------------


def _w_refusals():
    from ringattn.tokenweave import TokenWeaveDecoderLayer

    out = {}
    model = _lm("llama", 12)
    full = _lm("llama", 12)
    ids, _ = _ids(13, 1, 5)
    with torch.no_grad():
        unsharded = _dynamic_cache(full)
        full.model(ids, past_key_values=unsharded, use_cache=True)  # 4 KV heads per layer
        _swap(model, False)
        try:
            model.model(ids[:, :1], past_key_values=unsharded, use_cache=True)
            out["unsharded"] = "ran"
        except ValueError as e:
            out["unsharded"] = str(e)
        try:
            static = transformers.StaticCache(config=model.config, max_cache_len=16)
        except TypeError:  # 4.x
            static = transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=16,
                                              dtype=torch.float64)  # fmt: skip
        try:
            model.model(ids, past_key_values=static, use_cache=True)
            out["static"] = "ran"
        except NotImplementedError as e:
            out["static"] = str(e)
        layer = model.model.layers[0]
        layer.layer_idx = None
        h = model.model.embed_tokens(ids)
        pe = model.model.rotary_emb(h, torch.arange(5)[None])
        try:
            layer(h, position_embeddings=pe, past_key_values=_dynamic_cache(model))
            out["layer_idx"] = "ran"
        except ValueError as e:
            out["layer_idx"] = str(e)
        try:
            layer(h, position_embeddings=pe, past_key_values=object())
            out["type"] = "ran"
        except TypeError as e:
            out["type"] = str(e)
        # use_cache without a cache object caches nothing (as the HF layer): it just runs
        y = layer(h, position_embeddings=pe, use_cache=True)
        out["use_cache"] = tuple((y[0] if isinstance(y, tuple) else y).shape)
    return out


def test_cache_refusals():
    for o in get_pool(2).run(_w_refusals, timeout=240):
        assert "cache filled by the unsharded model" in o["unsharded"] and "2 local KV heads" in o["unsharded"], o
        assert "static" in o["static"] and "DynamicCache" in o["static"], o
        assert "no layer_idx" in o["layer_idx"], o
        assert "must be a Hugging Face Cache" in o["type"], o
        assert o["use_cache"] == (1, 5, 64), o


# ---- GPU tier ----------------------------------------------------------------------------------------


def _gpu_chunks(window, fuse=False):
    """2 ranks on cuda:0 (MPS), the fused symm path, bf16: a split prefill of 2 x 700, a chunk of 37
    on top of the cache, four decode steps; each step against the float64 model (the 2x rule);
    fuse: the layers as one fused module (residual sharded between them)."""
    from ringattn.tokenweave import TokenWeaveConfig

    dev = torch.device("cuda", 0)
    family = "mistral" if window else "llama"
    kw = dict(window=window, hidden=512, inter=1024)
    ref = _lm(family, 14, **kw).to(dev)
    same = _lm(family, 14, torch.bfloat16, **kw).to(dev)
    tw = _swap(_lm(family, 14, torch.bfloat16, **kw).to(dev), True, TokenWeaveConfig(path="symm", timeout_s=30), fuse)
    ids = _ids(15, 2, 741)[0].to(dev)
    caches = {m: _dynamic_cache(m) for m in (ref, same, tw)}
    errs = []
    with torch.no_grad():
        for s0, s1 in [(0, 700), (700, 737), (737, 738), (738, 739), (739, 740), (740, 741)]:
            h = {m: m.model(ids[:, s0:s1], past_key_values=caches[m], use_cache=True).last_hidden_state
                 for m in (ref, same, tw)}  # fmt: skip
            torch.cuda.synchronize()
            err, base = _rel(h[tw], h[ref]), _rel(h[same], h[ref])
            assert err <= 2 * base + 64 * 2.0**-8, f"rank {dist.get_rank()} window={window} [{s0},{s1}): {err:.3e} > 2 x {base:.3e}"
            errs.append(round(err, 5))
    handle = (tw.model.layers[0].layers[0] if fuse else tw.model.layers[0]).handle(dev)
    dist.barrier()  # every rank's last call done before any pad is read
    assert handle.signal_pads_zero()
    return errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window, fuse", [(None, False), (256, True)])
def test_gpu_chunked_prefill_and_decode_symm(window, fuse):
    from test_fused_allreduce_rmsnorm import run_gpu_world

    print(run_gpu_world(2, "test_tokenweave_kv_cache:_gpu_chunks", window, fuse))
