"""Sequence parallelism for Hugging Face Llama-style causal LMs (Llama, Mistral, Qwen2/3, ...).

    import ringattn.integrations.huggingface as rhf
    model = rhf.apply_sequence_parallel(model, group=None, algorithm="auto", layout="zigzag")
    batch = rhf.shard_batch(model, input_ids, labels)      # this rank's tokens, global positions,
                                                            # labels shifted on the GLOBAL sequence
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = rhf.sequence_parallel_loss(logits, batch["labels"], group=None)
    loss.backward()      # then all-reduce (sum) the parameter gradients over the group, or let
                         # DDP / DeepSpeed average them (grad_allreduce="mean", see below)

How it plugs in: transformers' attention modules ask ``ALL_ATTENTION_FUNCTIONS`` for the function
named by ``config._attn_implementation``. We register ``"ringattn_sp"`` there (and a matching
entry in the mask registry) and switch the model to it with ``set_attn_implementation``: no
private function is patched. The registered function receives this rank's Q/K/V after RoPE
(``(batch, heads, seq_local, head_dim)``) and runs ringattn's sequence-parallel attention over the
group, so every linear layer, norm, MLP and RoPE stays the model's own code.

Every rank feeds its shard of the sequence. RoPE needs each token's GLOBAL position, so a
forward pre-hook checks the shards collectively (one tiny all-gather per forward: lengths, batch
sizes, flags) and fills in ``position_ids`` (or checks the ones given) for the layout.

Packed sequences: ``shard_batch(model, input_ids, labels, cu_seqlens=...)`` (global document
boundaries) returns per-document positions and ``batch["cu_seqlens"]``; pass that to the model
(``model(..., cu_seqlens=batch["cu_seqlens"])``): the pre-hook takes it out of the kwargs, checks
that every rank passed the same, and attention stays inside each document (ringattn.documents).
Rows may pack differently (per-row boundaries).

Padded batches: ``shard_batch(model, input_ids, labels, attention_mask=mask)`` with left- or
right-padded rows; pass ``batch["attention_mask"]`` to the model. The pre-hook gathers the mask
(only when some rank holds padding) and turns each row's run of real tokens into per-row
boundaries, so every real token's output equals the unsharded model's under the mask.

Sliding-window layers (Mistral, Mixtral, Qwen2/3, Qwen3-MoE, Phi-3, StarCoder2, SmolLM3, Gemma 3,
gpt-oss: the families in ``SLIDING_WINDOW_MODEL_TYPES``, whose attention passes its window to the
attention function) run ringattn's causal sliding window, training and generate() alike; each
layer's call is checked against the window its config gives it. gpt-oss's attention sinks
(``s_aux``) run as ringattn's ``sinks=`` (ringattn.sinks). DeepSeek-V2/V3's multi-head latent
attention (v's head dim differs from q/k's) runs with v's own head dim. Llama 4's chunked layers
run as documents cut into chunks (``chunked_documents``) and its NoPE layers' attention-temperature
tuning with global positions (``temperature_scaled``; ``CHUNKED_MODEL_TYPES``).

Refused with an error instead of computed wrongly: model families other than the ones listed in
``SUPPORTED_MODEL_TYPES``, sliding windows in other families, attention-logit softcapping outside
``SOFTCAP_MODEL_TYPES`` (Gemma 2's runs as ringattn's ``softcap=``), attention sinks outside ``SINK_MODEL_TYPES``, bidirectional attention (Gemma 3's use_bidirectional_attention),
attention dropout, RoPE variants that depend on the sequence length (dynamic, longrope),
padding masks with zeros between real tokens (only left/right padding, or padding at the ends
of packed documents), custom 4-D masks, KV caches outside
``generate()`` (which prefills sequence-parallel and decodes over the sharded cache),
``labels=`` passed to the model (its built-in loss would shift labels inside each shard), and
families on transformers versions whose code bypasses the attention registry
(``MIN_TRANSFORMERS_MAJOR``). After every forward the attention calls that reached ringattn are
counted against the attention layers: a layer that bypassed it raises (``_base_post_hook``).
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "ringattn_sp"
# Decoder-only families whose attention is plain causal softmax attention over post-RoPE (or NoPE)
# Q/K/V dispatched through AttentionInterface, each checked exact against the single-process model
# on a tiny random config (tests/test_huggingface.py; the first three across the whole matrix).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "phi3", "olmo",
                         "olmo2", "granite", "cohere", "starcoder2", "glm", "helium", "smollm3", "gemma3_text",
                         "gpt_oss", "deepseek_v2", "deepseek_v3", "llama4_text",
                         # added 2026-12-07 (the same checks; most need transformers 5):
                         "apertus", "arcee", "dots1", "ernie4_5", "ernie4_5_moe", "glm4", "glm4_moe",
                         "glm4_moe_lite", "granitemoe", "granitemoeshared", "hunyuan_v1_dense", "hunyuan_v1_moe",
                         "jetmoe", "minimax_m2", "nemotron", "olmoe", "phi", "phimoe", "stablelm", "flex_olmo",
                         "nanochat", "mellum", "jais2", "solar_open", "ministral3", "hyperclovax", "minicpm3",
                         "qwen2_moe", "seed_oss", "gpt_neox", "persimmon",
                         "cohere2", "cohere2_moe", "olmo3", "exaone4", "exaone_moe", "ministral", "cwm", "afmoe",
                         "laguna", "granite_swa",
                         # attention-logit softcapping (SOFTCAP_MODEL_TYPES) and sliding layers
                         "gemma2", "vaultgemma")
# Families whose attention modules pass sliding_window= to the attention function (checked per
# layer against the config at every call, _attention_forward): their windows run exactly.
SLIDING_WINDOW_MODEL_TYPES = ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "starcoder2", "smollm3",
                              "gemma3_text", "gpt_oss", "cohere2", "cohere2_moe", "olmo3", "exaone4", "exaone_moe",
                              "ministral", "cwm", "afmoe", "laguna", "granite_swa", "gemma2", "vaultgemma")
# Families whose attention passes per-head attention-sink logits (s_aux=) to the attention
# function: they run as ringattn's sinks= (ringattn.sinks), training and generate() alike.
# (Granite SWA's sigmoid(lse - sink) output scale is the same extra softmax-denominator logit.)
SINK_MODEL_TYPES = ("gpt_oss", "granite_swa")
# Families whose attention passes softcap= (config.attn_logit_softcapping: every score s ->
# c * tanh(s / c)) to the attention function: run as ringattn's softcap= on every block.
SOFTCAP_MODEL_TYPES = ("gemma2", "vaultgemma")
# Families checked only against transformers 5's implementation. On 4.x these families' attention
# modules did not dispatch through AttentionInterface (one class per implementation chosen when the
# model was built, or a 4-D mask of their own), so the wrapped model attended over each rank's shard
# alone -- a silent wrong answer, found 2026-12-07 on 4.53.3 -- or raised. Refused there with why.
MIN_TRANSFORMERS_MAJOR = {f: 5 for f in ("granitemoe", "granitemoeshared", "jetmoe", "nemotron", "olmoe", "phimoe",
                                         "stablelm", "qwen2_moe", "persimmon")}
# Families with chunked-attention layers (config.layer_types "chunked_attention": causal inside
# fixed chunks of config.attention_chunk_size tokens, Llama 4): they run as packed documents cut
# into chunks (chunked_documents), so blocks of different chunks are skipped and K/V rotation
# stops early. Their NoPE layers' attention-temperature tuning (a per-position query scale) is
# applied here with each token's GLOBAL position (the module computes it from local indices).
CHUNKED_MODEL_TYPES = ("llama4_text",)
ALGORITHMS = ("auto", "ring", "token_ring", "ulysses", "ulysses+ring", "ulysses+token_ring", "ulysses+auto")
LAYOUTS = ("contiguous", "zigzag")
# RoPE variants whose frequencies depend only on the position (not on the sequence length seen
# by the forward): exact when each rank applies them to its own tokens' global positions.
_POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")


def layer_window(attn_module, config=None):
    """The causal sliding window a Hugging Face attention module applies (None: full attention):
    None where config.layer_types marks the layer "full_attention" (EXAONE 4 keeps the window in
    every layer's `sliding_window` attribute and passes it only on sliding layers; Qwen2-MoE keeps
    config.sliding_window=0 then), else the module's own `sliding_window` attribute (set per layer
    by Mistral/Qwen2-style modules), else its config's. apply_sequence_parallel and
    TokenWeaveDecoderLayer both read a layer's window with this rule; the attention call checks
    it against the window the module passes (a mismatch is an error, never a silent window)."""
    cfg = config if config is not None else getattr(attn_module, "config", None)
    types, idx = getattr(cfg, "layer_types", None), getattr(attn_module, "layer_idx", None)
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types) \
            and types[idx] == "full_attention":
        return None
    return getattr(attn_module, "sliding_window", getattr(cfg, "sliding_window", None))


# ----------------------------------------------------------------------------------------------
# Layout bookkeeping shared by the HF wrapper, the 2-D (Ulysses x ring) mode and the demo.
# ----------------------------------------------------------------------------------------------
def split_sizes(n: int, parts: int) -> list[int]:
    """n items in `parts` near-equal pieces, earlier pieces one bigger (ringattn's convention)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def layout_lengths(seq_len: int, world: int, layout: str) -> list[int]:
    """Tokens each of `world` ranks holds for a global sequence of `seq_len` tokens."""
    if layout == "contiguous":
        return split_sizes(seq_len, world)
    chunks = split_sizes(seq_len, 2 * world)  # zigzag: rank r holds chunks r and 2W-1-r
    return [chunks[r] + chunks[2 * world - 1 - r] for r in range(world)]


def _sp_module():
    """ringattn's sequence-parallel entry points (imported on use)."""
    from ringattn.layout import gather_sequence, shard_sequence
    from ringattn.sequence_parallel import sequence_parallel_attention

    return sequence_parallel_attention, shard_sequence, gather_sequence


def rank_lengths(seq_len: int, world: int, layout: str, ulysses_size: int = 1) -> list[int]:
    """Tokens held by each of `world` ranks (1-D, or 2-D with `ulysses_size` > 1: see
    SequenceParallelPlan)."""
    if ulysses_size == 1:
        return layout_lengths(seq_len, world, layout)
    segs = layout_lengths(seq_len, world // ulysses_size, layout)
    return [p for z in segs for p in split_sizes(z, ulysses_size)]


def valid_seq_len(seq_len: int, world: int, layout: str, ulysses_size: int = 1) -> bool:
    """Every rank gets at least one token (zigzag: at least one per chunk)."""
    if layout == "zigzag" and min(split_sizes(seq_len, 2 * (world // ulysses_size))) < 1:
        return False
    return min(rank_lengths(seq_len, world, layout, ulysses_size)) >= 1


def min_seq_len(world: int, layout: str, ulysses_size: int = 1) -> int:
    return next(n for n in itertools.count(1) if valid_seq_len(n, world, layout, ulysses_size))


def seq_len_error(seq_len: int, world: int, layout: str, algorithm: str = "auto", ulysses_size: int = 1) -> str | None:
    """None if `seq_len` tokens can be split over `world` ranks, else the message saying what to change."""
    if valid_seq_len(seq_len, world, layout, ulysses_size):
        return None
    return (
        f"ringattn: a global sequence of {seq_len} tokens is too short for {world} ranks with "
        f"layout={layout!r} (algorithm={algorithm!r}): every rank needs at least one token"
        f"{' of each of its two zigzag chunks' if layout == 'zigzag' else ''}. Use a sequence of at "
        f"least {min_seq_len(world, layout, ulysses_size)} tokens, fewer ranks, or layout='contiguous'."
    )


@dataclasses.dataclass
class SequenceParallelPlan:
    """Who holds which tokens and how attention runs across ranks.

    1-D (algorithm ring / token_ring / ulysses / auto): the group's W ranks hold the sequence in `layout`.
    2-D (algorithm ulysses+*): W = U x R ranks; SP rank g is ring index j = g // U and Ulysses
    index i = g % U. The ring layout over the R ring ranks gives segment Z_j; inside the Ulysses
    group j, Z_j is split contiguously into U pieces (earlier pieces bigger) and rank i holds
    piece i. Attention: all-to-all over heads inside the Ulysses group (each rank then holds Z_j
    for H/U heads), ring attention across the ring group, all-to-all back.
    """

    group: object  # torch.distributed ProcessGroup or None (= the default group)
    algorithm: str
    layout: str
    backend: str = "auto"
    ulysses_size: int = 1
    use_deepspeed: bool | None = None  # 2-D mode: DeepSpeed's DistributedAttention if importable
    ring_group: object = None
    ulysses_group: object = None

    def __post_init__(self):
        _require_initialised(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.world_size % self.ulysses_size:
            raise ValueError(
                f"ringattn: ulysses_size={self.ulysses_size} does not divide the group's "
                f"{self.world_size} ranks; choose a divisor of {self.world_size}"
            )
        self.ring_size = self.world_size // self.ulysses_size
        self.ring_rank, self.ulysses_rank = divmod(self.rank, self.ulysses_size)
        self.ring_algorithm = self.algorithm.split("+")[-1]
        self._seq_len = None  # global length of the forward in flight (set by the pre-hook)
        self._documents = None  # its packed-sequence boundaries (int64 CPU tensor) or None
        self._chunk = None  # chunked-attention layers' chunk size (Llama 4), else None
        self._chunk_documents = None  # the forward's boundaries cut into chunks (chunked layers)
        self._positions = None  # the forward's (batch | 1, seq_local) global positions (temperature tuning)
        self._serve = None  # generate(): _Serving state of the generation in flight, else None
        # eager forwards count the attention calls that reached ringattn (reset by the pre-hook,
        # checked against the prepared modules by the post-hook: _base_post_hook)
        self._attn_calls = 0
        self._op_calls = 0
        self._attn_layers = 0

    @property
    def is_2d(self) -> bool:
        return self.algorithm.startswith("ulysses+")

    # -- who holds what --------------------------------------------------------------------
    def local_lengths(self, seq_len: int) -> list[int]:
        """Tokens held by each rank of the group (indexed by group rank)."""
        return rank_lengths(seq_len, self.world_size, self.layout, self.ulysses_size)

    def min_seq_len(self) -> int:
        return min_seq_len(self.world_size, self.layout, self.ulysses_size)

    def check_seq_len(self, seq_len: int):
        msg = seq_len_error(seq_len, self.world_size, self.layout, self.algorithm, self.ulysses_size)
        if msg:
            raise ValueError(msg)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full (global) tensor whose `dim` is the sequence."""
        self.check_seq_len(x.shape[dim])
        _, shard_sequence, _ = _sp_module()
        if not self.is_2d:
            return shard_sequence(x, dim=dim, group=self.group, layout=self.layout)
        seg = shard_sequence(x, dim=dim, group=self.ring_group, layout=self.layout)
        sizes = split_sizes(seg.shape[dim], self.ulysses_size)
        return seg.narrow(dim, sum(sizes[: self.ulysses_rank]), sizes[self.ulysses_rank])

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of shard (collective over the group; not differentiable)."""
        _, _, gather_sequence = _sp_module()
        if not self.is_2d:
            return gather_sequence(x_local, dim=dim, group=self.group, layout=self.layout)
        seg = _all_gather_uneven(x_local, dim, self.ulysses_group)
        return gather_sequence(seg, dim=dim, group=self.ring_group, layout=self.layout)

    def positions(self, seq_len: int, device=None, documents: tuple | None = None) -> torch.Tensor:
        """Global positions of this rank's tokens, shape (1, local_len); with `documents` (packed
        sequences: global boundaries) each token's position inside its document, as RoPE sees a
        document on its own; per-row packings give (batch, local_len)."""
        return self.shard(_global_positions(seq_len, documents, device), dim=1)

    # -- attention ---------------------------------------------------------------------------
    def attention(self, q, k, v, *, causal: bool, softmax_scale: float | None, sliding_window: int | None = None,
                  sinks=None, chunked: bool = False, softcap=None):
        """q: (batch, seq_local, heads_q, head_dim); k, v: (batch, seq_local, heads_kv, head_dim).
        sliding_window: the layer's causal window (each query sees its w most recent keys).
        sinks: the layer's (heads_q,) attention-sink logits (ringattn.sinks), or None.
        chunked: a chunked-attention layer (Llama 4): the forward's boundaries cut into chunks.
        softcap: the layer's attention-logit softcapping (Gemma 2), or None."""
        docs = self._chunk_documents if chunked else self._documents
        if self.is_2d:
            from ringattn.integrations.deepspeed import ulysses_ring_attention

            return ulysses_ring_attention(q, k, v, plan=self, causal=causal, softmax_scale=softmax_scale,
                                          sliding_window=sliding_window, sinks=sinks,
                                          cu_seqlens=docs if chunked else None, softcap=softcap)
        sequence_parallel_attention, _, _ = _sp_module()
        return sequence_parallel_attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale, group=self.group,
            layout=self.layout, backend=self.backend, algorithm=self.algorithm, cu_seqlens=docs,
            sliding_window=sliding_window, sinks=sinks, softcap=softcap,
        )


def _all_gather_uneven(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate along `dim` the (possibly different-length) tensors of every rank in group."""
    n = torch.tensor([x.shape[dim]], device=x.device)
    ns = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ns, n, group=group)
    ns = [int(t) for t in ns]
    pad = list(x.shape)
    pad[dim] = max(ns)
    buf = x.new_zeros(pad)
    buf.narrow(dim, 0, x.shape[dim]).copy_(x)
    bufs = [torch.empty_like(buf) for _ in ns]
    dist.all_gather(bufs, buf.contiguous(), group=group)
    return torch.cat([b.narrow(dim, 0, m) for b, m in zip(bufs, ns)], dim=dim)


def _require_initialised(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ringattn: torch.distributed is not initialised. Call "
            "ringattn.distributed.init_distributed() (or torch.distributed.init_process_group) on "
            "every rank before apply_sequence_parallel / shard_batch / sequence_parallel_loss, or "
            "launch with launch/torchrun.sh, launch/mpirun.sh or launch/deepspeed.sh."
        )
    if group is not None and dist.get_rank(group) < 0:
        raise RuntimeError(
            f"ringattn: this process (global rank {dist.get_rank()}) is not a member of the group "
            "passed as group=; pass a group that contains every rank calling the model"
        )


# ----------------------------------------------------------------------------------------------
# Checks: what we refuse, with what to change.
# ----------------------------------------------------------------------------------------------
def _rope_type(config) -> str:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict) and isinstance(next(iter(rp.values()), None), dict):  # per layer type
        types = {v.get("rope_type", v.get("type", "default")) for v in rp.values()}
        bad = sorted(types - set(_POSITION_ONLY_ROPE))
        return bad[0] if bad else "default"
    return rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"


def check_supported(model) -> None:
    """Raise ValueError/TypeError naming what to change if `model` cannot run exactly under
    ringattn's sequence parallelism. Returns None when it can."""
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ringattn.integrations.huggingface needs transformers: pip install 'transformers>=5'") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"ringattn: apply_sequence_parallel expects a Hugging Face PreTrainedModel "
            f"(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, ...); got {type(model).__name__}"
        )
    cfg = model.config
    name = type(model).__name__
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"ringattn: {name} (model_type={mt!r}) is not supported by apply_sequence_parallel; "
            f"supported families (checked exact against the single-process model): "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Other architectures are refused rather than run "
            f"unchecked (different masks, position schemes or attention variants)."
        )
    if _transformers_major() < MIN_TRANSFORMERS_MAJOR.get(mt, 0):
        raise ValueError(
            f"ringattn: {name} (model_type={mt!r}) needs transformers >= {MIN_TRANSFORMERS_MAJOR[mt]} under ringattn "
            f"(found {_transformers_version()}): that version's {mt} code picks its own attention class or builds "
            "its own 4-D mask instead of dispatching through transformers' AttentionInterface / mask registry, so "
            "the wrapped model would attend over each rank's shard only (or fail). pip install -U 'transformers>=5'")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError(f"ringattn: {name} has config.use_bidirectional_attention=True; ringattn runs causal "
                         "decoder attention only")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"ringattn: {name} is an encoder-decoder model; only decoder-only causal LMs are supported")
    sw = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    windows = mt in SLIDING_WINDOW_MODEL_TYPES
    allowed = ("full_attention", "sliding_attention") if windows else ("full_attention",)
    if mt in CHUNKED_MODEL_TYPES:
        if _transformers_major() < 5:
            raise ValueError(
                f"ringattn: {name} (model_type={mt!r}) needs transformers >= 5 under ringattn (found "
                f"{_transformers_version()}): from 5.0 its chunked-attention mask counts chunks from each row's "
                "first real token, which ringattn follows; 4.x counted them from index 0, so a left-padded row "
                "would differ from the unsharded model. pip install -U 'transformers>=5'")
        allowed = ("full_attention", "chunked_attention")
        chunk = getattr(cfg, "attention_chunk_size", None)
        if layer_types is not None and "chunked_attention" in layer_types and (
                not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"ringattn: {name} has chunked-attention layers but config.attention_chunk_size="
                             f"{chunk!r}; expected an int >= 1")
    if layer_types is not None and any(t not in allowed for t in layer_types):
        raise ValueError(
            f"ringattn: {name} has attention layers of types {sorted(set(layer_types) - set(allowed))} "
            f"(config.layer_types); ringattn runs {' and '.join(allowed)} layers"
            + ("" if windows else f" for model_type={mt!r}") + ", and will not silently compute another "
            "attention. Use a config without them"
            + ("." if windows else " (e.g. sliding_window=None; sliding windows run in "
                                   f"{', '.join(SLIDING_WINDOW_MODEL_TYPES)}).")
        )
    if sw is not None and not windows and (layer_types is None or "sliding_attention" in layer_types):
        raise ValueError(
            f"ringattn: {name} has config.sliding_window={sw}; ringattn runs sliding windows for "
            f"{', '.join(SLIDING_WINDOW_MODEL_TYPES)} only and will not silently drop the window. Set "
            "config.sliding_window=None (exact when every sequence is at most the window long) or don't "
            "wrap this model."
        )
    if sw is not None and (layer_types is None or "sliding_attention" in layer_types) and (
            not isinstance(sw, int) or isinstance(sw, bool) or sw < 1):  # (unused when no layer slides)
        raise ValueError(f"ringattn: {name} has config.sliding_window={sw!r}; expected None or an int >= 1")
    for attr in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(cfg, attr, None) is not None and mt not in SOFTCAP_MODEL_TYPES:
            raise ValueError(f"ringattn: {name} uses attention-logit softcapping (config.{attr}); ringattn runs it "
                             f"for {', '.join(SOFTCAP_MODEL_TYPES)} only")
    if getattr(cfg, "attention_dropout", 0.0):
        raise ValueError(
            f"ringattn: {name} has config.attention_dropout={cfg.attention_dropout}; dropout on "
            "attention probabilities is not implemented by ringattn's attention. Set it to 0.0."
        )
    rt = _rope_type(cfg)
    if rt not in _POSITION_ONLY_ROPE:
        raise ValueError(
            f"ringattn: {name} uses RoPE type {rt!r}, whose frequencies depend on the sequence length "
            f"each forward sees (each rank sees only its shard). Supported: {', '.join(_POSITION_ONLY_ROPE)}."
        )
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ValueError(
            f"ringattn: {name} does not dispatch attention through transformers' AttentionInterface, "
            "so ringattn cannot plug in without patching private code; not supported"
        )


# ----------------------------------------------------------------------------------------------
# The functions transformers dispatches to.
# ----------------------------------------------------------------------------------------------
def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention-function signature. query: (batch, heads_q, seq_local, head_dim),
    key/value: (batch, heads_kv, seq_local, head_dim), after RoPE. Returns ((batch, seq_local,
    heads_q, head_dim), None)."""
    plan = getattr(module, "_ringattn_plan", None)
    if plan is None:
        raise RuntimeError(
            f"ringattn: {type(module).__name__} dispatched to {ATTN_IMPLEMENTATION!r} but was not prepared "
            "by ringattn.integrations.huggingface.apply_sequence_parallel (call it on the whole model)"
        )
    if not torch.compiler.is_compiling():
        plan._attn_calls += 1
    if attention_mask is not None:
        raise ValueError(
            "ringattn: a custom attention mask reached the sequence-parallel attention; only causal attention "
            "over the whole sequence, over packed documents (shard_batch(..., cu_seqlens=)) or with a 2-D "
            "padding mask given to the wrapped model's forward (its pre-hook turns it into boundaries) is "
            "supported (no 4-D masks)"
        )
    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens"):
        if kwargs.get(name) is not None:  # (the model's pre-hook takes them; this call bypassed it)
            raise ValueError(f"ringattn: {name} reached the attention of {type(module).__name__} directly; pass "
                             "packed-sequence boundaries to the wrapped model's forward (its pre-hook checks them "
                             "across ranks), not to an inner module")
    window = kwargs.get("sliding_window")
    want_window = getattr(module, "_ringattn_window", None)
    if window != want_window:
        raise ValueError(f"ringattn: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) asks for "
                         f"sliding_window={window!r}, but its config gives this layer {want_window!r} (config."
                         "sliding_window / layer_types changed after apply_sequence_parallel? apply it again)")
    softcap = kwargs.get("softcap")
    if softcap is not None and not getattr(module, "_ringattn_softcap", False):
        raise ValueError(f"ringattn: {type(module).__name__} asks for softcap={softcap!r}, but its family is not one "
                         f"ringattn checked with softcapping ({', '.join(SOFTCAP_MODEL_TYPES)})")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None and not getattr(module, "_ringattn_sinks", False):
        raise ValueError(f"ringattn: {type(module).__name__} passes attention sinks, but its family is not one "
                         f"ringattn checked with sinks ({', '.join(SINK_MODEL_TYPES)})")
    if dropout:
        raise ValueError(f"ringattn: attention dropout {dropout} is not supported; set config.attention_dropout=0.0")
    if kwargs.get("output_attentions"):
        raise ValueError("ringattn: output_attentions=True needs the full L x L matrix, which is never formed")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> (batch, seq_local, heads, head_dim)
    chunk = getattr(module, "_ringattn_chunk", None)
    temperature = getattr(module, "_ringattn_temperature", None)
    decode = plan._serve is not None and plan._serve.phase == "decode"
    if temperature is not None:  # Llama 4's NoPE layers: q scaled by its token's GLOBAL position
        pos = _decode_positions(plan, k.shape[1], q.shape[1]) if decode else plan._positions
        q = temperature_scaled(q, pos, *temperature)
    if decode:
        return _decode_attention(plan, q, k, v, scaling, window, sinks, chunk, softcap), None
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"ringattn: attention got {k.shape[1]} keys for {q.shape[1]} queries on rank {plan.rank}: "
                         "a KV cache outside ringattn.integrations.huggingface.generate() is not supported")
    if plan._seq_len is not None:
        expected = plan.local_lengths(plan._seq_len)[plan.rank]
        if q.shape[1] != expected:
            raise ValueError(f"ringattn: attention got {q.shape[1]} tokens on rank {plan.rank}, expected {expected}")
    out = plan.attention(q, k, v, causal=bool(causal), softmax_scale=scaling, sliding_window=window, sinks=sinks,
                         chunked=chunk is not None, softcap=softcap)
    return out, None


def _decode_positions(plan, n_keys: int, tq: int) -> torch.Tensor:
    """(batch, Tq) positions of a decode step's new tokens for the temperature tuning: their index
    in the row (L + generated so far + i) minus the start of the row's last packed document (as
    the prefill counts them: padding included, each packed document from 0)."""
    n_past = n_keys - plan._serve.prefill_local - tq
    first = torch.tensor(plan._serve.doc_start, dtype=torch.int64)[:, None]
    return plan._serve.prompt_len + n_past + torch.arange(tq)[None, :] - first


def temperature_scaled(q: torch.Tensor, positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4's attention-temperature tuning (arXiv 2501.19399) on q (batch, seq_local, heads, head_dim):
    q * (log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1) with pos (batch | 1, seq_local) the
    tokens' global positions, in fp32 and cast back, as transformers' Llama4TextAttention does with
    its local indices (which under sequence parallelism are not the positions)."""
    scales = torch.log1p(torch.floor((positions.to(q.device).float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q * scales[:, :, None, None]).to(q.dtype)


def chunked_documents(docs, seq_len: int, chunk: int):
    """Chunked attention (Llama 4's chunked layers: causal inside chunks of `chunk` tokens) as
    document boundaries: every segment of `docs` (as_documents' form: the packing and padding runs;
    None: the whole sequence) cut into `chunk`-token pieces from its own start. So a packed document
    is chunked as when run alone, and a left-padded row from its first real token (transformers'
    chunked mask counts chunks after the left padding). Returns as_documents' form (None: one
    document, i.e. plain causal attention)."""
    from ringattn.documents import packed, per_row

    def cut(row):
        out = [0]
        for a, b in zip(row, row[1:]):
            out.extend(range(a + chunk, b, chunk))
            out.append(b)
        return tuple(out)

    if docs is None:
        return packed(cut((0, seq_len)))
    if per_row(docs):
        return tuple(cut(r) for r in docs)
    return packed(cut(docs))


def _mask_forward(batch_size=None, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """Mask-registry entry: the ring computes causality itself, so no mask is built. The wrapped
    model's pre-hook takes a padding mask out of the kwargs (it becomes document boundaries), so
    a mask with zeros here means the inner model was called directly, bypassing that: refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ringattn: attention_mask has padding (zeros) but reached the mask builder directly; pass it to "
            "the wrapped model's forward (model(..., attention_mask=shard_batch(...)['attention_mask'])), whose "
            "pre-hook checks it across ranks and turns it into per-row boundaries"
        )
    return None


# The attention-function and mask registries this integration plugs into exist from 4.53 on.
MIN_TRANSFORMERS = (4, 53)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _transformers_release() -> tuple[int, int]:
    """(major, minor) of the installed transformers ("5.0.0rc1" -> (5, 0))."""
    parts = [int("".join(itertools.takewhile(str.isdigit, p)) or 0) for p in _transformers_version().split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def _transformers_major() -> int:
    return _transformers_release()[0]


def _check_transformers_version() -> None:
    found = _transformers_version()
    if _transformers_release() < MIN_TRANSFORMERS:
        raise ImportError(
            f"ringattn's Hugging Face integration needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (its AttentionInterface / AttentionMaskInterface "
            f"registries); found {found}. pip install -U 'transformers>=4.53'")


def _register_attention():
    _check_transformers_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_forward)


# Flags each rank contributes to the collective input check (bit set = problem on that rank).
_PADDING, _CACHE, _POSITIONS, _NO_INPUT, _DOCS, _DOCS_ALIAS = 1, 2, 4, 8, 16, 32
_FLAG_TEXT = {
    _PADDING: "attention_mask must be a 2-D (batch, seq_local) 0/1 padding mask of this rank's tokens "
              "(shard_batch(..., attention_mask=)['attention_mask']); custom 4-D masks are not supported",
    _CACHE: "past_key_values / use_cache=True: a KV cache is only kept by ringattn.integrations.huggingface."
            "generate() (sequence-parallel prefill, sharded cache)",
    _POSITIONS: "position_ids differ from this rank's global positions for the layout (packed sequences: "
                "the positions inside each document); pass shard_batch(...)['position_ids'] or leave "
                "position_ids=None (packed sequences also need cu_seqlens=shard_batch(...)['cu_seqlens'])",
    _DOCS: "cu_seqlens must be the global document boundaries: 0, then strictly increasing ints (a list or a "
           "1-D integer tensor; or one such row per batch row: a list of rows or a 2-D tensor)",
    _DOCS_ALIAS: "cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k (transformers' FlashAttentionKwargs) "
                 "must describe the packing's global boundaries: 0, then strictly increasing ints, q and k the "
                 "same (and the same as cu_seqlens where given), max_length_q/k at least the longest document",
    _NO_INPUT: "neither input_ids nor inputs_embeds was given",
}

# transformers' padding-free names (DataCollatorWithFlattening(return_flash_attn_kwargs=True),
# FlashAttentionKwargs): the model's forward would hand them to every attention call. ringattn takes
# them as the packing's global boundaries, like cu_seqlens, so they are never silently ignored.
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def resolve_documents(cu_seqlens=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                      max_length_k=None) -> tuple[tuple | None, str | None]:
    """The packing's global boundaries from ringattn's cu_seqlens and/or transformers'
    FlashAttentionKwargs names: (boundaries or None, None) or (None, what is wrong). The ones given
    must agree (ringattn's attention is self-attention: q and k boundaries are the same)."""
    from ringattn.documents import as_documents, per_row

    found = {}
    for name, value in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q),
                        ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is not None:
            docs, problem = as_documents(value)
            if problem:
                return None, f"{name}: {problem.replace('cu_seqlens ', '')}"
            found[name] = docs
    if len(set(found.values())) > 1:
        return None, ("the document boundaries disagree: "
                      + ", ".join(f"{n}={_show(d)}" for n, d in found.items())
                      + " (ringattn's attention is self-attention over one packing)")
    docs = next(iter(found.values()), None)
    for name, value in (("max_length_q", max_length_q), ("max_length_k", max_length_k)):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = int(value) if value.numel() == 1 else None
        if docs is None or not isinstance(value, int):
            return None, f"{name}={value!r} needs cu_seq_lens_q/k (or cu_seqlens) with it, and an int"
        longest = max(e - s for r in (docs if per_row(docs) else (docs,)) for s, e in zip(r[:-1], r[1:]))
        if value < longest:
            return None, f"{name}={value} is shorter than the longest document ({longest} tokens)"
    return docs, None


def _show(docs) -> str:
    """Boundaries for a message: [0, 5, 12], or [[0, 5, 12], [0, 12]] per row."""
    from ringattn.documents import per_row

    return str([list(r) for r in docs]) if per_row(docs) else str(list(docs))


def _row_documents_from_positions(row: torch.Tensor, b: int | None) -> tuple:
    where = "" if b is None else f"row {b}: "
    starts = (row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError(f"ringattn: {where}position_ids must start at 0 (got {int(row[0])}): shard_batch takes the "
                         "GLOBAL positions, before sharding")
    docs = tuple(starts) + (row.numel(),)
    expect = torch.arange(row.numel()) - torch.tensor(docs[:-1]).repeat_interleave(torch.tensor(docs).diff())
    if not torch.equal(row.to(torch.int64), expect):
        bad = int((row.to(torch.int64) != expect).nonzero()[0])
        raise ValueError(f"ringattn: {where}position_ids are neither 0..L-1 nor restart at 0 in every packed "
                         f"document (at token {bad}: {int(row[bad])}, expected {int(expect[bad])}); positions and "
                         "packing would disagree")
    return docs


def documents_from_position_ids(position_ids: torch.Tensor) -> tuple:
    """Global document boundaries of a packed batch from its GLOBAL position_ids (batch, seq) or
    (seq,), as DataCollatorWithFlattening makes them: every document's positions are 0, 1, ...,
    n-1. Plain positions 0..L-1 give (0, L). Rows that pack differently give per-row boundaries
    (a tuple of one tuple per row; ringattn.documents.as_documents). ValueError for positions
    that are not that."""
    from ringattn.documents import as_documents

    pos = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
    if position_ids.dim() not in (1, 2) or position_ids.dtype.is_floating_point or pos.shape[1] == 0:
        raise ValueError(f"ringattn: position_ids must be (batch, seq) integers, got {tuple(position_ids.shape)} "
                         f"{str(position_ids.dtype).replace('torch.', '')}")
    pos = pos.cpu()
    if bool((pos == pos[:1]).all()):
        return _row_documents_from_positions(pos[0], None)
    docs, problem = as_documents([_row_documents_from_positions(r, b) for b, r in enumerate(pos)])
    assert problem is None, problem  # every row ends at the same length
    return docs


def documents_from_mask(attention_mask: torch.Tensor, documents=None) -> tuple:
    """Boundaries that make attention with these per-row boundaries equal to causal attention
    under a 2-D padding mask: attention_mask (batch, seq) GLOBAL, 1 = real token, 0 = padding,
    with each row's real tokens one contiguous run (left or right padding), or with `documents`
    (a packing) one contiguous run inside each document. The run's ends become boundaries, so a
    real token sees exactly the real tokens before it (in its document), as HF's masked
    attention does; padded tokens see only padding (their outputs are meaningless either way).
    Returns as_documents' form (one tuple, or one per row). ValueError names the row and token
    of a 0 between real tokens, or a mask that is not 0/1."""
    from ringattn.documents import as_documents, documents_length, per_row

    m = attention_mask
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.is_complex():
        raise ValueError("ringattn: attention_mask must be a 2-D (batch, seq) 0/1 tensor, got "
                         f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
    m = m.detach().cpu()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("ringattn: attention_mask must hold only 0 (padding) and 1 (real token); got "
                         f"{sorted(set(m.flatten().tolist()))[:6]}")
    B, L = m.shape
    if documents is not None:
        if documents_length(documents) != L:
            raise ValueError(f"ringattn: the boundaries end at {documents_length(documents)}, but attention_mask "
                             f"covers {L} tokens")
        if per_row(documents) and len(documents) != B:
            raise ValueError(f"ringattn: {len(documents)} rows of boundaries for an attention_mask of {B} rows")
    m = m.to(torch.bool)
    rows = []
    for b in range(B):
        base = (documents[b] if per_row(documents) else documents) if documents is not None else (0, L)
        cuts = set(base)
        for s, e in zip(base[:-1], base[1:]):
            ones = m[b, s:e].nonzero().flatten()
            if ones.numel() == 0:
                continue  # an all-padding document (or row) stays as it is
            lo, hi = s + int(ones[0]), s + int(ones[-1]) + 1
            if hi - lo != ones.numel():
                hole = lo + int((~m[b, lo:hi]).nonzero()[0])
                where = f"document [{s}, {e}) of row {b}" if len(base) > 2 else f"row {b}"
                raise ValueError(
                    f"ringattn: attention_mask {where} has padding (0) at token {hole} between real tokens "
                    f"{lo} and {hi - 1}: only left or right padding is supported (each row's, or each packed "
                    "document's, real tokens one contiguous run); pack the sequences with cu_seqlens instead")
            cuts |= {lo, hi}
        rows.append(tuple(sorted(cuts)))
    docs, problem = as_documents(rows)
    assert problem is None, problem
    return docs


def _base_pre_hook(plan: SequenceParallelPlan):
    # Eager even under torch.compile: the checks read the exchanged lengths on the host, which
    # would break the graph anyway; one break here, before the model body (which then compiles
    # with the attention as one op: ringattn.compiled).
    @torch.compiler.disable(reason="ringattn: the sequence-parallel pre-hook checks the shards across ranks "
                                   "on the host (one small all_gather) before the model body runs")
    def hook(module, args, kwargs):
        plan._attn_calls, plan._op_calls = 0, _op_attention_calls()
        x = args[0] if args else kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if len(args) > 1:
            raise TypeError("ringattn: pass the model's arguments by keyword (input_ids=..., position_ids=...)")
        flags = 0
        if x is None:
            flags |= _NO_INPUT
        from ringattn.documents import (as_documents, documents_count, documents_crc, documents_length,
                                        documents_rows_problem, documents_tensor, packed)
        flash = {n: kwargs.pop(n) for n in _FLASH_KWARGS if n in kwargs}
        docs, docs_problem = as_documents(kwargs.pop("cu_seqlens", None))
        if docs_problem:
            flags |= _DOCS
        elif any(v is not None for v in flash.values()):
            docs, docs_problem = resolve_documents(docs, **flash)
            if docs_problem:
                flags |= _DOCS_ALIAS
        am = kwargs.get("attention_mask")
        pad = None  # this rank's (batch, seq_local) padding mask when it has zeros
        if am is not None:
            ok = (isinstance(am, torch.Tensor) and am.dim() == 2 and x is not None
                  and tuple(am.shape) == tuple(x.shape[:2]) and not am.is_complex()
                  and bool(((am == 0) | (am == 1)).all()))
            if not ok:
                flags |= _PADDING
            else:
                if not bool(am.all()):
                    pad = am
                kwargs["attention_mask"] = None  # all ones: the same as no mask; zeros: boundaries below
        serve = plan._serve
        if serve is not None and serve.phase == "decode":  # generate(): every rank feeds the same new token(s)
            return args, kwargs
        if serve is None:
            if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
                flags |= _CACHE
            kwargs["use_cache"] = False
        elif kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0:
            flags |= _CACHE  # a prefill starts from an empty cache
        seq_local, batch = (x.shape[1], x.shape[0]) if x is not None else (0, 0)
        device = x.device if x is not None else torch.device("cpu")
        if dist.get_backend(plan.group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        from ringattn.comm import control_group
        # on the host: the group's CPU backend, or the gloo twin of an NCCL-only group
        cgroup, device = control_group(plan.group, device)
        info = torch.tensor([seq_local, batch, flags, -1 if docs is None else documents_count(docs),
                             -1 if docs is None else documents_crc(docs), int(pad is not None)],
                            dtype=torch.int64, device=device)
        infos = [torch.zeros_like(info) for _ in range(plan.world_size)]
        dist.all_gather(infos, info, group=cgroup)
        infos = torch.stack(infos).cpu().tolist()
        _raise_flags(infos, 2)
        lens = [r[0] for r in infos]
        seq_len = sum(lens)
        if len({r[1] for r in infos}) != 1:
            raise ValueError(
                f"ringattn: ranks fed different batch sizes {[r[1] for r in infos]}; every rank must feed "
                "its shard of the same batch (shard_batch)"
            )
        if len({(r[3], r[4]) for r in infos}) != 1:
            raise ValueError(
                "ringattn: ranks passed different cu_seqlens (documents, crc32: "
                f"{[(r[3], r[4]) for r in infos]}); every rank must pass the same GLOBAL boundaries "
                "(shard_batch(...)['cu_seqlens'])")
        plan.check_seq_len(seq_len)
        if docs is not None and documents_length(docs) != seq_len:
            raise ValueError(
                f"ringattn: cu_seqlens ends at {documents_length(docs)}, but the ranks hold {seq_len} tokens in all: "
                "cu_seqlens are the GLOBAL document boundaries of the packed sequence (shard_batch(..., "
                "cu_seqlens=) returns them)")
        rows_problem = documents_rows_problem(docs, batch) if docs is not None else None
        if rows_problem:
            raise ValueError(f"ringattn: {rows_problem}")
        docs = packed(docs)
        expected = plan.local_lengths(seq_len)
        if lens != expected:
            raise ValueError(
                f"ringattn: mismatched shards: ranks hold {lens} tokens, but a {seq_len}-token sequence with "
                f"layout={plan.layout!r} over {plan.world_size} ranks (algorithm={plan.algorithm!r}) puts "
                f"{expected} on them. Shard with ringattn.integrations.huggingface.shard_batch(model, ...) "
                "using the same layout and algorithm the model was wrapped with."
            )
        attend = docs  # the boundaries attention uses: the packing, plus each row's padding runs
        if any(r[5] for r in infos):  # some rank has padding: every rank gathers the global mask
            local = (pad if pad is not None else torch.ones(batch, seq_local)).to(device=device, dtype=torch.int64)
            # (every rank holds the same global mask and boundaries: a hole is refused on all of them)
            attend = packed(documents_from_mask(plan.gather(local, dim=1), docs))
        pos = plan.positions(seq_len, device=x.device, documents=docs).expand(batch, -1)
        given = kwargs.get("position_ids")
        if given is None:
            kwargs["position_ids"] = pos
        else:
            same = given.dim() == 2 and given.shape[-1] == pos.shape[-1] and given.shape[0] in (1, batch)
            ok = same and bool((given == pos).all())
            if not ok and same and attend is not docs:
                # padded rows: on the real tokens, the positions may also restart at each row's first
                # real token (what generate()-style position_ids = cumsum(mask) - 1 give); padded
                # tokens' positions do not matter
                real = pad.to(torch.bool) if pad is not None else torch.ones_like(pos, dtype=torch.bool)
                alt = plan.positions(seq_len, device=x.device, documents=attend).expand(batch, -1)
                ok = bool((((given == pos) | ~real).all(-1) | ((given == alt) | ~real).all(-1)).all())
            bad = torch.tensor([0 if ok else _POSITIONS], dtype=torch.int64, device=device)
            bads = [torch.zeros_like(bad) for _ in range(plan.world_size)]
            dist.all_gather(bads, bad, group=plan.group)
            _raise_flags([[int(b)] for b in bads], 0)
        plan._seq_len = seq_len
        plan._documents = None if attend is None else documents_tensor(attend)
        plan._positions = pos  # (the temperature tuning's: inside each packed document, padding counted)
        if plan._chunk is not None:
            cut = chunked_documents(attend, seq_len, plan._chunk)
            plan._chunk_documents = None if cut is None else documents_tensor(cut)
        return args, kwargs

    return hook


def _raise_flags(rows, col):
    problems = []
    for bit, text in _FLAG_TEXT.items():
        ranks = [r for r, row in enumerate(rows) if row[col] & bit]
        if ranks:
            problems.append(f"ranks {ranks}: {text}")
    if problems:
        raise ValueError("ringattn: sequence-parallel forward refused:\n  " + "\n  ".join(problems))


def _top_pre_hook(module, args, kwargs):
    if kwargs.get("output_router_logits", getattr(module.config, "output_router_logits", False)):
        raise ValueError(
            "ringattn: output_router_logits=True on a sequence-parallel MoE model: its load-balancing loss "
            "(a product of two means over the tokens) would be computed over this rank's shard only, not "
            "the global sequence. Pass output_router_logits=False (config.output_router_logits=False).")
    if kwargs.get("labels") is not None:
        raise ValueError(
            "ringattn: don't pass labels= to a sequence-parallel model: its built-in loss shifts labels "
            "inside each shard, which drops/misaligns the tokens at shard borders. Use "
            "batch = shard_batch(model, input_ids, labels) and "
            "sequence_parallel_loss(outputs.logits, batch['labels'])."
        )
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def apply_sequence_parallel(model, group=None, algorithm: str = "auto", layout: str = "zigzag", *,
                            backend: str = "auto", ulysses_size: int | None = None,
                            use_deepspeed: bool | None = None):
    """Make `model` (a Llama / Mistral / Qwen2 causal LM) run its attention sequence-parallel over
    `group` (default: the whole world). Returns the same model object, modified in place.

    algorithm: "auto" (the cost model's pick among ring, token_ring and ulysses; the rings only
      under torch.compile) | "ring" (K/V rotation) | "token_ring" (Q rotation) | "ulysses"
      (ringattn's all-to-all to head shards over the whole group: W must divide the query heads,
      and the KV heads must divide or be a multiple of W) | "ulysses+ring" |
      "ulysses+token_ring" (2-D: DeepSpeed-Ulysses all-to-all over heads inside groups of
      `ulysses_size` consecutive ranks, ring across them; every rank of the default world must
      call this, as it creates process groups).
    layout: "zigzag" (balanced causal work) | "contiguous".
    Every rank must call it with the same arguments. Sets config.use_cache=False.
    """
    _check_transformers_version()  # first: a clear error before anything collective
    _require_initialised(group)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"ringattn: algorithm={algorithm!r}; choose one of {ALGORITHMS}")
    if layout not in LAYOUTS:
        raise ValueError(f"ringattn: layout={layout!r}; choose one of {LAYOUTS}")
    check_supported(model)
    cfg = model.config
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads  # (MHA families have none)
    plan_kwargs = {}
    if algorithm.startswith("ulysses+"):
        from ringattn.integrations.deepspeed import make_ulysses_ring_groups

        w = dist.get_world_size(group)
        u = ulysses_size or math.gcd(w, hkv)
        if u < 1 or w % u:
            raise ValueError(f"ringattn: ulysses_size={u} must divide the group's {w} ranks")
        if hkv % u or cfg.num_attention_heads % u:
            raise ValueError(
                f"ringattn: ulysses_size={u} must divide the number of key/value heads ({hkv}) and query "
                f"heads ({cfg.num_attention_heads}); the all-to-all splits heads across the Ulysses group"
            )
        ug, rg = make_ulysses_ring_groups(u, group)
        plan_kwargs = dict(ulysses_size=u, ulysses_group=ug, ring_group=rg, use_deepspeed=use_deepspeed)
    elif algorithm == "ulysses":
        from ringattn.ulysses import heads_problem

        problem = heads_problem(cfg.num_attention_heads, hkv, dist.get_world_size(group))
        if problem:
            raise ValueError(f"ringattn: {problem}")
    if not algorithm.startswith("ulysses+") and ulysses_size not in (None, 1):
        raise ValueError(f"ringattn: ulysses_size={ulysses_size} needs algorithm='ulysses+ring' or 'ulysses+token_ring'")
    plan = SequenceParallelPlan(group=group, algorithm=algorithm, layout=layout, backend=backend, **plan_kwargs)
    if plan.ulysses_size > 1:
        from ringattn.integrations.deepspeed import deepspeed_available, init_deepspeed_comm

        if use_deepspeed and not deepspeed_available():
            raise ImportError("ringattn: use_deepspeed=True but deepspeed cannot be imported "
                              "(pip install 'ringattn[deepspeed]'), or pass use_deepspeed=None/False")
        if use_deepspeed or (use_deepspeed is None and deepspeed_available()):
            init_deepspeed_comm()  # here, eagerly: a compiled model must not trace DeepSpeed's set-up

    previous = getattr(model, "_ringattn_previous_attn", None) or cfg._attn_implementation
    _register_attention()
    _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    if cfg._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"ringattn: {type(model).__name__} did not accept attn_implementation={ATTN_IMPLEMENTATION!r}")
    cfg.use_cache = False

    n_attn = 0
    for m in model.modules():
        if _is_attention_module(m):
            m._ringattn_plan = plan
            # the window this layer's attention passes (its own attribute, else the config's)
            m._ringattn_window = layer_window(m, cfg)
            # sinks are accepted only from families checked with them (SINK_MODEL_TYPES)
            m._ringattn_sinks = cfg.model_type in SINK_MODEL_TYPES
            m._ringattn_softcap = cfg.model_type in SOFTCAP_MODEL_TYPES
            if cfg.model_type in CHUNKED_MODEL_TYPES:
                types = getattr(cfg, "layer_types", None)
                if types is not None and types[m.layer_idx] == "chunked_attention":
                    m._ringattn_chunk = plan._chunk = cfg.attention_chunk_size
                if getattr(m, "attn_temperature_tuning", False) and not getattr(m, "use_rope", True):
                    m._ringattn_temperature = (float(m.floor_scale), float(m.attn_scale))
                    m.attn_temperature_tuning = False  # (ringattn applies it with global positions)
            n_attn += 1
    if n_attn != cfg.num_hidden_layers:
        raise ValueError(f"ringattn: found {n_attn} attention modules in {type(model).__name__}, expected {cfg.num_hidden_layers}")
    for h in getattr(model, "_ringattn_hooks", []):
        h.remove()
    base = model.base_model
    plan._attn_layers = n_attn
    hooks = [base.register_forward_pre_hook(_base_pre_hook(plan), with_kwargs=True),
             base.register_forward_hook(_base_post_hook(plan), with_kwargs=True)]
    if base is not model:
        hooks.append(model.register_forward_pre_hook(_top_pre_hook, with_kwargs=True))
    model._ringattn_hooks = hooks
    model._ringattn_previous_attn = previous
    model.ringattn_plan = plan
    return model


def _op_attention_calls() -> int:
    """Runs of the traced attention ops' implementations in this process (ringattn.compiled.CALLS):
    a compiled model body's attention calls, which the Python count in _attention_forward (run at
    trace time only) does not see."""
    from ringattn.compiled import CALLS

    return CALLS["sp_attention"] + CALLS["ulysses_attention"]


def _base_post_hook(plan: SequenceParallelPlan):
    """After a forward of the wrapped model's body: every prepared attention module must have
    called ringattn's attention once -- eagerly (_attention_forward's count) or through the traced
    op (compiled bodies) -- since the pre-hook reset the counts. One that did not (code that picks
    its attention class when the model is built, or calls a kernel itself) attended over this
    rank's shard alone: a wrong answer, raised here on every rank instead of returned. Traced by
    torch.compile (the hook compiled with its module), it is nothing: no check, no graph break."""
    def hook(module, args, kwargs, output):
        if torch.compiler.is_compiling():
            return None
        calls = plan._attn_calls + _op_attention_calls() - plan._op_calls
        if calls == plan._attn_layers:
            return None
        raise RuntimeError(
            f"ringattn: {calls} of the {plan._attn_layers} attention layers of {type(module).__name__} "
            f"reached ringattn's sequence-parallel attention in this forward (transformers {_transformers_version()}); "
            "the others attended over this rank's shard only, so the output is wrong. That attention code does not "
            "dispatch through transformers' AttentionInterface: not supported (try a newer transformers)")
    return hook


def _is_attention_module(m) -> bool:
    """A decoder layer's attention module: it has a layer_idx and either GQA's
    num_key_value_groups or (MHA families such as GPT-NeoX, Persimmon) an is_causal flag and a
    class name ending in "Attention". apply_sequence_parallel counts them against
    config.num_hidden_layers, so a family where this rule misses or over-counts is refused."""
    if not hasattr(m, "layer_idx"):
        return False
    return hasattr(m, "num_key_value_groups") or (hasattr(m, "is_causal") and type(m).__name__.endswith("Attention"))


def _set_attn_implementation(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(impl)
    else:  # 4.53: the attention modules read config._attn_implementation at every forward
        model.config._attn_implementation = impl


def remove_sequence_parallel(model, attn_implementation: str | None = None):
    """Undo apply_sequence_parallel (e.g. before save_pretrained, whose config would otherwise
    name "ringattn_sp"): removes the hooks and plans and restores the attention implementation
    the model had (or `attn_implementation`). Returns the model."""
    for h in getattr(model, "_ringattn_hooks", []):
        h.remove()
    for m in model.modules():
        if hasattr(m, "_ringattn_plan"):
            del m._ringattn_plan
        if hasattr(m, "_ringattn_window"):
            del m._ringattn_window
        if hasattr(m, "_ringattn_sinks"):
            del m._ringattn_sinks
        if hasattr(m, "_ringattn_softcap"):
            del m._ringattn_softcap
        if hasattr(m, "_ringattn_chunk"):
            del m._ringattn_chunk
        if hasattr(m, "_ringattn_temperature"):
            del m._ringattn_temperature
            m.attn_temperature_tuning = True
    impl = attn_implementation or getattr(model, "_ringattn_previous_attn", None) or "sdpa"
    _set_attn_implementation(model, impl)
    for attr in ("_ringattn_hooks", "_ringattn_previous_attn", "ringattn_plan"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def get_plan(model_or_plan) -> SequenceParallelPlan:
    if isinstance(model_or_plan, SequenceParallelPlan):
        return model_or_plan
    plan = getattr(model_or_plan, "ringattn_plan", None)
    if plan is None:
        module = getattr(model_or_plan, "module", None)  # DDP / DeepSpeed engine wrap the model
        plan = getattr(module, "ringattn_plan", None)
    if plan is None:
        raise ValueError("ringattn: this model was not wrapped by apply_sequence_parallel")
    return plan


# ----------------------------------------------------------------------------------------------
# Serving: sequence-parallel prefill, then decoding against the sharded KV cache.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Serving:
    phase: str = "prefill"   # "prefill" | "decode"
    prefill_local: int = 0   # this rank's prompt tokens in the cache (its shard)
    checked: bool = False    # the first decode step validated the shapes across ranks (later ones skip it)
    key_start: list | None = None  # left-padded prompts: each row's first real token (global), else None
    prompt_pos: torch.Tensor | None = None  # (S_r,) global positions of this rank's prompt tokens
    prompt_len: int = 0      # L, the (padded) prompt's global length: generated token t sits at index L + t
    doc_start: list | None = None  # each row's last packed document's start (0 unpacked): temperature positions


def _decode_attention(plan, q, k, v, scale, window=None, sinks=None, chunk=None, softcap=None):
    """One decode step of one layer. q: (B, Tq, Hq, D), the same on every rank; k, v: (B, S_r + n,
    Hkv, D), what the rank's DynamicCache returned: its prompt shard (S_r) then every generated
    token so far, the Tq new ones last (the generated ones are in every rank's cache). Each rank
    attends to its shard plus its 1/W slice of the earlier generated tokens; the new ones' causal
    block is sharded_kv_attention's. window: the layer's sliding window (keys older than the
    window are left out, like a left-padded row's padding). sinks: the layer's attention-sink
    logits, or None. chunk: a chunked-attention layer's chunk size (Llama 4): the new token sees the
    keys of its chunk only, chunks counted from each row's first real token of its last document
    (keys before the chunk's start are left out, like a window's). Returns (B, Tq, Hq, D)."""
    from ringattn.decode import sharded_kv_attention

    s_r, tq = plan._serve.prefill_local, q.shape[1]
    n_past = k.shape[1] - s_r - tq
    if n_past < 0:
        raise ValueError(f"ringattn: decode step got {k.shape[1]} cached keys on rank {plan.rank}, fewer than its "
                         f"{s_r} prompt tokens + {tq} new ones (was the cache made by generate()'s prefill?)")
    sizes = split_sizes(n_past, plan.world_size)
    off = s_r + sum(sizes[: plan.rank])
    gen = slice(off, off + sizes[plan.rank])
    starts = plan._serve.key_start
    L, g0 = plan._serve.prompt_len, sum(sizes[: plan.rank])  # this rank's generated keys: indices L+g0 ...
    if window is not None and L + n_past + tq - window > 0:  # the window no longer reaches index 0
        if tq > 1:
            raise ValueError(f"ringattn: a decode step of {tq} tokens with sliding_window={window} that no longer "
                             "reaches the prompt's start: one token per step only")
        lo_w = L + n_past + tq - window  # the first cache index the new token sees
        starts = [max(s, lo_w) for s in (starts or [0] * q.shape[0])]
    if chunk is not None:
        first = L + n_past  # index of the step's first new token
        base = plan._serve.key_start or [0] * q.shape[0]
        los = [b + (first - b) // chunk * chunk for b in base]  # its chunk's first index, per row
        if tq > 1 and any((first + tq - 1 - b) // chunk * chunk + b != lo for b, lo in zip(base, los)):
            raise ValueError(f"ringattn: a decode step of {tq} tokens crosses a chunk boundary of a chunked-attention "
                             f"layer (chunk {chunk}): one token per step there")
        if any(los):
            starts = [max(s, lo) for s, lo in zip(starts or [0] * q.shape[0], los)]
    # Steps after the first repeat its shapes exactly (same batch, heads, dtype; one token), so the
    # cross-rank check (an all_gather and a host sync per layer) runs in the first step only.
    check = not plan._serve.checked
    if not starts or not any(starts):
        return sharded_kv_attention(q, (k[:, :s_r], k[:, gen]), (v[:, :s_r], v[:, gen]), k_new=k[:, -tq:],
                                    v_new=v[:, -tq:], group=plan.group, softmax_scale=scale, backend=plan.backend,
                                    check=check, sinks=sinks, softcap=softcap)
    # Left-padded prompts: a row's padded prompt keys (global position < its first real token) are
    # left out; a sliding window leaves out every key before its start the same way. Rows with the
    # same first key share the pieces (this rank's runs of prompt keys at or after it, and its
    # generated keys at or after it); one call per distinct start, in the same order on every rank.
    out = torch.empty_like(q)
    for lo in sorted(set(starts)):
        rows = [b for b, s in enumerate(starts) if s == lo]
        whole = len(rows) == q.shape[0]  # (the usual case with a window: no copy of the cache)
        idx = torch.tensor(rows, device=q.device)
        kb, vb = (k, v) if whole else (k.index_select(0, idx), v.index_select(0, idx))
        runs, a = [], None
        for i, real in enumerate((plan._serve.prompt_pos >= lo).tolist() + [False]):
            if real and a is None:
                a = i
            elif not real and a is not None:
                runs.append((a, i))
                a = None
        g = slice(min(gen.stop, gen.start + max(0, lo - L - g0)), gen.stop)  # generated keys at index >= lo
        pk = tuple(kb[:, a:b] for a, b in runs) + (kb[:, g],)
        pv = tuple(vb[:, a:b] for a, b in runs) + (vb[:, g],)
        res = sharded_kv_attention(q if whole else q.index_select(0, idx), pk, pv, k_new=kb[:, -tq:],
                                   v_new=vb[:, -tq:], group=plan.group, softmax_scale=scale, backend=plan.backend,
                                   check=check, sinks=sinks, softcap=softcap)
        if whole:
            return res
        out[idx] = res
    return out


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | None = None,
             pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             logits_processor=None, return_logits: bool = False, attention_mask: torch.Tensor | None = None,
             cu_seqlens=None):
    """Generate with a sequence-parallel prefill and a KV cache that stays sharded.

    input_ids: (batch, prompt_len) GLOBAL prompt, the same on every rank. Prompts of different
    lengths: left-pad them and pass attention_mask (batch, prompt_len), 0 on the padding, as
    transformers' generate() takes it: positions then count from each row's first real token and
    no token attends to padding (prefill: per-row boundaries; decode: each row leaves its padded
    keys out, one sharded_kv_attention call per distinct padding length). Packed prompts:
    cu_seqlens (global boundaries, one packing or one per row, as in shard_batch): each row
    continues its LAST document (the earlier ones are prefilled, attended only inside themselves,
    and never seen by the generated tokens), also combined with left padding. Prefill: each rank runs its shard of the prompt through the model (ring /
    TokenRing attention, as in training) and keeps ITS shard of every layer's keys/values. Then
    each step feeds every rank the same new token at its global position; attention runs
    sharded_kv_attention over all ranks' caches (two small all-reduces per layer, no cache moves).
    Tokens are chosen on group rank 0 (greedy argmax, or sampling with temperature, top_k, top_p
    (transformers' TopPLogitsWarper) and `generator`, in transformers' order) and broadcast, so every
    rank returns the same (batch, prompt_len + n) tokens. logits_processor: transformers'
    LogitsProcessorList (or any callable (tokens so far (B, prompt_len + t), scores (B, vocab)) ->
    scores, e.g. RepetitionPenaltyLogitsProcessor), applied before the sampling warpers.
    Rows that emitted eos_token_id continue with pad_token_id (default: eos); generation stops
    when every row has, or after max_new_tokens. With return_logits=True also returns the list of
    each step's (batch, vocab) fp32 next-token logits.

    Memory: each rank's cache holds its prompt shard plus every generated token (the generated
    ones replicated, so long prompts with short answers are the case this serves); each rank
    attends only to 1/W of the generated ones. In the 2-D modes the prefill runs Ulysses x ring and
    the decode is the same (the cache holds each rank's piece with all heads, before the
    all-to-all)."""
    plan = get_plan(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("ringattn: generate() takes input_ids (batch, prompt_len) integer token ids, the GLOBAL prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"ringattn: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not (temperature > 0):
        raise ValueError(f"ringattn: temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"ringattn: top_p must be in (0, 1], got {top_p}")
    if logits_processor is not None and not callable(logits_processor):
        raise ValueError(f"ringattn: logits_processor must be callable (input_ids, scores) -> scores, got "
                         f"{type(logits_processor).__name__}")
    top_p_warper = None
    if do_sample and top_p is not None and top_p < 1.0:
        from transformers import TopPLogitsWarper

        top_p_warper = TopPLogitsWarper(top_p)
    from ringattn.layout import collective_device

    B, L = input_ids.shape
    dev = input_ids.device
    cdev = collective_device(plan.group, dev if dist.get_backend(plan.group) != "nccl" else
                             torch.device("cuda", torch.cuda.current_device()))
    root = dist.get_process_group_ranks(plan.group or dist.GroupMember.WORLD)[0] if plan.group is not None else 0
    # Who holds global token L-1 (the last of its shard): the last ring rank (contiguous) or ring
    # rank 0 (zigzag: chunks 0 and 2R-1), and there the last Ulysses piece (2-D; U = 1 in 1-D).
    owner = plan.world_size - 1 if plan.layout == "contiguous" else plan.ulysses_size - 1
    pad = eos_token_id if pad_token_id is None else pad_token_id
    from ringattn.documents import as_documents, documents_length, per_row

    docs = None
    if cu_seqlens is not None:  # packed prompts: each row continues its LAST document
        docs, problem = as_documents(cu_seqlens)
        if problem:
            raise ValueError(f"ringattn: generate() {problem}")
        if documents_length(docs) != L or (per_row(docs) and len(docs) != B):
            raise ValueError(f"ringattn: generate() cu_seqlens {_show(docs)} must be the prompt's global boundaries: "
                             f"ending at its length {L}" + (f", one row per prompt row ({B})" if per_row(docs) else ""))
    starts = [(docs[b] if per_row(docs) else docs)[-2] if docs is not None else 0 for b in range(B)]
    doc_start = list(starts)  # (the temperature tuning counts positions from here: padding included)
    attend, mask = docs, None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"ringattn: generate() attention_mask {got} must have the prompt's shape {(B, L)}")
        attend = documents_from_mask(attention_mask, docs)  # 0/1, no padding between real tokens
        m = attention_mask.to(torch.bool).cpu()
        bad = [b for b in range(B) if not bool(m[b, -1])]
        if bad:
            raise ValueError(f"ringattn: generate() takes LEFT-padded prompts (the last token of every row real); "
                             f"rows {bad} end in padding")
        # the first real token of each row's last document
        starts = [s + int(m[b, s:].long().argmax()) for b, s in enumerate(starts)]
        if not bool(m.all()):
            mask = attention_mask
    prefill_kw = {}
    if any(starts):
        # positions restart at every boundary: on real tokens, cumsum(mask) - 1 per document
        prefill_kw["position_ids"] = _global_positions(L, attend, input_ids.device).expand(B, -1)
        if mask is not None:
            prefill_kw["attention_mask"] = mask
        if docs is not None:
            prefill_kw["cu_seqlens"] = docs
    else:
        starts = None
    batch = shard_batch(plan, input_ids, **prefill_kw)
    plan._serve = _Serving()
    plan._serve.prompt_len = L
    plan._serve.prompt_pos = plan.shard(torch.arange(L).unsqueeze(0), dim=1)[0]
    plan._serve.doc_start = doc_start
    if starts:
        plan._serve.key_start = starts
    tokens, all_logits = input_ids, []
    try:
        # A plain DynamicCache (no config): sliding-window layers keep every key (the config's cache
        # would drop keys older than the window, which the sharded layout still indexes; the
        # window is applied by _decode_attention instead).
        from transformers import DynamicCache

        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True,
                    past_key_values=DynamicCache(),
                    logits_to_keep=1, **{k: batch[k] for k in ("attention_mask", "cu_seqlens") if k in batch})
        cache = out.past_key_values
        plan._serve.prefill_local = batch["input_ids"].shape[1]
        plan._serve.phase = "decode"
        logits = out.logits[:, -1].float().to(cdev)  # (B, vocab): the owner's is the real one
        dist.broadcast(logits, src=dist.get_global_rank(plan.group, owner) if plan.group is not None else owner,
                       group=plan.group)
        done = torch.zeros(B, dtype=torch.bool, device=cdev)
        for step in range(max_new_tokens):
            all_logits.append(logits.to(dev))
            seen = tokens.to(cdev) if logits_processor is not None or top_p_warper is not None else None
            scores = logits if logits_processor is None else logits_processor(seen, logits)
            if do_sample:
                scaled = scores / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                if top_p_warper is not None:
                    scaled = top_p_warper(seen, scaled)
                nxt = torch.multinomial(scaled.softmax(-1).cpu(), 1, generator=generator).flatten().to(cdev)
            else:
                nxt = scores.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            dist.broadcast(nxt, src=root, group=plan.group)  # group rank 0 decides, every rank follows
            tokens = torch.cat([tokens, nxt.to(dev, tokens.dtype)[:, None]], dim=1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            new_pos = torch.full((B, 1), tokens.shape[1] - 1, device=dev)
            if starts:  # left padding: positions count from each row's first real token
                new_pos = new_pos - torch.tensor(starts, device=dev)[:, None]
            out = model(input_ids=tokens[:, -1:], position_ids=new_pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            plan._serve.checked = True
            logits = out.logits[:, -1].float().to(cdev)
    finally:
        plan._serve = None
    return (tokens, all_logits) if return_logits else tokens


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets on the GLOBAL sequence: out[:, t] = labels[:, t+1], last = ignore_index
    (what transformers' causal-LM loss does before its cross-entropy)."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shard_batch(model_or_plan, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                *, ignore_index: int = -100, cu_seqlens=None, position_ids=None, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, seq_idx=None,
                attention_mask: torch.Tensor | None = None) -> dict:
    """Split a full batch (identical on every rank) into this rank's shard.

    input_ids, labels: (batch, seq) GLOBAL tensors. Returns input_ids and position_ids (this
    rank's tokens and their global positions) and, if labels are given, labels already shifted on
    the global sequence (feed them to sequence_parallel_loss, never to the model).

    Packed sequences: cu_seqlens = the global document boundaries (0, ..., seq): one packing for
    every batch row, or one per row (a list of rows, or a 2-D tensor whose rows repeat their last
    value as padding). Then position_ids restart at 0 in every document, each document's last
    label is ignore_index (no prediction across a document border), and the result holds
    "cu_seqlens" (an int64 tensor) to pass to the model with the rest:
    model(input_ids=..., position_ids=..., cu_seqlens=batch["cu_seqlens"]); attention then stays
    inside each document (ringattn.documents).

    transformers' padding-free batches work as they come: shard_batch(model, **collated) with a
    DataCollatorWithFlattening batch (input_ids, labels, position_ids, and with
    return_flash_attn_kwargs / return_seq_idx also cu_seq_lens_q/k, max_length_q/k, seq_idx):
    the packing is read from the GLOBAL position_ids (restarting at 0 per document; rows may pack
    differently) and every boundary given must agree (ValueError otherwise).

    Padded batches: attention_mask (batch, seq) GLOBAL 0/1, each row left- or right-padded (its
    real tokens one contiguous run; inside each document when packed). The result holds this
    rank's "attention_mask"; pass it to the model (model(..., attention_mask=batch["attention_mask"]))
    and every real token's logits equal the unsharded model's under that mask. Labels at padded
    positions become ignore_index (a padded token's output is not defined); position_ids are
    the unsharded forward's (0..L-1, or per document), and position_ids given here may instead
    restart at each row's first real token (cumsum(mask) - 1, as generate() makes them): on real
    tokens they must be one of the two (padded tokens' positions are free)."""
    from ringattn.documents import documents_length, documents_rows_problem, documents_tensor, packed, per_row

    plan = get_plan(model_or_plan)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("ringattn: shard_batch takes input_ids (batch, seq), the GLOBAL batch")
    B, L = input_ids.shape
    docs, problem = resolve_documents(cu_seqlens, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)
    if problem:
        raise ValueError(f"ringattn: {problem}")
    pad = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"ringattn: attention_mask {got} must have input_ids' shape {(B, L)} "
                             "(shard_batch takes the GLOBAL batch)")
        pad = None if bool(attention_mask.all()) else attention_mask
    derived = {}
    if position_ids is not None:
        if position_ids.shape[-1] != L:
            raise ValueError(f"ringattn: position_ids {tuple(position_ids.shape)} must have input_ids' sequence "
                             f"length {L} (shard_batch takes the GLOBAL batch)")
        if pad is None:  # a padded batch's positions are checked below instead of read as a packing
            derived["position_ids"] = documents_from_position_ids(position_ids)
    if seq_idx is not None:
        rows = seq_idx.reshape(-1, seq_idx.shape[-1])
        if rows.shape[-1] != L or rows.shape[0] not in (1, B):
            raise ValueError(f"ringattn: seq_idx {tuple(seq_idx.shape)} must be (batch, seq) with input_ids' shape")
        found = []
        for r in rows.cpu():
            found.append((0, *(r[1:] != r[:-1]).nonzero().flatten().add(1).tolist(), L))
        derived["seq_idx"] = found[0] if all(f == found[0] for f in found) else tuple(found)
    for name, d in derived.items():
        if docs is not None and d != docs:
            raise ValueError(f"ringattn: {name} says the documents are {_show(d)}, the boundaries given say "
                             f"{_show(docs)}")
        docs = d
    if docs is not None:
        if documents_length(docs) != L:
            raise ValueError(f"ringattn: cu_seqlens ends at {documents_length(docs)}, but input_ids hold {L} "
                             "tokens (cu_seqlens are the global boundaries of the packed sequence)")
        rows_problem = documents_rows_problem(docs, B)
        if rows_problem:
            raise ValueError(f"ringattn: {rows_problem}")
    packing = packed(docs)
    pos = plan.positions(L, device=input_ids.device, documents=packing).expand(B, -1)
    out = {"input_ids": plan.shard(input_ids, dim=1)}
    if pad is not None:
        attend = documents_from_mask(pad, docs)  # ValueError for padding between real tokens
        out["attention_mask"] = plan.shard(attention_mask, dim=1)
        if position_ids is not None:
            g = position_ids.reshape(-1, L).to(pos.device).expand(B, -1)
            real = pad.to(device=pos.device, dtype=torch.bool)
            ref = _global_positions(L, packing, pos.device).expand(B, -1)
            alt = _global_positions(L, attend, pos.device).expand(B, -1)
            ok = ((g == ref) | ~real).all(-1) | ((g == alt) | ~real).all(-1)
            if not bool(ok.all()):
                b = int((~ok).nonzero()[0])
                raise ValueError(f"ringattn: position_ids of row {b} are, on its real tokens, neither the unsharded "
                                 "forward's (0..L-1, per document when packed) nor restarting at the row's first real "
                                 "token (cumsum(attention_mask) - 1)")
            pos = plan.shard(g, dim=1)
    out["position_ids"] = pos
    if packing is not None:
        out["cu_seqlens"] = documents_tensor(packing)
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"ringattn: labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        shifted = shift_labels(labels, ignore_index)
        if packing is not None:
            for b, r in enumerate(packing if per_row(packing) else [packing] * B):
                shifted[b, [e - 1 for e in r[1:]]] = ignore_index
        if pad is not None:
            shifted = shifted.masked_fill(pad.to(shifted.device) == 0, ignore_index)
        out["labels"] = plan.shard(shifted, dim=1)
    return out


def _global_positions(seq_len: int, documents, device) -> torch.Tensor:
    """(rows, seq_len) positions restarting at 0 at every boundary (rows = 1 without per-row)."""
    from ringattn.documents import per_row

    g = torch.arange(seq_len, device=device)
    if documents is None:
        return g.unsqueeze(0)
    rows = []
    for r in (documents if per_row(documents) else (documents,)):
        bounds = torch.tensor(r, device=device)
        rows.append(g - bounds[torch.bucketize(g, bounds, right=True) - 1])
    return torch.stack(rows)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def sequence_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, group=None, *,
                           ignore_index: int = -100, grad_allreduce: str = "sum") -> torch.Tensor:
    """Mean token cross-entropy over the whole (global) sequence, equal to the single-process
    causal-LM loss: sum over ranks of token losses / global count of valid tokens.

    logits: (batch, seq_local, vocab); labels: (batch, seq_local) from shard_batch (already shifted).
    The returned value is the global loss on every rank; its gradient reaches only this rank's
    logits. Parameter gradients must then be summed over the group (grad_allreduce="sum", what
    you do by hand), or, if your trainer AVERAGES gradients over the group (DDP, DeepSpeed),
    pass grad_allreduce="mean": the backward is multiplied by the group size so the average is
    the exact single-process gradient. (Pass the model's plan.group as group for 2-D mode's
    whole group; None = the default group.)"""
    _require_initialised(group)
    if grad_allreduce not in ("sum", "mean"):
        raise ValueError(f"ringattn: grad_allreduce={grad_allreduce!r}; use 'sum' or 'mean'")
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"ringattn: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq_local); "
            "use the labels returned by shard_batch for this rank"
        )
    local = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                            ignore_index=ignore_index, reduction="sum")
    stats = torch.stack([local.detach().double(), (labels != ignore_index).sum().double().to(local.device)])
    dist.all_reduce(stats, group=group)
    total, count = stats[0].float(), stats[1].clamp(min=1).float()
    if grad_allreduce == "mean":
        local = _ScaleGrad.apply(local, float(dist.get_world_size(group)))
    # value: total / count on every rank; gradient: this rank's share only.
    return (local + (total - local.detach())) / count
