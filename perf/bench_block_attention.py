"""Block-attention benchmark: each backend's forward and backward, against F.scaled_dot_product_attention.

    python perf/bench_block_attention.py --out DIR
    python perf/bench_block_attention.py --out DIR --quick      # tiny sizes: a smoke run, CPU too
    python perf/bench_block_attention.py --out DIR --head-dim 192 --v-head-dim 128   # MLA (DeepSeek)

What it measures (CUDA): bf16, B=1, Hq=32 with Hkv=32 (MHA) and Hkv=8 (GQA), D=128,
S = Sq = Sk in {4096, 16384}, causal and non-causal; for every backend that supports the case
(ringattn.block_attention.available_backends) and for "auto" (which backend it picked is
recorded): block_attn_forward, and block_attn_backward given the forward's out and lse (what a
ring step's backward receives). Baseline, same process: F.scaled_dot_product_attention
(is_causal / enable_gqa, torch's own kernel choice) forward with inputs requiring grad (so it
writes the LSE too), and its autograd backward.
The math backend is timed only with --quick (it is the reference, not a contender).

Timing: `--warmup` calls, then `--iters` calls queued back to back, each between its own pair
of CUDA events, one synchronize at the end (GPU time; time.perf_counter on CPU); the median is
reported (min too in the CSV).
FLOPs (dense-equivalent, as flash-attention reports them): forward 4*B*Hq*S*S*D (two GEMMs,
QK^T and PV, 2 flops per multiply-add), halved for causal; backward 2.5 x forward (five GEMMs).
--v-head-dim Dv (MLA): v and the output get their own head dim; FLOPs 2*B*Hq*S*S*(D + Dv). ringattn's
kernels then run each block zero-padded to max(D, Dv) (ringattn.head_dims), SDPA its own way:
the ratio is the cost of that padding.

Writes DIR/bench_block_attention.csv and .json (date, device, torch/CUDA/cuDNN versions, the
command line), and prints the full table, then a short TFLOP/s summary last.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringattn import block_attention as ba  # noqa: E402


def attention_flops(B, Hq, Sq, Sk, D, causal, op, Dv=None):
    fwd = 2 * B * Hq * Sq * Sk * (D + (D if Dv is None else Dv))
    if causal:
        fwd //= 2
    return fwd if op == "fwd" else int(2.5 * fwd)


def time_it(fn, device, warmup, iters):
    """Median and min milliseconds of fn() over `iters` calls after `warmup` calls.

    CUDA: the calls are queued back to back, each between its own pair of events, with one
    synchronize at the end -- so the host runs ahead and the numbers are GPU time (Python
    overhead shows only when it starves the GPU, as it would in real use)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def configs(args, device):
    if args.quick:
        seqs, hq, kvs, d = [256, 512], 4, [4, 2], 64
    else:
        seqs, hq, kvs, d = args.seqs, args.heads, args.kv_heads, args.head_dim
    dv = args.v_head_dim or d
    for S in seqs:
        for hkv in kvs:
            for causal in (False, True):
                yield dict(B=args.batch, S=S, Hq=hq, Hkv=hkv, D=d, Dv=dv, causal=causal)


def bench_config(cfg, dtype, device, args):
    B, S, Hq, Hkv, D, causal = cfg["B"], cfg["S"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["causal"]
    Dv = cfg.get("Dv", D)
    gen = torch.Generator(device=device).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    q, k, v, dout = mk(B, S, Hq, D), mk(B, S, Hkv, D), mk(B, S, Hkv, Dv), mk(B, S, Hq, Dv)
    impls = [b for b in ba.available_backends(device) if b != "math" or args.quick]
    impls.append("auto")
    rows = []

    def record(impl, op, picked, fn):
        row = dict(cfg, dtype=str(dtype).replace("torch.", ""), impl=impl, picked=picked, op=op,
                   ms_median="", ms_min="", tflops="", error="")
        try:
            med, mn = time_it(fn, device, args.warmup, args.iters)
            flops = attention_flops(B, Hq, S, S, D, causal, op, Dv)
            row.update(ms_median=round(med, 4), ms_min=round(mn, 4), tflops=float(f"{flops / med / 1e9:.3g}"))
        except Exception as e:  # a kernel refusing a size must not end the sweep
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)

    for impl in impls:
        try:
            picked = ba.select_backend(q, k, v, causal=causal) if impl == "auto" else impl
            out, lse = ba.block_attn_forward(q, k, v, causal=causal, backend=impl)
        except ValueError as e:  # this backend does not support the case: not a measurement
            rows.append(dict(cfg, dtype=str(dtype).replace("torch.", ""), impl=impl, picked="",
                             op="fwd", ms_median="", ms_min="", tflops="",
                             error=f"unsupported: {str(e).split(': ')[-1][:120]}"))
            continue
        record(impl, "fwd", picked,
               lambda: ba.block_attn_forward(q, k, v, causal=causal, backend=impl))
        record(impl, "bwd", picked,
               lambda: ba.block_attn_backward(dout, q, k, v, out, lse, causal=causal, backend=impl))
        del out, lse

    # Baseline: F.scaled_dot_product_attention with torch's own kernel choice on (B, H, S, D)
    # views, inputs requiring grad so that its forward also writes the LSE (the training forward).
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=Hq != Hkv)

    record("sdpa", "fwd", "", sdpa)
    y = sdpa()
    record("sdpa", "bwd", "", lambda: torch.autograd.grad(y, (qt, kt, vt), dout.transpose(1, 2),
                                                          retain_graph=True))
    return rows


