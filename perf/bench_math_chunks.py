"""The CPU math backend's causal row chunks, before vs after 2026-12-07 (block_attention.py
_MATH_CAUSAL_SPLIT): one chunk whenever the score budget allows it (the whole square computed,
twice the causal work) vs the query rows split in 8 (at least 256 per chunk). Same process, same
inputs, min of --reps calls, torch threads 1, fp32, D=64.

    python perf/bench_math_chunks.py --out perf/results/2026-12-07_cpu_math_causal_chunks.csv
"""
import argparse
import csv
import datetime
import platform
import sys
import time

import torch

import ringattn
import ringattn.block_attention as ba


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
    return best * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    split, min_rows = ba._MATH_CAUSAL_SPLIT, ba._MATH_CAUSAL_MIN_ROWS
    rows = []
    for L, H in ((4096, 1), (4096, 2), (2048, 4), (1024, 4)):
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, L, H, 64, generator=g) for _ in range(4))
        out, lse = ringattn.block_attn_forward(q, k, v, causal=True)
        res = {}
        for mode in ("one_chunk", "split"):
            ba._MATH_CAUSAL_SPLIT, ba._MATH_CAUSAL_MIN_ROWS = (1, 1 << 30) if mode == "one_chunk" else (split, min_rows)
            res[mode] = (best_ms(lambda: ringattn.block_attn_forward(q, k, v, causal=True), a.reps),
                         best_ms(lambda: ringattn.block_attn_backward(do, q, k, v, out, lse, causal=True), a.reps))
        ba._MATH_CAUSAL_SPLIT, ba._MATH_CAUSAL_MIN_ROWS = split, min_rows
        for i, op in enumerate(("fwd", "bwd")):
            rows.append(dict(date=datetime.date.today().isoformat(), device=platform.processor() or "cpu",
                             seq_len=L, heads=H, head_dim=64, dtype="float32", causal=True, op=op,
                             ms_one_chunk=round(res["one_chunk"][i], 2), ms_split=round(res["split"][i], 2),
                             speedup=round(res["one_chunk"][i] / res["split"][i], 2),
                             command="python " + " ".join(sys.argv)))
            print(f"L={L} Hq={H} {op}: one chunk {res['one_chunk'][i]:.1f} ms, split {res['split'][i]:.1f} ms, "
                  f"{res['one_chunk'][i] / res['split'][i]:.2f}x")
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
