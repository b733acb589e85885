"""Hugging Face sliding-window layers under apply_sequence_parallel: training steps and generate()
equal the single-process model (transformers' own eager attention with its sliding-window mask),
with the window shorter than the sequence, so leaving it out would fail. Families: every one in
SLIDING_WINDOW_MODEL_TYPES (all layers windowed, or Qwen2-style alternating full/sliding layers),
W = 1..3, both algorithms and layouts, transformers 4.53 and 5.x (CI runs both)."""
import copy

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import ringattn.integrations.huggingface as rhf  # noqa: E402
from test_huggingface import (SEQ, assert_close, compare, family_available, global_batch,  # noqa: E402
                              greedy_reference, padded_greedy_reference, reference, sp_step, tiny_model)

WINDOW = 5
# family -> config overrides that turn the window on (tiny configs: 2 layers)
WINDOWED = {
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),
    # layer 0 full, layer 1 sliding (max_window_layers: the first layers stay full)
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "smollm3": dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"]),
    # layer 0 sliding, layer 1 full (Gemma 3: 5 of 6 sliding; gpt-oss: alternating, with sinks)
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "gpt_oss": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    # (added 2026-12-07) interleaved families: layer 0 sliding, layer 1 full (Cohere 2 / Command A:
    # the full layers are NoPE; Granite SWA: with attention sinks)
    **{f: dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
       for f in ("cohere2", "cohere2_moe", "olmo3", "exaone4", "exaone_moe", "ministral", "afmoe", "laguna",
                 "granite_swa")},
    "cwm": dict(sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"]),
    # with attention-logit softcapping (Gemma 2)
    "gemma2": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "vaultgemma": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
}
# Families whose caches need an int window on sliding layers: "no window" = every layer full.
NO_WINDOW = {f: dict(layer_types=["full_attention", "full_attention"])
             for f in ("gemma3_text", "gpt_oss", "cohere2", "cohere2_moe", "olmo3", "exaone4", "exaone_moe", "ministral",
                       "afmoe", "laguna", "granite_swa", "cwm", "gemma2", "vaultgemma")}


def test_every_window_family_is_tested():
    assert set(WINDOWED) == set(rhf.SLIDING_WINDOW_MODEL_TYPES)


def no_window(family):
    """The same tiny config without the window."""
    if family in NO_WINDOW:
        return NO_WINDOW[family]
    kw = {k: v for k, v in WINDOWED[family].items() if k != "layer_types"}
    kw["sliding_window"] = None
    if "use_sliding_window" in kw:
        kw["use_sliding_window"] = False
    return kw


def windows_of(model):
    return [getattr(m, "_ringattn_window", "unset") for m in model.modules() if hasattr(m, "_ringattn_plan")]


def _check_windowed(world, families):
    out = {}
    input_ids, labels = global_batch(SEQ[world])
    for family in families:
        for algorithm, layout in (("ring", "zigzag"), ("token_ring", "contiguous"), ("auto", "zigzag")):
            model = tiny_model(family, **WINDOWED[family])
            ref = reference(model, input_ids, labels)
            # the window matters: the same model without it gives other logits (by > 5% of their
            # largest; the loss alone can hardly move: Cohere 2 scales its logits by 1/16)
            nowin = tiny_model(family, **no_window(family))
            differs = ((reference(nowin, input_ids, labels)[0] - ref[0]).abs().max() > 0.05 * ref[0].abs().max()).item()
            rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout)
            err = compare(model.ringattn_plan, ref, sp_step(model, input_ids, labels))
            out[(family, algorithm, layout)] = (err, differs, windows_of(model))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windowed_families_match_single_process(dist_pool, world):
    families = tuple(f for f in WINDOWED if family_available(f)) if world != 1 else ("mistral", "qwen2")
    results = dist_pool(world).run(_check_windowed, world, families, timeout=300)
    assert_close([{k: err for k, (err, _, _) in r.items()} for r in results])
    for rank, r in enumerate(results):
        for case, (_, differs, wins) in r.items():
            assert differs, (rank, case, "the window does not change this model's logits: the test would not see it")
            assert WINDOW in wins, (rank, case, wins)
    mixed = results[0][("qwen2", "ring", "zigzag")][2]
    assert mixed == [None, WINDOW], mixed  # Qwen2: layer 0 full, layer 1 sliding