def summary_table(rows):
    """One line per config: TFLOP/s of each implementation, forward | backward."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = lambda x: f"{x:>9.3g}" if isinstance(x, float) else f"{x:>9}"  # noqa: E731
    names = "".join(f"{i[:8]:>9}" for i in impls)
    lines = [f"TFLOP/s, median ({len(impls)} implementations; '-' = unsupported or failed)",
             f"{'S':>6} {'Hq/Hkv':>7} {'causal':>6} | forward{' ' * (9 * len(impls) - 7)} | backward",
             f"{'':>6} {'':>7} {'':>6} |{names} |{names} | auto picked"]
    for key in dict.fromkeys((r["S"], r["Hq"], r["Hkv"], r["causal"]) for r in rows):
        mine = [r for r in rows if (r["S"], r["Hq"], r["Hkv"], r["causal"]) == key]
        t = {(r["impl"], r["op"]): (r["tflops"] if r["tflops"] != "" else "-") for r in mine}
        picked = next((r["picked"] for r in mine if r["impl"] == "auto" and r["picked"]), "-")
        S, Hq, Hkv, causal = key
        lines.append(f"{S:>6} {f'{Hq}/{Hkv}':>7} {str(causal):>6} |"
                     + "".join(cell(t.get((i, "fwd"), "-")) for i in impls) + " |"
                     + "".join(cell(t.get((i, "bwd"), "-")) for i in impls) + f" | {picked}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for bench_block_attention.csv/.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few iterations (CPU smoke run)")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="square block sizes (1024: the size of sliding-window pieces, for the cost model)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--v-head-dim", type=int, default=None, help="v's own head dim (MLA); default: --head-dim")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 20)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        available_backends=ba.available_backends(device), dtype=str(dtype),
        flops="fwd 2*B*Hq*S*S*(D + Dv) (halved if causal); bwd 2.5 x fwd",
        timing=(f"median of {args.iters} back-to-back CUDA-event-timed calls after {args.warmup} "
                "warm-up calls"),
    )
    print(f"# {meta['date']}  {meta['device']}  torch {meta['torch']}  backends {meta['available_backends']}")
    rows = []
    for cfg in configs(args, device):
        rows += bench_config(cfg, dtype, device, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["date"], r["device"], r["torch"] = meta["date"], meta["device"], meta["torch"]

    fields = ["date", "device", "torch", "B", "S", "Hq", "Hkv", "D", "Dv", "causal", "dtype", "impl", "picked",
              "op", "ms_median", "ms_min", "tflops", "error"]
    csv_path = os.path.join(args.out, "bench_block_attention.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "bench_block_attention.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"{'S':>6} {'Hq/Hkv':>7} {'causal':>6} {'impl':>10} {'picked':>10} {'op':>3} "
          f"{'ms':>9} {'TFLOP/s':>8}  error")
    for r in rows:
        print(f"{r['S']:>6} {str(r['Hq']) + '/' + str(r['Hkv']):>7} {str(r['causal']):>6} {r['impl']:>10} "
              f"{r['picked']:>10} {r['op']:>3} {str(r['ms_median']):>9} {str(r['tflops']):>8}  {r['error']}")
    print(f"# wrote {csv_path} (+ .json)")
    print(summary_table(rows))


if __name__ == "__main__":
    main()
