"""What the one-process benchmarks share: a CUDA-synchronised median timer, and writing rows
as CSV + JSON (with date, device, torch version, command) and printing them as tables."""
from __future__ import annotations

import csv
import datetime
import json
import os
import statistics
import sys
import time

import torch


def median_ms(fn, device, warmup: int, reps: int) -> float:
    """Median wall-clock milliseconds of fn() over `reps` calls after `warmup` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_meta(device, dtype, **extra) -> dict:
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, dtype=str(dtype).replace("torch.", ""), command=" ".join(sys.argv), **extra)


def write_and_print(out_dir: str, name: str, meta: dict, rows: list[dict], tables: tuple[str, ...]) -> None:
    """OUT/name.json (meta + rows), OUT/name.csv (rows), then each table's rows printed."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    fields = sorted({k for r in rows for k in r})
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"# {meta['date']} {meta['device']} torch {meta['torch']} {meta['dtype']} {meta.get('shape', '')}")
    for table in tables:
        sel = [r for r in rows if r["table"] == table]
        cols = [c for c in sel[0] if c != "table"]
        print(f"\n[{table}]  " + "  ".join(cols))
        for r in sel:
            print("  " + "  ".join(str(r[c]) for c in cols))


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def parse_common(p, argv, *, warmup: int, reps: int, small_heads: tuple[int, int, int]):
    """Add the options every one-process benchmark has (--out, --device, --quick, heads, timing),
    parse, and fill in the head shape: small_heads (q, kv, d) on CPU / --quick, else 32q/8kv d=128.
    Returns (args, device, dtype (fp32 on CPU, bf16 on CUDA), small)."""
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="small CPU-sized shapes")
    p.add_argument("--heads-q", type=int, default=None)
    p.add_argument("--heads-kv", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--reps", type=int, default=reps)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.quick or device.type == "cpu"
    for name, s, big in zip(("heads_q", "heads_kv", "head_dim"), small_heads, (32, 8, 128)):
        if getattr(args, name) is None:
            setattr(args, name, s if small else big)
    return args, device, torch.float32 if device.type == "cpu" else torch.bfloat16, small
