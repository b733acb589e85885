"""Randomized (seeded) fuzzing of sequence-parallel attention across feature COMBINATIONS.

The other tests cover each feature mostly on its own; this one draws every knob at once from a
seed and checks the result of real gloo processes (the `dist_pool` fixture) against a plain
single-process float64 attention with an explicit boolean mask, forward AND backward:

- entry point: ring_attention, token_ring_attention, ulysses_attention (where the group can split
  the heads), sequence_parallel_attention with algorithm "auto" / "ring" / "token_ring";
- world 1..4 (world = 1 + seed % 4), global length L from the smallest legal one (W contiguous,
  2W zigzag) to 64, lengths not divisible by W / 2W included; layout contiguous / zigzag;
- batch 1-2 (3 now and then, for per-row packings with repeated rows); MHA / GQA / MQA
  (heads_q <= 8); head_dim 8, 16, 32, 64, v's head dim the same or (1/4 of the cases, MLA-style)
  4, 8, 16, 24 or 48; float32, bfloat16 and float64 inputs; default or random
  softmax_scale; q of random magnitude; attention-logit softcapping (1/5 of the cases: 0.5 - 30);
- causal or not; sliding_window (causal only) of 1, 2, small, about a chunk, L - 1, L, beyond L;
- cu_seqlens: random boundaries (documents of one token, documents spanning several ranks, every
  token its own document, one document), in every accepted form (list, tuple, int64 / int32
  1-D tensor; per batch row: list of lists, list of 1-D tensors, a padded 2-D tensor);
  tiled pieces run one by one or batched (documents.TILE_MODE: CUDA's batched way, on CPU);
- sinks ((heads_q,) logits in fp32 / bf16 / fp64 / the input dtype; large ones, -inf ones);
- return_lse, lse_grad; which of q, k, v, sinks require grad (all, a subset, none: no_grad);
  non-contiguous inputs (a transposed (B, H, S, D) view); the loss through gather_sequence.

Inputs are cut with ringattn.shard_sequence (checked against positions computed here) and the
output is put back together with ringattn.gather_sequence. Checked per rank: out and lse
(the sink included) against the reference rows of the rank, shapes and dtypes, lse detached
unless lse_grad, dq / dk / dv against float64 autograd with random upstream gradients (for out
and, with lse_grad, for lse), and the sinks' gradient summed over the ranks. Tolerances are those
of tests/test_sequence_parallel.py (float64 inputs: fp32's, since ringattn merges in fp32 --
docs/sequence_parallel.md "Precision"); beyond them an error passes only if it is at most
PLAIN_FACTOR times that of a same-precision baseline (plain_attention: the computation done in the
inputs' precision; for gradients also the exact backward of the output ringattn returned): bf16 or
fp32 with a peaky softmax is that ill-conditioned, a logic error is not. Every legal input
must work: an exception is a failure. (Through the public API every query row sees at least
itself, so no row is fully masked.)

CI: the fixed seeds CI_SEEDS. Locally, many more:
    RINGATTN_FUZZ_N=500 RINGATTN_FUZZ_SEED=1000 .venv/bin/pytest -q tests/test_fuzz_sequence_parallel.py
(seeds 1000 .. 1499; RINGATTN_FUZZ_SEED alone reruns that one seed; RINGATTN_FUZZ_CONFIG='<json>'
runs one exact configuration). A failure prints the seed and its full configuration.
"""
from __future__ import annotations

import json
import math
import os
import random
import traceback

import pytest
import torch
import torch.distributed as dist

from ringattn.ulysses import heads_problem

import ringattn
from dist_pool import DistFailure
from test_sequence_parallel import positions, tolerance

CI_SEEDS = tuple(range(40))   # 10 configs per world size
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --- drawing a configuration ---------------------------------------------------------------------
def _cuts(rng: random.Random, L: int) -> list[int]:
    """Random document boundaries (0, ..., L) of one packing."""
    kind = rng.choice(("random", "random", "few", "tokens", "ones_mixed", "long", "one"))
    if kind == "tokens" or L == 1:
        return list(range(L + 1)) if kind == "tokens" else [0, L]
    if kind == "random":
        inner = sorted(rng.sample(range(1, L), rng.randint(1, L - 1)))
    elif kind == "few":                     # long documents, spanning several ranks
        inner = sorted(rng.sample(range(1, L), min(L - 1, rng.randint(1, 3))))
    elif kind == "ones_mixed":              # runs of one-token documents between longer ones
        inner = sorted({p for p in range(1, L) if rng.random() < 0.5})
    elif kind == "long":                    # one document of almost everything, one of 1-2 tokens
        inner = [rng.choice((1, 2, L - 1, L - 2))] if L > 2 else [1]
        inner = [x for x in inner if 0 < x < L]
    else:
        inner = []
    return [0] + inner + [L]


