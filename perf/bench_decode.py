"""Serving: one decode step of sharded_kv_attention, in one process, against one attention call.

    python perf/bench_decode.py --out perf/out/decode            # CUDA: bf16, 32q/8kv, d=128, S = 4k..128k
    python perf/bench_decode.py --out /tmp/decode --quick        # CPU smoke run (fp32, small shapes)

Two tables, each compared with a baseline computed in the same process:
  time   W = 1 (no communication: what the local part of a decode step costs): Tq new tokens over
         a cache of S tokens given as two pieces (a prefill shard and a slice of generated tokens,
         as generate() passes them) plus the new keys' causal block, merged in fp32
         (sharded_kv_attention), against ONE block_attn_forward over the concatenated keys with
         bottom-right causality (what one GPU holding the whole cache runs). Median of --reps
         calls after --warmup, CUDA-synchronised wall clock. With W ranks each rank's local part
         is this over S/W keys, plus the two all-reduces (not measured here: several ranks on one
         GPU cannot all-reduce over NCCL).
  bytes  per decode step and layer, what each rank puts into the all-reduces
         (sharded_kv_comm_bytes, a formula, NOT measured) against what rotating the cache's K/V
         through a ring once would move per rank ((W-1)/W of the cache), for S = 128k, W = 8,
         32q/8kv heads, d=128, bf16 (fixed shapes).
Writes decode.csv and decode.json (date, device, torch version, command, rows) into --out and
prints the tables.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import int_list, median_ms, parse_common, run_meta, write_and_print  # noqa: E402
from ringattn.block_attention import block_attn_forward  # noqa: E402
from ringattn.decode import sharded_kv_attention, sharded_kv_comm_bytes  # noqa: E402


@torch.no_grad()
def time_rows(args, device, dtype):
    rows = []
    Hq, Hkv, D = args.heads_q, args.heads_kv, args.head_dim
    for B in args.batches:
        for S in args.cache_lens:
            for tq in (1, 4):
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(B, tq, Hq, D, generator=g, device=device).to(dtype)
                k, v = (torch.randn(B, S + tq, Hkv, D, generator=g, device=device).to(dtype) for _ in range(2))
                cut = S - S // 16  # prefill shard, then the generated tokens' slice
                pk, pv = (k[:, :cut], k[:, cut:S]), (v[:, :cut], v[:, cut:S])

                def sharded():
                    return sharded_kv_attention(q, pk, pv, k_new=k[:, S:], v_new=v[:, S:])

                def single():
                    return block_attn_forward(q, k, v, causal="bottom_right")

                err = (sharded().float() - single()[0].float()).abs().max().item()
                t_sh = median_ms(sharded, device, args.warmup, args.reps)
                t_one = median_ms(single, device, args.warmup, args.reps)
                read = 2 * B * (S + tq) * Hkv * D * k.element_size()  # K and V read once
                rows.append(dict(table="time", batch=B, cache=S, tq=tq, ms_sharded=round(t_sh, 4),
                                 ms_single=round(t_one, 4), sharded_vs_single=round(t_sh / t_one, 4),
                                 single_gbps=round(read / t_one / 1e6, 1), max_abs_diff=f"{err:.2e}"))
    return rows


def byte_rows(batches):
    """Formulas at fixed serving shapes (whatever --quick says): 32q/8kv heads, d=128, bf16."""
    rows = []
    S, W, hq, hkv, d, elem = 131072, 8, 32, 8, 128, 2
    for B in batches:
        ar = sharded_kv_comm_bytes(batch=B, tq=1, heads_q=hq, head_dim=d)
        kv_rot = 2 * B * S * hkv * d * elem * (W - 1) // W
        rows.append(dict(table="bytes", batch=B, cache=S, world=W, heads=f"{hq}q/{hkv}kv", head_dim=d,
                         allreduce_kib=round(ar / 1024, 2), kv_rotation_mib=round(kv_rot / 2**20, 1),
                         ratio=f"{ar / kv_rot:.1e}"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-lens", type=int_list, default=None)
    p.add_argument("--batches", type=int_list, default=None)
    args, device, dtype, small = parse_common(p, argv, warmup=3, reps=10, small_heads=(8, 2, 64))
    args.cache_lens = args.cache_lens or ([1024, 4096] if small else [4096, 32768, 131072])
    args.batches = args.batches or ([1, 4] if small else [1, 8])
    rows = time_rows(args, device, dtype) + byte_rows(args.batches)
    meta = run_meta(device, dtype, shape=dict(heads_q=args.heads_q, heads_kv=args.heads_kv, head_dim=args.head_dim))
    write_and_print(args.out, "decode", meta, rows, ("time", "bytes"))


if __name__ == "__main__":
    main()