def _generate_windowed(world):
    out = {}
    prompt, _ = global_batch(SEQ[world])
    steps = 2 * WINDOW  # decode runs past the window: the oldest keys drop out step by step
    # (+ Cohere 2: NoPE full layers; EXAONE 4: the window only on sliding layers; Granite SWA: sinks)
    for family in ("mistral", "qwen2", "phi3", "gemma3_text") + tuple(
            f for f in ("gpt_oss", "cohere2", "exaone4", "granite_swa", "gemma2") if family_available(f)):
        model = tiny_model(family, **WINDOWED[family])
        ref_tokens, ref_logits = greedy_reference(copy.deepcopy(model), prompt, steps)
        for algorithm, layout in (("ring", "zigzag"), ("token_ring", "contiguous")):
            m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm=algorithm, layout=layout)
            tokens, logits = rhf.generate(m, prompt, max_new_tokens=steps, return_logits=True)
            out[(family, algorithm, layout)] = (torch.equal(tokens, ref_tokens),
                                                max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)))
    # left-padded prompts with a window (transformers' generate() semantics on the full sequence,
    # step by step: cumsum positions, padded keys masked, the window over cache indices)
    model = tiny_model("mistral", **WINDOWED["mistral"])
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    mask[1, :7] = 0
    want, want_logits = padded_greedy_reference(copy.deepcopy(model), prompt, mask, steps)
    m = rhf.apply_sequence_parallel(copy.deepcopy(model), algorithm="auto", layout="zigzag")
    got, logits = rhf.generate(m, prompt, max_new_tokens=steps, attention_mask=mask, return_logits=True)
    out["left_padded"] = (torch.equal(got, want), max((a - b).abs().max().item() for a, b in zip(logits, want_logits)))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_generate_with_sliding_windows_matches_single_process(dist_pool, world):
    for rank, out in enumerate(dist_pool(world).run(_generate_windowed, world, timeout=300)):
        for case, (same, err) in out.items():
            assert same and err < 2e-5, (rank, case, same, err)


def _wrong_window():
    model = rhf.apply_sequence_parallel(tiny_model("mistral", **WINDOWED["mistral"]))
    model.config.sliding_window = 7  # changed after wrapping: the layers' calls no longer match
    input_ids, labels = global_batch(SEQ[dist.get_world_size()])
    try:
        sp_step(model, input_ids, labels)
        return "no error"
    except ValueError as e:
        return str(e)


def test_window_changed_after_wrapping_is_refused(dist_pool):
    for msg in dist_pool(2).run(_wrong_window, timeout=120):
        assert "sliding_window=7" in msg and "apply it again" in msg, msg


def _check_windowed_2d():
    out = {}
    input_ids, labels = global_batch(29)
    # gpt-oss: each Ulysses rank's ring gets its head block's sinks
    for family in ("qwen2",) + (("gpt_oss",) if family_available("gpt_oss") else ()):
        for algorithm, layout in (("ulysses+ring", "zigzag"), ("ulysses+token_ring", "contiguous")):
            model = tiny_model(family, **WINDOWED[family])
            ref = reference(model, input_ids, labels)
            rhf.apply_sequence_parallel(model, algorithm=algorithm, layout=layout, ulysses_size=2, use_deepspeed=False)
            out[(family, algorithm, layout)] = compare(model.ringattn_plan, ref, sp_step(model, input_ids, labels))
    return out


def test_windowed_layers_in_the_2d_ulysses_ring_modes(dist_pool):
    # 4 ranks = 2 (Ulysses, heads) x 2 (ring): the window holds in global positions on the ring
    assert_close(dist_pool(4).run(_check_windowed_2d, timeout=240))