def draw_config(seed: int) -> dict:
    """Everything one case needs, from its seed alone (plain JSON values, printed on failure)."""
    rng = random.Random(seed)
    world = 1 + seed % 4
    layout = rng.choice(("contiguous", "zigzag"))
    min_len = world * (1 if layout == "contiguous" else 2)
    r = rng.random()
    if r < 0.15:
        L = min_len
    elif r < 0.3:
        L = min_len + rng.randint(1, min_len)
    elif r < 0.65:
        L = rng.randint(min_len, min(64, 4 * min_len + 3))
    else:
        L = rng.randint(min_len, 64)
    causal = rng.random() < 0.7
    hkv = rng.choice((1, 1, 2, 2, 4))
    hq = hkv * rng.choice((1, 1, 2, 3, 4) if hkv < 4 else (1, 2))
    head_dim = rng.choice((8, 8, 16, 16, 32, 64))
    dtype = rng.choices(("float32", "bfloat16", "float64"), (0.45, 0.4, 0.15))[0]
    scale = None
    if rng.random() < 0.45:
        scale = round(rng.uniform(0.3, 2.0) / math.sqrt(head_dim), 6) if rng.random() < 0.8 else \
            rng.choice((1.0, 0.05, 0.5))
    window = None
    if causal and rng.random() < 0.45:
        chunk = max(1, L // (world if layout == "contiguous" else 2 * world))
        window = rng.choice((1, 2, rng.randint(1, max(1, L // 2)), max(1, chunk + rng.randint(-1, 2)),
                             max(1, L - 1), L, L + rng.randint(1, 5), 10 ** 6))
    batch = rng.choices((1, 2, 3), (0.45, 0.45, 0.1))[0]   # 3: per-row packings with repeated rows
    docs = None
    if rng.random() < 0.45:
        per_row_form = batch > 1 and rng.random() < 0.35 or batch == 1 and rng.random() < 0.1
        if per_row_form:
            rows = [_cuts(rng, L) for _ in range(batch)]
            if batch > 1 and rng.random() < 0.3:
                i = rng.randrange(1, batch)
                rows[i] = list(rows[i - 1])  # equal neighbours share pieces (all equal: one packing)
            form = rng.choice(("rows_list", "rows_tensors", "rows_2d"))
        else:
            rows = [_cuts(rng, L)]
            form = rng.choice(("list", "tuple", "tensor64", "tensor32"))
        docs = {"form": form, "rows": rows}
    sinks = None
    if rng.random() < 0.35:
        kind = rng.choice(("normal", "normal", "large", "neg_inf"))
        values = [round(rng.gauss(0, 2), 4) for _ in range(hq)]
        if kind == "large":
            values[rng.randrange(hq)] = rng.choice((8.0, 15.0, -12.0))
        elif kind == "neg_inf":
            values[rng.randrange(hq)] = "-inf"
        sinks = {"dtype": rng.choice(("float32", "bfloat16", "float64", dtype)), "values": values}
    alg = rng.choice(("ring", "token_ring", "auto", "sp_ring", "sp_token_ring", "ulysses"))
    if alg == "ulysses" and heads_problem(hq, hkv, world):   # heads the group cannot split: a ring
        alg = "ring"
    return_lse = rng.random() < 0.6
    lse_grad = rng.random() < (0.5 if return_lse else 0.1)   # (without return_lse: nothing to differentiate)
    grad = rng.choices(("all", "subset", "none"), (0.75, 0.15, 0.1))[0]
    names = ["q", "k", "v"] + (["sinks"] if sinks else [])
    if grad == "all":
        requires = names
    elif grad == "subset":
        requires = sorted(rng.sample(names, rng.randint(1, len(names) - 1)), key=names.index)
    else:
        requires = []
    cfg = dict(seed=seed, world=world, alg=alg, layout=layout, seq_len=L, causal=causal, batch=batch,
               heads_q=hq, heads_kv=hkv, head_dim=head_dim, dtype=dtype, softmax_scale=scale,
               sliding_window=window, docs=docs, sinks=sinks, return_lse=return_lse, lse_grad=lse_grad,
               requires_grad=requires, noncontiguous=rng.random() < 0.15,
               loss_via_gather=bool(requires) and rng.random() < 0.15,
               q_magnitude=rng.choice((1.0, 1.0, 1.0, 0.3, 2.5)),
               tiles=rng.choice(("auto", "auto", "batched", "per_tile")) if window or docs else "auto")
    # v's head dim (drawn last: the earlier draws of a seed stay what they were): MLA-style, narrower
    # or wider than q/k's in 1/4 of the cases (ringattn.head_dims)
    cfg["v_head_dim"] = rng.choice((4, 8, 16, 24, 48)) if rng.random() < 0.25 else head_dim
    # attention-logit softcapping (Gemma 2), drawn after it for the same reason, in 1/5 of the cases
    cfg["softcap"] = rng.choice((0.5, 1.0, 2.0, 5.0, 30.0)) if rng.random() < 0.2 else None
    return cfg


def v_head_dim(cfg: dict) -> int:
    return cfg.get("v_head_dim", cfg["head_dim"])  # (configs written before it existed: q/k's)


def describe(cfg: dict) -> str:
    return (f"seed={cfg['seed']} config={json.dumps(cfg)}\n  reproduce: RINGATTN_FUZZ_SEED={cfg['seed']} "
            ".venv/bin/pytest -q tests/test_fuzz_sequence_parallel.py -k from_env  (or this exact config, "
            "edited if you like: RINGATTN_FUZZ_CONFIG='<the JSON above>')")


# --- the float64 reference -------------------------------------------------------------------------
def reference_mask(cfg: dict) -> torch.Tensor:
    """(B, 1, L, L) bool: query p may attend key t (document, causal, window), per batch row."""
    B, L = cfg["batch"], cfg["seq_len"]
    p = torch.arange(L)[:, None]
    t = torch.arange(L)[None, :]
    mask = torch.ones(L, L, dtype=torch.bool)
    if cfg["causal"]:
        mask &= t <= p
    if cfg["sliding_window"] is not None:
        mask &= p - t < cfg["sliding_window"]
    rows = cfg["docs"]["rows"] if cfg["docs"] else [[0, L]]
    masks = []
    for b in range(B):
        cu = rows[b] if len(rows) > 1 else rows[0]
        ids = torch.bucketize(torch.arange(L), torch.tensor(cu[1:]), right=True)  # document of each token
        masks.append(mask & (ids[:, None] == ids[None, :]))
    return torch.stack(masks).unsqueeze(1)


def reference_attention(q, k, v, mask, scale, sinks=None, softcap=None):
    """Plain float64 softmax attention: q (B, L, Hq, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv), mask (B, 1, L, L),
    sinks (Hq,) or None (one extra logit per head in every row's softmax, no value).
    Returns out (B, L, Hq, Dv) and lse (B, Hq, L) over the keys and the sink."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)    # query head h uses K/V head h // g
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale                 # (B, Hq, L, L)
    if softcap:
        s = softcap * torch.tanh(s / softcap)                          # (the sinks are not capped)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)  # (B, Hq, L, L+1)
    p = torch.softmax(s, -1)[..., :mask.shape[-1]]                     # (B, Hq, L, L)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), torch.logsumexp(s, -1)


def plain_attention(q, k, v, dout, dlse, mask, scale, sinks=None, owners=None, given_out=None, softcap=None):
    """What one device computes in the inputs' precision (the flash-attention recipe): fp32 scores,
    softmax and products from the given q, k, v; out rounded once to q's dtype; the backward in
    fp32 from that ROUNDED out (delta = rowsum(dout * out)); gradients rounded once. Its error
    against float64 is the noise any implementation of that precision has on this problem (large
    when the softmax is peaky: then out ~ v_j and the bf16 rounding of out dominates dq / dk).
    owners (L,) int or None: the rank holding each key; then, as ringattn documents it ("Precision":
    block partials come back in the input dtype, merged in fp32), each rank's partial output is
    rounded to q's dtype before the fp32 merge (a no-op for fp32).
    given_out (B, L, Hq, D) or None: instead, float64 throughout with this output in delta: the
    exact backward of the forward result ringattn actually returned (how far its own rounding of
    out alone moves the gradients; a backward bug does not hide in it, its forward is exact).
    dlse (B, Hq, L) fp32 or None. Returns {out, lse, dq, dk, dv, dsinks} (dsinks: None without sinks)."""
    f = torch.float32 if given_out is None else torch.float64
    dt = (q.dtype if q.dtype != torch.float64 else torch.float32) if given_out is None else f
    B, L, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    g = Hq // Hkv
    qf, kf, vf = q.to(f), k.to(f).repeat_interleave(g, 2), v.to(f).repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale                # (B, Hq, L, L)
    dcap = 1.0
    if softcap:  # capped scores; d cap / d s = 1 - tanh^2
        t = torch.tanh(s / softcap)
        s, dcap = softcap * t, 1 - t * t
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(f).view(1, -1, 1, 1).expand(B, Hq, L, 1)], -1)  # (B, Hq, L, L+1)
    lse = torch.logsumexp(s, -1)                                        # (B, Hq, L)
    p = torch.exp(s - lse.unsqueeze(-1))
    pk = p[..., :L]                                                     # (B, Hq, L, L)
    if given_out is not None:
        out = given_out.to(f)
    elif owners is None or dt == f:
        out = torch.einsum("bhqk,bkhd->bqhd", pk, vf).to(dt)            # (B, L, Hq, D)
    else:  # per-rank partials (their own softmax) rounded to dt, merged in fp32 with their weights
        out = torch.zeros(B, L, Hq, Dv, dtype=f)
        for r in owners.unique().tolist():
            pr = pk * (owners == r).to(f)                               # (B, Hq, L, L): rank r's keys
            wr = pr.sum(-1)                                             # (B, Hq, L): their share of the row
            part = torch.einsum("bhqk,bkhd->bqhd", pr / wr.clamp_min(1e-38).unsqueeze(-1), vf).to(dt)
            out += part.to(f) * wr.transpose(1, 2).unsqueeze(-1)
        out = out.to(dt)
    do = dout.to(f)
    delta = (do * out.to(f)).sum(-1).transpose(1, 2)                    # (B, Hq, L)
    extra = dlse.to(f) if dlse is not None else torch.zeros_like(delta)
    ds = pk * (torch.einsum("bqhd,bkhd->bhqk", do, vf) - delta.unsqueeze(-1) + extra.unsqueeze(-1)) * dcap
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale                # (B, L, Hq, D)
    dk = (torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale).view(B, L, Hkv, g, D).sum(3)  # (B, L, Hkv, D)
    dv = torch.einsum("bhqk,bqhd->bkhd", pk, do).view(B, L, Hkv, g, Dv).sum(3)
    dsinks = None
    if sinks is not None:
        dsinks = (p[..., L] * (extra - delta)).sum((0, 2)).to(sinks.dtype if given_out is None else f)  # (Hq,)
    return dict(out=out, lse=lse, dq=dq.to(dt), dk=dk.to(dt), dv=dv.to(dt), dsinks=dsinks)


def make_inputs(cfg: dict):
    """Global tensors, the same on every rank: q (B, L, Hq, D), dout (B, L, Hq, Dv), k (B, L, Hkv, D),
    v (B, L, Hkv, Dv) (Dv = v_head_dim(cfg)) in the
    input dtype, dlse (B, Hq, L) fp32, sinks (Hq,) or None."""
    B, L, Hq, Hkv, D = cfg["batch"], cfg["seq_len"], cfg["heads_q"], cfg["heads_kv"], cfg["head_dim"]
    dtype = _DTYPES[cfg["dtype"]]
    gen = torch.Generator().manual_seed(10_000 + cfg["seed"])
    Dv = v_head_dim(cfg)
    q = (torch.randn(B, L, Hq, D, generator=gen) * cfg["q_magnitude"]).to(dtype)
    k, v = (torch.randn(B, L, Hkv, d, generator=gen).to(dtype) for d in (D, Dv))
    dout = torch.randn(B, L, Hq, Dv, generator=gen).to(dtype)
    dlse = torch.randn(B, Hq, L, generator=gen)
    sinks = None
    if cfg["sinks"]:
        sinks = torch.tensor([float(x) for x in cfg["sinks"]["values"]], dtype=torch.float64)
        sinks = sinks.to(_DTYPES[cfg["sinks"]["dtype"]])
    return q, k, v, dout, dlse, sinks


def cu_seqlens_arg(cfg: dict):
    """The document boundaries in the form the config names."""
    d = cfg["docs"]
    if d is None:
        return None
    rows, form = d["rows"], d["form"]
    if form == "list":
        return list(rows[0])
    if form == "tuple":
        return tuple(rows[0])
    if form in ("tensor64", "tensor32"):
        return torch.tensor(rows[0], dtype=torch.int64 if form == "tensor64" else torch.int32)
    if form == "rows_list":
        return [list(r) for r in rows]
    if form == "rows_tensors":
        return [torch.tensor(r) for r in rows]
    n = max(len(r) for r in rows)                      # rows_2d: shorter rows padded with repeats of L
    return torch.tensor([r + [r[-1]] * (n - len(r)) for r in rows])


# --- one case on every rank ----------------------------------------------------------------------
def run_case(cfg: dict) -> dict:
    """Run one configuration on this rank; {"errors": [...], "dsinks": local sink gradient or None}.
    Exceptions are reported as errors (a legal input must never raise). cfg["tiles"]: how tiled
    pieces run (ringattn.documents.TILE_MODE; "batched" is CUDA's default way, here on CPU)."""
    import ringattn.documents as rdoc

    before, rdoc.TILE_MODE = rdoc.TILE_MODE, cfg["tiles"]
    try:
        return _run_case(cfg)
    except Exception:  # noqa: BLE001 - every rank reports it; the parent names the config
        return {"errors": ["raised:\n" + traceback.format_exc()], "dsinks": None}
    finally:
        rdoc.TILE_MODE = before


def _run_case(cfg: dict) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    assert world == cfg["world"], (world, cfg["world"])
    B, L, Hq, D, layout = cfg["batch"], cfg["seq_len"], cfg["heads_q"], cfg["head_dim"], cfg["layout"]
    dtype = _DTYPES[cfg["dtype"]]
    q, k, v, dout, dlse, sinks = make_inputs(cfg)
    scale = cfg["softmax_scale"] if cfg["softmax_scale"] is not None else 1.0 / math.sqrt(D)
    requires = set(cfg["requires_grad"])
    lse_used = cfg["return_lse"] and cfg["lse_grad"]

    # reference: float64 of the same (rounded) values, the whole sequence
    ref = {n: t.detach().clone().double().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    if sinks is not None:
        ref["sinks"] = sinks.detach().clone().double().requires_grad_()
    mask = reference_mask(cfg)                                         # (B, 1, L, L)
    cap = cfg.get("softcap")  # (configs written before it existed: none)
    ref_out, ref_lse = reference_attention(ref["q"], ref["k"], ref["v"], mask, scale, ref.get("sinks"), cap)
    if requires:
        loss = (ref_out * dout.double()).sum() + ((ref_lse * dlse.double()).sum() if lse_used else 0)
        loss.backward()
    owners = torch.empty(L, dtype=torch.long)                          # (L,) the rank holding each token
    for r in range(world):
        owners[positions(L, world, cfg["layout"], r)] = r
    plain = plain_attention(q, k, v, dout, dlse if lse_used else None, mask, scale, sinks, owners, softcap=cap)

    # this rank's shard: ringattn.shard_sequence, checked against positions computed here
    pos = positions(L, world, layout, rank)                            # (S_local,) global positions
    errors = []
    leaves, args = {}, {}
    for n, t in zip("qkv", (q, k, v)):
        shard = ringattn.shard_sequence(t, dim=1, layout=layout)       # (B, S_local, H, D)
        if not torch.equal(shard, t[:, pos]):
            errors.append(f"shard_sequence({n}) != the layout's rows {pos.tolist()}")
        if cfg["noncontiguous"]:
            leaf = shard.transpose(1, 2).contiguous().requires_grad_(n in requires)  # (B, H, S_local, D)
            args[n] = leaf.transpose(1, 2)                             # a non-contiguous (B, S_local, H, D) view
        else:
            leaf = shard.requires_grad_(n in requires)
            args[n] = leaf
        leaves[n] = leaf
    loc_sinks = None
    if sinks is not None:
        loc_sinks = sinks.clone().requires_grad_("sinks" in requires)
    kw = dict(causal=cfg["causal"], softmax_scale=cfg["softmax_scale"], layout=layout,
              return_lse=cfg["return_lse"], lse_grad=cfg["lse_grad"], cu_seqlens=cu_seqlens_arg(cfg),
              sliding_window=cfg["sliding_window"], sinks=loc_sinks, softcap=cap)
    fn = {"ring": ringattn.ring_attention, "token_ring": ringattn.token_ring_attention,
          "auto": lambda *a, **k_: ringattn.sequence_parallel_attention(*a, algorithm="auto", **k_),
          "sp_ring": lambda *a, **k_: ringattn.sequence_parallel_attention(*a, algorithm="ring", **k_),
          "sp_token_ring": lambda *a, **k_: ringattn.sequence_parallel_attention(*a, algorithm="token_ring", **k_),
          "ulysses": ringattn.ulysses_attention,
          }[cfg["alg"]]
    with torch.set_grad_enabled(bool(requires)):
        res = fn(args["q"], args["k"], args["v"], **kw)
        out, lse = res if cfg["return_lse"] else (res, None)
        # out (B, S_local, Hq, Dv) in the input dtype; lse (B, Hq, S_local) fp32
        want = (B, len(pos), Hq, v_head_dim(cfg))
        if out.dtype != dtype or out.shape != want:
            errors.append(f"out: {out.dtype} {tuple(out.shape)}, want {dtype} {want}")
        if lse is not None:
            if lse.dtype != torch.float32 or lse.shape != (B, Hq, len(pos)):
                errors.append(f"lse: {lse.dtype} {tuple(lse.shape)}, want float32 {(B, Hq, len(pos))}")
            if lse.requires_grad != (lse_used and bool(requires)):
                errors.append(f"lse.requires_grad is {lse.requires_grad} with lse_grad={cfg['lse_grad']}")
        full = ringattn.gather_sequence(out, dim=1, layout=layout,
                                        seq_len=L if cfg["seed"] % 2 else None)  # (B, L, Hq, D)
        if requires:
            if cfg["loss_via_gather"]:   # sum convention: each rank's loss on the full output
                loss = (full.double() * dout.double()).sum() / world
            else:
                loss = (out.double() * dout[:, pos].double()).sum()
            if lse_used:
                loss = loss + (lse.double() * dlse[:, :, pos].double()).sum()
            loss.backward()

    atol, rtol = tolerance(torch.float32 if dtype == torch.float64 else dtype, world)
    fed = plain_attention(*(t.double() for t in (q, k, v, dout)), dlse.double() if lse_used else None,
                          mask, scale, sinks.double() if sinks is not None else None,
                          given_out=full.detach().double(), softcap=cap)
    # (name, got, float64 reference, [same-precision baselines: plain_attention, and for gradients
    # the exact backward of ringattn's own out])
    pairs = [("out", out, ref_out[:, pos], [plain["out"][:, pos]]), ("gathered out", full, ref_out, [plain["out"]])]
    if lse is not None:
        pairs.append(("lse", lse, ref_lse[:, :, pos], [plain["lse"][:, :, pos]]))
    for n in "qkv":
        got = leaves[n].grad
        if cfg["noncontiguous"] and got is not None:
            got = got.transpose(1, 2)
        if n in requires:
            pairs.append((f"d{n}", got, ref[n].grad[:, pos], [plain[f"d{n}"][:, pos], fed[f"d{n}"][:, pos]]))
        elif got is not None:
            errors.append(f"d{n}: a gradient for an input that does not require one")
    dsinks = None
    if loc_sinks is not None and "sinks" in requires:
        g = loc_sinks.grad
        if g is None or g.dtype != loc_sinks.dtype or g.shape != loc_sinks.shape:
            errors.append(f"dsinks: {None if g is None else (g.dtype, tuple(g.shape))}, want {loc_sinks.dtype}")
        else:
            dsinks = g.detach().double()
    for name, got, want, base in pairs:
        if got is None or tuple(got.shape) != tuple(want.shape):
            errors.append(f"{name}: {None if got is None else tuple(got.shape)} != {tuple(want.shape)}")
            continue
        errors += compare(name, got.detach().double(), want.detach(), atol, rtol, plain=[b.double() for b in base])
    return {"errors": errors, "dsinks": dsinks,
            "ref_dsinks": ref["sinks"].grad.detach() if dsinks is not None else None,
            "plain_dsinks": [plain["dsinks"].double(), fed["dsinks"]] if dsinks is not None else None}


# An error beyond the fixed tolerances still passes when it is at most this many times the error
# of a same-precision baseline on the same elements (plain_attention: the inputs' precision with
# ringattn's documented per-rank rounding of partial outputs; for gradients also the exact backward
# of ringattn's own output, whose rounding the backward's cancellation amplifies): the problem itself
# is that ill-conditioned in that precision (a peaky softmax), not the ring. The factor leaves room
# for the roundings the baselines do not model (the pieces of a block, the merged lse). Injected
# logic errors (a sign in the sinks' scale, a window one too wide, per-row packings ignored, lse's
# gradient dropped) come out at 10-100x.
PLAIN_FACTOR = 4.0


def compare(name, got, want, atol, rtol, scale=1.0, plain=()) -> list[str]:
    """[] if |got - want| <= (atol + rtol |want|) * scale everywhere (infinities must match exactly),
    or if max |got - want| <= PLAIN_FACTOR * max |b - want| for some baseline b in `plain` (the
    same-precision noise of this problem)."""
    same_inf = torch.isinf(want) & (got == want)
    err = (got - want).abs().masked_fill(same_inf, 0)
    bound = (atol + rtol * want.abs().masked_fill(torch.isinf(want), 0)) * scale
    ratio = (err / bound).nan_to_num(nan=float("inf"))
    if ratio.max().item() <= 1.0:
        return []
    plain_err = max(((b - want).abs().masked_fill(torch.isinf(want) & (b == want), 0).max().item() for b in plain),
                    default=float("nan"))
    if err.max().item() <= PLAIN_FACTOR * plain_err:
        return []
    i = tuple(int(x) for x in torch.nonzero(ratio == ratio.max())[0])
    n_bad = int((ratio > 1).sum())
    return [f"{name}: max abs err {err.max().item():.3g} ({ratio.max().item():.2f}x the bound; same-precision "
            f"baseline's error {plain_err:.3g}), {n_bad} of {ratio.numel()} elements out, worst at {i}: "
            f"got {got[i].item():.6g} want {want[i].item():.6g}"]


def run_cases(cfgs: list[dict]) -> list[dict]:
    """Every config in turn on this rank (module level: runs inside the pool's processes)."""
    return [run_case(c) for c in cfgs]


def failures_of(cfgs: list[dict], per_rank: list[list[dict]]) -> list[str]:
    """The failure messages of cfgs from every rank's results; the sinks' gradient summed over ranks."""
    msgs = []
    for i, cfg in enumerate(cfgs):
        errs = [f"rank {r}: {e}" for r, res in enumerate(per_rank) for e in res[i]["errors"]]
        if not errs and per_rank[0][i]["dsinks"] is not None:
            total = sum(res[i]["dsinks"] for res in per_rank)          # (Hq,), like any replicated weight
            want = per_rank[0][i]["ref_dsinks"]
            atol, rtol = tolerance(torch.float32 if cfg["dtype"] == "float64" else _DTYPES[cfg["dtype"]],
                                   cfg["world"])
            # Each rank's gradient comes back in the sinks' dtype (that of a replicated bf16 parameter,
            # summed over ranks as DDP would): allow 3 half-ulps of each rank's (possibly much larger)
            # value. (With lse_grad the shares through out' and through lse' are rounded on their own
            # before autograd adds them; where they cancel that costs more, and is reported.)
            u = torch.finfo(_DTYPES[cfg["sinks"]["dtype"]]).eps / 2
            atol = atol + 3 * u * sum(res[i]["dsinks"].abs() for res in per_rank)   # (Hq,)
            # a sum over B * L rows: bounded relative to its largest entry, as tests/test_sinks.py does
            errs = compare("dsinks (summed over ranks)", total, want, atol, rtol,
                           scale=max(1.0, want.abs().max().item()), plain=per_rank[0][i]["plain_dsinks"])
        if errs:
            msgs.append(describe(cfg) + "\n  " + "\n  ".join(errs))
    return msgs


def run_seeds(dist_pool, world: int, seeds, timeout: float = 240.0, cfgs=None) -> tuple[list[str], int]:
    """Run the seeds' configs (or the given cfgs) on a pool of `world` ranks; (failure messages,
    configs run). A hang or a one-sided crash kills the pool: then each config is rerun alone to
    name the one at fault."""
    cfgs = [draw_config(s) for s in seeds] if cfgs is None else cfgs
    assert all(c["world"] == world for c in cfgs)
    if not cfgs:
        return [], 0
    try:
        return failures_of(cfgs, dist_pool(world).run(run_cases, cfgs, timeout=timeout)), len(cfgs)
    except DistFailure as batch_failure:
        msgs = []
        for cfg in cfgs:
            try:
                msgs += failures_of([cfg], dist_pool(world).run(run_cases, [cfg], timeout=60))
            except DistFailure as e:
                msgs.append(describe(cfg) + f"\n  the ranks hung or crashed:\n{e}")
        return msgs or [f"the batch failed but no config alone did:\n{batch_failure}"], len(cfgs)


# --- tests ---------------------------------------------------------------------------------------
def test_draw_config_is_deterministic_and_legal():
    """The same seed gives the same config; every drawn config is legal input (the length fits the
    layout, windows only with causal, boundaries end at L); and the draws do cover the features."""
    seen = {k: set() for k in ("world", "alg", "layout", "dtype", "head_dim", "form", "window", "sinks",
                               "lse_grad", "grad", "odd", "tiles", "batch", "mla")}
    for s in range(400):
        c = draw_config(s)
        assert c == draw_config(s) and json.loads(json.dumps(c)) == c
        W, L = c["world"], c["seq_len"]
        assert L >= (W if c["layout"] == "contiguous" else 2 * W) and L <= 64, c
        assert c["heads_q"] % c["heads_kv"] == 0 and c["heads_q"] <= 8, c
        assert c["sliding_window"] is None or (c["causal"] and c["sliding_window"] >= 1), c
        if c["docs"]:
            rows = c["docs"]["rows"]
            assert all(r[0] == 0 and r[-1] == L and all(a < b for a, b in zip(r, r[1:])) for r in rows), c
            assert len(rows) in (1, c["batch"]), c
            seen["form"].add(c["docs"]["form"])
        w = c["sliding_window"]
        seen["window"].add(None if w is None else "1" if w == 1 else ">=L" if w >= L else "<L")
        seen["sinks"].add(None if not c["sinks"] else "-inf" if "-inf" in c["sinks"]["values"] else "finite")
        seen["grad"].add(len(c["requires_grad"]))
        seen["odd"].add(L % (W if c["layout"] == "contiguous" else 2 * W) != 0)
        seen["mla"].add((c["v_head_dim"] > c["head_dim"]) - (c["v_head_dim"] < c["head_dim"]))
        for k in ("world", "alg", "layout", "dtype", "head_dim", "lse_grad", "tiles", "batch"):
            seen[k].add(c[k])
    assert seen["world"] == {1, 2, 3, 4} and len(seen["alg"]) == 6 and len(seen["dtype"]) == 3
    assert seen["head_dim"] == {8, 16, 32, 64} and len(seen["form"]) == 7 and seen["odd"] == {True, False}
    assert seen["window"] == {None, "1", ">=L", "<L"} and seen["sinks"] == {None, "-inf", "finite"}
    assert 0 in seen["grad"] and seen["lse_grad"] == {True, False}
    assert seen["tiles"] == {"auto", "batched", "per_tile"} and seen["batch"] == {1, 2, 3}
    assert seen["mla"] == {-1, 0, 1}  # v's head dim narrower, equal, wider


def test_reference_matches_sdpa_and_the_appended_sink_column():
    """The reference itself: without sinks it is torch's SDPA with the same boolean mask (GQA
    expanded); a sink of -inf changes nothing; a sink adds exp(s_h) to every row's denominator."""
    cfg = dict(draw_config(3), batch=2, seq_len=9, causal=True, sliding_window=3,
               docs={"form": "rows_list", "rows": [[0, 4, 9], [0, 1, 9]]})
    mask = reference_mask(cfg)                                          # (2, 1, 9, 9)
    assert mask[0, 0, 5, 3].item() is False and mask[0, 0, 5, 4].item() is True  # doc 1 starts at 4
    assert mask[1, 0, 5, 2].item() is False and mask[1, 0, 5, 3].item() is True  # window 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 8, generator=g, dtype=torch.float64)      # (B, L, Hq, D)
    k, v = (torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = reference_attention(q, k, v, mask, 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-12)
    s_inf = torch.full((4,), float("-inf"), dtype=torch.float64)
    o2, l2 = reference_attention(q, k, v, mask, 0.3, s_inf)
    assert torch.allclose(o2, out, atol=1e-12) and torch.allclose(l2, lse, atol=1e-12)
    s = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    o3, l3 = reference_attention(q, k, v, mask, 0.3, s)
    w = torch.sigmoid(lse - s.view(1, 4, 1))                            # (B, Hq, L)
    assert torch.allclose(o3, out * w.transpose(1, 2).unsqueeze(-1), atol=1e-12)
    assert torch.allclose(l3, torch.logaddexp(lse, s.view(1, 4, 1)), atol=1e-12)
    # plain_attention (the same-precision baseline that excuses ill-conditioned cases) is the same
    # function: its fp32 forward and hand-written backward (lse's gradient and the sinks' included)
    # equal float64 autograd to fp32 accuracy
    dout = torch.randn(2, 9, 4, 8, generator=g, dtype=torch.float64)  # (B, L, Hq, D)
    dlse = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)      # (B, Hq, L)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s)]
    ro, rl = reference_attention(*leaves[:3], mask, 0.3, leaves[3])
    ((ro * dout).sum() + (rl * dlse).sum()).backward()
    pl = plain_attention(q.float(), k.float(), v.float(), dout.float(), dlse.float(), mask, 0.3, s.float())
    fed = plain_attention(q, k, v, dout, dlse, mask, 0.3, s, given_out=ro.detach())  # float64, exact out
    for name, want in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), (ro, rl, *(t.grad for t in leaves))):
        assert pl[name].dtype == torch.float32 and fed[name].dtype == torch.float64
        assert torch.allclose(pl[name].double(), want, atol=2e-6, rtol=2e-6), (name, (pl[name] - want).abs().max())
        assert torch.allclose(fed[name], want, atol=1e-12, rtol=1e-12), (name, (fed[name] - want).abs().max())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fuzz_fixed_seeds(dist_pool, world):
    seeds = [s for s in CI_SEEDS if 1 + s % 4 == world]
    failures, n = run_seeds(dist_pool, world, seeds)
    assert n == len(seeds) > 0
    assert not failures, f"{len(failures)} of {n} configs failed:\n" + "\n".join(failures[:20])


def _env_seeds() -> list[int]:
    if "RINGATTN_FUZZ_N" not in os.environ and "RINGATTN_FUZZ_SEED" not in os.environ:
        return []
    start = int(os.environ.get("RINGATTN_FUZZ_SEED", 1_000_000))
    return list(range(start, start + int(os.environ.get("RINGATTN_FUZZ_N", 1))))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fuzz_from_env(dist_pool, world):
    """RINGATTN_FUZZ_N configs from seed RINGATTN_FUZZ_SEED (default 1000000) on, or the one JSON
    config RINGATTN_FUZZ_CONFIG (as a failure prints it); skipped unless set."""
    cfgs = [json.loads(os.environ["RINGATTN_FUZZ_CONFIG"])] if "RINGATTN_FUZZ_CONFIG" in os.environ else None
    seeds = [s for s in _env_seeds() if 1 + s % 4 == world] if cfgs is None else []
    if cfgs is not None:
        cfgs = [c for c in cfgs if c["world"] == world]
    if not seeds and not cfgs:
        pytest.skip("set RINGATTN_FUZZ_N (and RINGATTN_FUZZ_SEED), or RINGATTN_FUZZ_CONFIG, to fuzz more configs")
    failures, n = run_seeds(dist_pool, world, seeds, timeout=60 + 5 * max(len(seeds), 1), cfgs=cfgs)
    assert not failures, f"{len(failures)} of {n} configs failed:\n" + "\n".join(failures[:20])
