"""Sharded-KV attention for serving: the same queries on every rank, the keys split across the group.

After a sequence-parallel prefill each rank holds its shard of the KV cache; decoding then asks
every rank's queries (the same new token(s) everywhere) to attend over ALL ranks' keys, without
moving any cache:

    q:            (B, Tq, Hq, D)     the same on every rank (decode: Tq = 1; chunks / drafts: more)
    k/v_cache:    (B, S_r, Hkv, D)   rank r's cached keys/values (any S_r, 0 included; v may have
                                     its own head dim Dv, MLA, and then so does out), or a tuple
                                     of such pieces (e.g. a prefill shard and a slice of later
                                     tokens; no concatenation copy); every query sees every one
    k/v_new:      (B, Tq, Hkv, D)    optional, the same on every rank: the queries' own keys,
                                     causal among themselves (query i sees new keys 0..i)
    out:          (B, Tq, Hq, D)     softmax(q K^T * scale) V over every rank's keys (+ the new
                                     ones), identical on every rank; lse (B, Hq, Tq) fp32

Phases (one small class-free pipeline, all on the compute stream):
  1. local    each rank: (out_r, lse_r) of q over its cache pieces (block attention, merged in
              fp32); group rank W-1 also folds in the new keys' causal block
  2. max      all_reduce MAX of lse_r (B, Hq, Tq) -> m        (4 B * Tq * Hq * B per rank)
  3. sum      w_r = exp(lse_r - m); all_reduce SUM of [out_r * w_r | w_r] in fp32, one buffer
              (4 B * Tq * Hq * (D + 1) * B per rank)
  4. divide   out = sum(out_r w_r) / sum(w_r), lse = m + log(sum w_r); rows no key reaches
              (every rank empty, no new keys): out 0, lse -inf
  5. sinks    (sinks= given) out * sigmoid(lse - s_h), lse = logaddexp(lse, s_h) (ringattn.sinks)

The all-reduced buffers are bitwise the same on every rank, so every rank computes the same
output (generation does not diverge). Bytes per call do not depend on the cache length, and no
rank's cache travels: the point of keeping the cache sharded.

Inference only: a call that would need a backward is refused (ValueError); train with
ring_attention / token_ring_attention. Inputs are validated across ranks (one small all_gather:
shapes, dtypes, device type, scale, new keys or not) and the same ValueError is raised on every
rank. Whether q is really the same on every rank is not checked (that would read the data on
the host); the Hugging Face generate() feeds every rank the same tokens.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from ringattn.block_attention import block_attn_forward, check_softcap
from ringattn.layout import collective_device, dtype_code, group_rank_and_size, no_autocast
from ringattn.ops import merge_attn_states_
from ringattn.sinks import apply_sinks, sinks_problem

_MAGIC = 0x4B56_5348_04  # "KVSH", version 4 (2: sinks, 3: v's head dim may differ, 4: softcap)
_DEVICE_CODE = {"cpu": 1, "cuda": 2, "meta": 3, "xpu": 4, "mps": 5}
# Problem categories: one bit each in the signature, so every rank names every rank's problems.
_PROBLEMS = (
    "q must be a 4-D floating tensor (batch, Tq, heads_q, head_dim) with batch, heads, head_dim > 0",
    "k_cache / v_cache / k_new / v_new must be tensors (batch, seq, heads_kv, head_dim) agreeing with q and "
    "with each other (k_new and v_new go together, with Tq tokens)",
    "every tensor must have q's dtype",
    "every tensor must be on q's device",
    "heads_q must be a multiple of heads_kv",
    "softmax_scale must be a finite number > 0",
    "inference only (no backward): call it under torch.no_grad() / torch.inference_mode(), or train with "
    "ring_attention / token_ring_attention",
    "the requested block-attention backend cannot run these inputs",
    "sinks must be None or a 1-D floating tensor of heads_q logits on q's device",
    "softcap must be None, 0 (off) or a finite number > 0",
)
_P_Q, _P_SHAPE, _P_DTYPE, _P_DEVICE, _P_HEADS, _P_SCALE, _P_GRAD, _P_BACKEND, _P_SINKS, _P_SOFTCAP = (
    1 << i for i in range(len(_PROBLEMS)))
_FIELDS = ("magic", "group_size", "group_ranks", "batch", "tq", "hq", "hkv", "d", "dtype", "device",
           "scale", "new", "sinks", "dv", "softcap", "problems")
_IX = {f: i for i, f in enumerate(_FIELDS)}
_AGREE = (("the call (ranks called different ringattn functions or versions)", "magic"),
          ("group size", "group_size"), ("group ranks (crc32)", "group_ranks"), ("batch", "batch"),
          ("number of queries Tq", "tq"), ("heads_q", "hq"), ("heads_kv", "hkv"), ("head_dim", "d"),
          ("dtype (codes)", "dtype"), ("device type (codes)", "device"), ("softmax_scale (float bits)", "scale"),
          ("whether k_new/v_new were given", "new"), ("sinks (number of logits; -1: none)", "sinks"),
          ("v's head_dim", "dv"), ("softcap (float bits; -1: none)", "softcap"))


def _pieces(x, name: str) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise ValueError(f"ringattn sharded_kv_attention: {name} must be a tensor (B, S_r, Hkv, D) or a non-empty "
                     f"tuple of them, got {type(x).__name__}")


def _local_problems(q, ks, vs, k_new, v_new, scale, sinks=None) -> tuple[int, list[str]]:
    """(problem bits, details) of this rank's inputs; (0, []) when they are fine."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point() or min(
            q.shape[0], q.shape[2], q.shape[3]) <= 0:
        return _P_Q, [f"q: {tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}"]
    B, Tq, Hq, D = q.shape
    bits, detail = 0, []
    hkv = ks[0].shape[2] if ks[0].dim() == 4 else None
    dv = vs[0].shape[3] if vs[0].dim() == 4 else None  # v's head dim (MLA: may differ from q/k's)
    named = [(f"k_cache[{i}]", k) for i, k in enumerate(ks)] + [(f"v_cache[{i}]", v) for i, v in enumerate(vs)]
    if k_new is not None or v_new is not None:
        named += [("k_new", k_new), ("v_new", v_new)]
    if len(ks) != len(vs):
        bits |= _P_SHAPE
        detail.append(f"k_cache has {len(ks)} pieces, v_cache {len(vs)}")
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            bits |= _P_SHAPE
            detail.append(f"{name} is {type(t).__name__}")
            continue
        want_s = Tq if name.endswith("new") else (t.shape[1] if t.dim() == 4 else -1)
        want_d = dv if name.startswith("v") else D
        if t.dim() != 4 or tuple(t.shape) != (B, want_s, hkv, want_d) or not want_d:
            bits |= _P_SHAPE
            seq = f"Tq={Tq}" if name.endswith("new") else "seq"
            detail.append(f"{name} {tuple(t.shape)}, expected (batch={B}, {seq}, heads_kv={hkv}, head_dim={want_d})")
        if t.dtype != q.dtype:
            bits |= _P_DTYPE
            detail.append(f"{name} is {t.dtype}, q is {q.dtype}")
        if t.device != q.device:
            bits |= _P_DEVICE
            detail.append(f"{name} is on {t.device}, q on {q.device}")
    for i, (k, v) in enumerate(zip(ks, vs)):
        if k.shape[:3] != v.shape[:3]:
            bits |= _P_SHAPE
            detail.append(f"k_cache[{i}] {tuple(k.shape)} and v_cache[{i}] {tuple(v.shape)} differ")
    if hkv and Hq % hkv:
        bits |= _P_HEADS
        detail.append(f"heads_q={Hq}, heads_kv={hkv}")
    if not (scale > 0 and math.isfinite(scale)):
        bits |= _P_SCALE
        detail.append(f"softmax_scale={scale}")
    s_problem = sinks_problem(sinks, Hq, q.device)
    if s_problem:
        bits |= _P_SINKS
        detail.append(s_problem)
    tensors = [q] + [t for _, t in named if isinstance(t, torch.Tensor)]
    if isinstance(sinks, torch.Tensor):
        tensors.append(sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        bits |= _P_GRAD
        detail.append("an input requires grad and grad mode is on")
    return bits, detail


def _exchange(sig: list[int], group, world: int, device) -> list[list[int]]:
    """The sequence-parallel signature exchange (polled, with its timeout), padded to the same
    length as its signature: a rank calling ring attention while another calls this one then
    gets the magic mismatch named, not an all_gather of two sizes."""
    from ringattn.sequence_parallel import _FIELDS as SP_FIELDS, _Local, _exchange as sp_exchange

    ranks = dist.get_process_group_ranks(group or dist.GroupMember.WORLD)
    padded = sig + [0] * (len(SP_FIELDS) - len(sig))
    table = sp_exchange("ringattn sharded_kv_attention", group, world, ranks, _Local(padded, None), device)
    return [row[:len(sig)] for row in table]


def _check(q, ks, vs, k_new, v_new, *, group, softmax_scale, backend, sinks=None,
           softcap=None) -> tuple[int, int, float, float]:
    """Validate across the group; (rank, world, scale, softcap) or the same ValueError on every rank."""
    from ringattn.sequence_parallel import _float_bits
    rank, world = group_rank_and_size(group)
    scale = softmax_scale
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[3] > 0:
        scale = 1.0 / math.sqrt(q.shape[3])
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = float("nan")
    bits, detail = _local_problems(q, ks, vs, k_new, v_new, scale, sinks)
    try:
        cap = check_softcap("ringattn sharded_kv_attention", softcap)
    except ValueError as e:
        cap, bits = 0.0, bits | _P_SOFTCAP
        detail.append(str(e))
    if not bits and backend != "auto":
        try:  # zero-length probe: the backend's support checks, nothing computed
            block_attn_forward(q[:, :0], ks[0][:, :0], vs[0][:, :0], softmax_scale=scale, backend=backend,
                               softcap=cap)
        except (ValueError, RuntimeError) as e:
            bits |= _P_BACKEND
            detail.append(f"backend {backend!r}: {e}")
    B, Tq, Hq, D = q.shape if not bits & _P_Q else (-1,) * 4
    sig = [_MAGIC, world, 0, B, Tq, Hq, ks[0].shape[2] if ks[0].dim() == 4 else -1, D,
           dtype_code(q.dtype) if isinstance(q, torch.Tensor) else -1,
           _DEVICE_CODE.get(q.device.type, 99) if isinstance(q, torch.Tensor) else -1,
           _float_bits(scale), int(k_new is not None),
           sinks.shape[0] if sinks is not None and not bits & _P_SINKS else -1,
           vs[0].shape[3] if vs[0].dim() == 4 else -1,
           _float_bits(cap) if cap else -1, bits]
    if world > 1:
        sig[_IX["group_ranks"]] = zlib.crc32(",".join(map(str, dist.get_process_group_ranks(
            group or dist.GroupMember.WORLD))).encode())
        dev = collective_device(group, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
        sigs = _exchange(sig, group, world, dev)
    else:
        sigs = [sig]
    lines = []
    magics = [s[_IX["magic"]] for s in sigs]
    if len(set(magics)) > 1:  # another entry point on some rank: its row means something else
        lines.append("ranks disagree on the call (ranks called different ringattn functions or versions): "
                     + ", ".join(f"rank {r}: {'sharded_kv_attention' if m == _MAGIC else 'another'}"
                                 for r, m in enumerate(magics)))
        sigs = []
    for r, s in enumerate(sigs):
        b = s[_IX["problems"]]
        if b:
            lines.append(f"rank {r}: " + "; ".join(p for i, p in enumerate(_PROBLEMS) if b >> i & 1)
                         + (f" ({'; '.join(detail)})" if r == rank else ""))
    if not lines:
        for what, f in _AGREE:
            values = [s[_IX[f]] for s in sigs]
            if len(set(values)) > 1:
                lines.append(f"ranks disagree on {what}: {values}")
    if lines:
        raise ValueError("\n  - ".join([f"ringattn sharded_kv_attention: inconsistent or invalid inputs across "
                                        f"the {world} ranks of the group (nothing was computed)"] + lines))
    return rank, world, scale, cap


def sharded_kv_attention(q, k_cache, v_cache, *, k_new=None, v_new=None, group=None, softmax_scale=None,
                         backend="auto", return_lse=False, check=True, sinks=None, softcap=None):
    """Attention of the same queries on every rank over a KV cache sharded across `group`.

    See the module docstring for shapes and phases. Returns out (B, Tq, Hq, D) in q.dtype, or
    (out, lse) with return_lse=True. Raises the same ValueError on every rank for inputs that
    disagree across ranks or are invalid on any rank (nothing computed).

    check=False skips the cross-rank validation (its all_gather and the host synchronisation of
    reading it back, which on a GPU would stall the launch queue once per layer and step). Only
    for callers that guarantee agreement, e.g. generate() after its first, checked, decode step:
    inputs that disagree then give a wrong answer or a hang instead of an error.

    sinks: (Hq,) attention-sink logits (ringattn.sinks), applied to the merged fp32 result after
    phase 4 (identically on every rank); the returned lse includes them. softcap: logit
    softcapping of every score (as in ringattn.ring_attention; Gemma 2)."""
    ks, vs = _pieces(k_cache, "k_cache"), _pieces(v_cache, "v_cache")
    if check:
        rank, world, scale, cap = _check(q, ks, vs, k_new, v_new, group=group, softmax_scale=softmax_scale,
                                         backend=backend, sinks=sinks, softcap=softcap)
    else:
        rank, world = group_rank_and_size(group)
        scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
        cap = check_softcap("ringattn sharded_kv_attention", softcap)
    B, Tq, Hq, _ = q.shape
    D = vs[0].shape[3]  # the output's head dim: v's (MLA: may differ from q/k's)
    with no_autocast(q.device):
        # 1. local: fp32 accumulator over this rank's pieces (+ the new keys' causal block on the last rank)
        acc = torch.zeros(B, Tq, Hq, D, dtype=torch.float32, device=q.device)                  # (B, Tq, Hq, Dv)
        acc_lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)  # (B, Hq, Tq)
        blocks = [(k, v, False) for k, v in zip(ks, vs) if k.shape[1] > 0]
        if k_new is not None and rank == world - 1:
            blocks.append((k_new, v_new, "top_left"))
        for k, v, causal in blocks:
            out_b, lse_b = block_attn_forward(q, k, v, causal=causal, softmax_scale=scale, backend=backend, softcap=cap)
            merge_attn_states_(acc, acc_lse, out_b, lse_b)
        if world > 1:
            # 2. max
            m = acc_lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)   # rows no rank sees: -inf
            # 3. weighted sum, one buffer (out * w | w)
            w = torch.exp(acc_lse - m_safe).transpose(1, 2).unsqueeze(-1)  # (B, Tq, Hq, 1)
            buf = torch.cat([acc * w, w], dim=-1)                           # (B, Tq, Hq, D + 1)
            dist.all_reduce(buf, group=group)
            # 4. divide
            num, den = buf[..., :D], buf[..., D:]
            acc = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(num))
            acc_lse = (m_safe + torch.log(den.squeeze(-1).transpose(1, 2))).contiguous()
        if sinks is not None:  # 5. sinks: rescale the merged fp32 rows (ringattn.sinks)
            acc, acc_lse = apply_sinks(acc, acc_lse, sinks)
    out = acc.to(q.dtype)
    return (out, acc_lse) if return_lse else out


def sharded_kv_comm_bytes(*, batch: int, tq: int, heads_q: int, head_dim: int) -> int:
    """Bytes each rank contributes to the two all-reduces of one call (fp32; the algorithm the
    backend uses to all-reduce decides what actually crosses each link)."""
    return 4 * batch * tq * heads_q * (1 + head_dim + 1)
