"""Packed sequences (cu_seqlens): what document masking costs and saves, in one process.

    python perf/bench_documents.py --out perf/out/documents            # CUDA: S=16k, bf16, 32q/8kv, d=128
    python perf/bench_documents.py --out /tmp/docs --quick             # CPU smoke run (S=2k, fp32, small heads)

Three tables, each compared with a baseline computed in the same process:
  time    W = 1 (no communication: the piece machinery alone), causal, forward and
          forward+backward of sequence_parallel_attention(..., cu_seqlens=docs) for documents of
          --doc-lens tokens, against (a) the same call without cu_seqlens (full causal attention
          over the packed sequence: what you would compute without document masking) and (b) a
          hand-written loop of block_attn_forward/backward over the documents (the per-document
          baseline; no varlen kernel is installed on either machine). Median of --reps calls after
          --warmup, CUDA-synchronised wall clock.
  bytes   the byte formulas (predict_comm_bytes, NOT measured) of one forward+backward at
          S=128k, W=8, 32q/8kv heads, d=128, bf16, causal zigzag: busiest rank's bytes of KV rotation
          and of TokenRing, for documents of 1000, 3000, 10000, 30000 tokens (TokenRing sends Q only
          to ranks holding keys of its documents).
  host    host time of algorithm="auto" for a new packing (every rank computes the trimmed size
          of all W^2 blocks; up to W = 16 the cost model also simulates both schedules) at
          W = 8, 32, 64, S=128k.
  window  W = 1, causal, sliding_window=w (--windows): forward and forward+backward with the
          band's tiled pieces run batched (documents.TILE_MODE="batched": one call per run of
          equal squares, the tiles as batch rows) and tile by tile ("per_tile"), against the same
          call without a window (full causal). "auto" is batched on CUDA, per tile on CPU.
Writes documents.csv and documents.json (date, device, torch version, command, rows) into --out
and prints the tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import int_list, median_ms, parse_common, run_meta, write_and_print  # noqa: E402
import ringattn  # noqa: E402
from ringattn.sequence_parallel import bottleneck_bytes  # noqa: E402
from ringattn.block_attention import block_attn_backward, block_attn_forward  # noqa: E402
from ringattn.layout import RingPlan, SequenceLayout  # noqa: E402


def boundaries(L: int, doc_len: int) -> list[int]:
    return list(range(0, L, doc_len)) + [L]


def _inputs(args, device, dtype, seed: int):
    """q (1, L, Hq, D), k, v (1, L, Hkv, D), dout like q."""
    B, L, Hq, Hkv, D = 1, args.seq, args.heads_q, args.heads_kv, args.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g, device=device).to(dtype)
    k, v = (torch.randn(B, L, Hkv, D, generator=g, device=device).to(dtype) for _ in range(2))
    return q, k, v, torch.randn_like(q)


def _sp_runner(q, k, v, dout, bwd: bool, **kw):
    """One causal sequence_parallel_attention call (W = 1), with its backward when bwd."""
    def run():
        leaves = [t.detach().requires_grad_(bwd) for t in (q, k, v)]
        with torch.set_grad_enabled(bwd):
            out = ringattn.sequence_parallel_attention(*leaves, causal=True, **kw)
            if bwd:
                out.backward(dout)
        return out
    return run


def time_rows(args, device, dtype):
    L = args.seq
    q, k, v, dout = _inputs(args, device, dtype, 0)
    rows = []

    def sp_call(docs, bwd):
        return _sp_runner(q, k, v, dout, bwd, cu_seqlens=docs)

    def loop_call(docs, bwd):
        def run():
            for s, e in zip(docs[:-1], docs[1:]):
                qs, ks, vs = q[:, s:e], k[:, s:e], v[:, s:e]
                out, lse = block_attn_forward(qs, ks, vs, causal=True)
                if bwd:
                    block_attn_backward(dout[:, s:e], qs, ks, vs, out, lse, causal=True)
        return run

    for doc_len in args.doc_lens:
        docs = boundaries(L, doc_len)
        for bwd in (False, True):
            pass_ = "fwd_bwd" if bwd else "fwd"
            t_docs = median_ms(sp_call(docs, bwd), device, args.warmup, args.reps)
            t_full = median_ms(sp_call(None, bwd), device, args.warmup, args.reps)
            t_loop = median_ms(loop_call(docs, bwd), device, args.warmup, args.reps)
            rows.append(dict(table="time", doc_len=doc_len, docs=len(docs) - 1, seq_len=L, pass_=pass_,
                             ms_packed=round(t_docs, 4), ms_full_causal=round(t_full, 4), ms_doc_loop=round(t_loop, 4),
                             packed_vs_full=round(t_docs / t_full, 4), packed_vs_loop=round(t_docs / t_loop, 4)))
    return rows


def window_rows(args, device, dtype):
    import ringattn.documents as rdoc

    L = args.seq
    q, k, v, dout = _inputs(args, device, dtype, 1)

    def call(window, bwd):
        return _sp_runner(q, k, v, dout, bwd, sliding_window=window)

    rows, before = [], rdoc.TILE_MODE
    try:
        for w in args.windows:
            plan = RingPlan(None, 0, 1, SequenceLayout.build(L, 1, "contiguous"), True, 1.0, "auto", None, w)
            blk = plan.block(0, 0)
            for bwd in (False, True):
                t = {}
                for mode in ("batched", "per_tile"):
                    rdoc.TILE_MODE = mode
                    t[mode] = median_ms(call(w, bwd), device, args.warmup, args.reps)
                rdoc.TILE_MODE = before
                t_full = median_ms(call(None, bwd), device, args.warmup, args.reps)
                rows.append(dict(table="window", window=w, seq_len=L, pass_="fwd_bwd" if bwd else "fwd",
                                 calls_batched=len(blk.pieces), calls_per_tile=len(rdoc._per_tile(blk.pieces)),
                                 ms_batched=round(t["batched"], 4), ms_per_tile=round(t["per_tile"], 4),
                                 ms_full_causal=round(t_full, 4), batched_vs_per_tile=round(t["batched"] / t["per_tile"], 4),
                                 batched_vs_full=round(t["batched"] / t_full, 4)))
    finally:
        rdoc.TILE_MODE = before
    return rows


def byte_rows(doc_lens):
    rows = []
    L, W = 131072, 8
    kw = dict(seq_len=L, world_size=W, layout="zigzag", causal=True, batch=1, heads_q=32, heads_kv=8,
              head_dim=128, dtype=torch.bfloat16, backward=True)

    for doc_len in [None] + list(doc_lens):
        docs = None if doc_len is None else boundaries(L, doc_len)
        ring = bottleneck_bytes(ringattn.predict_comm_bytes("ring", **kw, cu_seqlens=docs))
        tr = bottleneck_bytes(ringattn.predict_comm_bytes("token_ring", **kw, cu_seqlens=docs))
        rows.append(dict(table="bytes", doc_len=doc_len or L, docs=1 if docs is None else len(docs) - 1, seq_len=L,
                         world=W, ring_mib=round(ring / 2**20, 2), token_ring_mib=round(tr / 2**20, 2),
                         token_ring_vs_ring=round(tr / ring, 4)))
    return rows


def host_rows(doc_len):
    rows = []
    L = 131072
    docs = boundaries(L, doc_len)
    for W in (8, 32, 64):
        t0 = time.perf_counter()
        ch = ringattn.choose_algorithm(seq_len=L, world_size=W, layout="zigzag", causal=True, batch=1, heads_q=32,
                                       heads_kv=8, head_dim=128, cu_seqlens=docs)
        rows.append(dict(table="host", doc_len=doc_len, docs=len(docs) - 1, seq_len=L, world=W,
                         ms_auto_rule=round((time.perf_counter() - t0) * 1e3, 3), choice=ch.algorithm))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--doc-lens", type=int_list, default=None)
    p.add_argument("--windows", type=int_list, default=None, help="sliding windows of the window table")
    args, device, dtype, small = parse_common(p, argv, warmup=2, reps=5, small_heads=(4, 2, 64))
    args.seq = args.seq or (2048 if small else 16384)
    args.doc_lens = args.doc_lens or ([128, 512] if small else [512, 2048, 8192])
    # document lengths that do not divide the 16 zigzag chunks of 8192 tokens (aligned ones never cross a rank)
    rows = time_rows(args, device, dtype) + byte_rows([1000, 3000, 10000, 30000])
    args.windows = args.windows or ([128, 512] if small else [1024, 4096])
    rows += host_rows(1000) + window_rows(args, device, dtype)
    meta = run_meta(device, dtype, shape=dict(batch=1, seq_len=args.seq, heads_q=args.heads_q, heads_kv=args.heads_kv,
                           head_dim=args.head_dim))
    write_and_print(args.out, "documents", meta, rows, ("time", "bytes", "host", "window"))


if __name__ == "__main__":
    main()
