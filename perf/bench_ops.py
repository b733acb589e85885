"""Benchmark ringattn's memory-bound ops against the device copy bandwidth and eager PyTorch.

    python perf/bench_ops.py --out perf/out/ops              # CUDA: the full size grid
    python perf/bench_ops.py --out /tmp/bench_ops --quick    # smoke run: small sizes (CPU or CUDA)

Measures, in one process: the device copy bandwidth (one large device-to-device copy, bytes
read + written) as the ceiling; merge_attn_states (out of place), merge_attn_states_ (in place,
fp32 accumulator, bf16 partial) at B=1, H=32, D=128, S in {4k, 16k, 64k}; add_rmsnorm at tokens in
{1k, 4k, 16k} x hidden in {4096, 8192}; all bf16, each next to the obvious eager-PyTorch
composition; on CUDA add_rmsnorm also with each vectors-per-thread launch choice forced
(impl "ringattn[vpt=K]", RINGATTN_ADD_RMSNORM_VPT), so the automatic choice can be judged. Timing: warm-up, then CUDA events around every rep, enqueued behind a GPU sleep so
Python launch overhead never starves the GPU; median of --reps reps; buffers rotate over enough
sets (>= 4x the L2 size) that L2 never holds a rep's inputs. Throughput counts the bytes each op
must move at minimum (reads + writes); "% copy" is that over the measured copy bandwidth.

Writes ops.csv and ops.json (date, device, torch version, command, rows) into --out and prints a
short table. On CPU (no GPU, or --device cpu) it runs the same flow with wall-clock timers.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ringattn.ops as ops  # noqa: E402

NEG_INF = float("-inf")


@dataclass
class Row:
    op: str
    impl: str           # ringattn | eager | torch (the copy ceiling)
    shape: str
    dtype: str
    bytes: int          # minimum bytes moved (read + written)
    time_us: float      # median per rep
    gbps: float
    pct_copy: float     # of the measured copy bandwidth
    speedup_vs_eager: float | None
    max_abs_diff_vs_eager: float | None


class Timer:
    """Median per-rep time of fn(i) (i: rep counter, for buffer rotation)."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.counter = 0

    def _call(self, fn):
        fn(self.counter)
        self.counter += 1

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            self._call(fn)
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                self._call(fn)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        torch.cuda.synchronize()
        batch = min(self.reps, 50)
        t0 = time.perf_counter()
        for _ in range(batch):
            self._call(fn)
        enqueue_s = (time.perf_counter() - t0) / batch   # upper bound (includes GPU back-pressure)
        torch.cuda.synchronize()
        times = []
        while len(times) < self.reps:
            k = min(batch, self.reps - len(times))
            # Keep the GPU busy while Python enqueues the k reps (assume <= 2 GHz SM clock).
            torch.cuda._sleep(int(min(0.05, 2 * enqueue_s * k) * 2e9))
            events = [torch.cuda.Event(enable_timing=True) for _ in range(k + 1)]
            events[0].record()
            for j in range(k):
                self._call(fn)
                events[j + 1].record()
            torch.cuda.synchronize()
            times += [events[j].elapsed_time(events[j + 1]) / 1e3 for j in range(k)]
        return statistics.median(times)


def n_sets(bytes_per_set: int, device: torch.device) -> int:
    """Buffer sets to rotate so that >= 4x L2 is touched between two uses of one set."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(4 * l2 / max(bytes_per_set, 1))))


# ---- the eager compositions (what a user would write) ----------------------------------------


def eager_merge(oa, la, ob, lb):
    lse = torch.logaddexp(la, lb)
    safe = torch.where(lse == NEG_INF, torch.zeros_like(lse), lse)
    wa = torch.exp(la - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lb - safe).transpose(1, 2).unsqueeze(-1)
    return (oa.float() * wa + ob.float() * wb).to(oa.dtype), lse


def eager_merge_(acc, acc_lse, part, part_lse):
    lse = torch.logaddexp(acc_lse, part_lse)
    safe = torch.where(lse == NEG_INF, torch.zeros_like(lse), lse)
    wa = torch.exp(acc_lse - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(part_lse - safe).transpose(1, 2).unsqueeze(-1)
    acc.copy_(acc * wa + part.float() * wb)
    acc_lse.copy_(lse)


def eager_add_rmsnorm(x, residual, weight, eps):
    new_res = x + residual
    f = new_res.float()
    y = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y, new_res


# ---- benchmarks ------------------------------------------------------------------------------


def bench_copy(timer: Timer, device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = timer(lambda i: dst.copy_(src))
    return 2 * nbytes / t / 1e9


def _rows(op, shape, dtype, nbytes, t_ours, t_eager, copy_gbps, diff):
    out = []
    for impl, t in (("ringattn", t_ours), ("eager", t_eager)):
        gbps = nbytes / t / 1e9
        out.append(Row(op, impl, shape, str(dtype).replace("torch.", ""), nbytes, t * 1e6, gbps,
                       100 * gbps / copy_gbps, t_eager / t if impl == "ringattn" else None,
                       diff if impl == "ringattn" else None))
    return out


def bench_merge(timer, device, S, H, D, dtype, copy_gbps, inplace: bool):
    B = 1
    n = B * S * H * D
    el = torch.tensor([], dtype=dtype).element_size()
    if inplace:  # acc fp32 read + write, part read; acc_lse read + write, part_lse read
        nbytes = 2 * 4 * n + el * n + 3 * 4 * B * H * S
    else:        # out_a, out_b read, out written; 3 lse
        nbytes = 3 * el * n + 3 * 4 * B * H * S
    sets = []
    for _ in range(n_sets(nbytes, device)):
        oa = torch.randn(B, S, H, D, device=device, dtype=dtype)
        la = torch.randn(B, H, S, device=device) * 3
        ob = torch.randn(B, S, H, D, device=device, dtype=dtype)
        lb = torch.randn(B, H, S, device=device) * 3
        if inplace:
            oa = oa.float()
        sets.append((oa, la, ob, lb))
    k = len(sets)
    if inplace:
        # Correctness next to speed: one fold each way from the same state.
        a1, l1 = sets[0][0].clone(), sets[0][1].clone()
        a2, l2 = a1.clone(), l1.clone()
        ops.merge_attn_states_(a1, l1, sets[0][2], sets[0][3])
        eager_merge_(a2, l2, sets[0][2], sets[0][3])
        diff = (a1 - a2).abs().max().item()
        del a1, l1, a2, l2
        t_ours = timer(lambda i: torch.ops.ringattn.merge_attn_states_.default(*sets[i % k]))
        t_eager = timer(lambda i: eager_merge_(*sets[i % k]))
        op = "merge_attn_states_"
    else:
        o1, _ = ops.merge_attn_states(*sets[0])
        o2, _ = eager_merge(*sets[0])
        diff = (o1.float() - o2.float()).abs().max().item()
        del o1, o2
        t_ours = timer(lambda i: torch.ops.ringattn.merge_attn_states.default(*sets[i % k]))
        t_eager = timer(lambda i: eager_merge(*sets[i % k]))
        op = "merge_attn_states"
    shape = f"B={B} S={S} H={H} D={D}"
    del sets
    return _rows(op, shape, dtype, nbytes, t_ours, t_eager, copy_gbps, diff)


VPT_ENV = "RINGATTN_ADD_RMSNORM_VPT"


def bench_add_rmsnorm(timer, device, tokens, hidden, dtype, copy_gbps, eps=1e-6, forced_vpt=True):
    el = torch.tensor([], dtype=dtype).element_size()
    nbytes = 4 * el * tokens * hidden + el * hidden  # x, residual read; y, new_residual written; weight
    sets = []
    for _ in range(n_sets(nbytes, device)):
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        r = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        sets.append((x, r, w))
    k = len(sets)
    y1, _ = ops.add_rmsnorm(*sets[0], eps)
    y2, _ = eager_add_rmsnorm(*sets[0], eps)
    diff = (y1.float() - y2.float()).abs().max().item()
    del y1, y2
    t_ours = timer(lambda i: torch.ops.ringattn.add_rmsnorm.default(*sets[i % k], eps))
    t_eager = timer(lambda i: eager_add_rmsnorm(*sets[i % k], eps))
    shape = f"tokens={tokens} hidden={hidden}"
    rows = _rows("add_rmsnorm", shape, dtype, nbytes, t_ours, t_eager, copy_gbps, diff)
    # The launch choice under test (csrc/cuda/add_rmsnorm.cu choose_vpt): every forced vectors-per-
    # thread value the row allows, same process and buffers, so the default's pick can be judged.
    vec = 16 // el
    if device.type == "cuda" and forced_vpt and hidden % vec == 0:
        for v in (1, 2, 4):
            if -(-(hidden // vec) // v) > 512:
                continue
            os.environ[VPT_ENV] = str(v)
            try:
                t = timer(lambda i: torch.ops.ringattn.add_rmsnorm.default(*sets[i % k], eps))
            finally:
                del os.environ[VPT_ENV]
            gbps = nbytes / t / 1e9
            rows.append(Row("add_rmsnorm", f"ringattn[vpt={v}]", shape, str(dtype).replace("torch.", ""), nbytes,
                            t * 1e6, gbps, 100 * gbps / copy_gbps, t_eager / t, None))
    del sets
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for ops.csv / ops.json")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run); implied on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed reps per measurement (default 100; 5 on CPU)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-forced-vpt", action="store_true",
                   help="skip the add_rmsnorm rows with each vectors-per-thread choice forced (CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or device.type != "cuda"
    reps = args.reps or (100 if device.type == "cuda" else 5)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    timer = Timer(device, reps, args.warmup)
    dtype = torch.bfloat16
    torch.manual_seed(0)

    copy_bytes = (64 << 20) if quick else (1 << 30)
    copy_gbps = bench_copy(timer, device, copy_bytes)
    rows = [Row("copy", "torch", f"{copy_bytes >> 20} MiB D2D", "uint8", 2 * copy_bytes,
                2 * copy_bytes / copy_gbps / 1e3, copy_gbps, 100.0, None, None)]
    seqlens = [256, 1024] if quick else [4096, 16384, 65536]
    H, D = (8, 128) if quick else (32, 128)
    for S in seqlens:
        rows += bench_merge(timer, device, S, H, D, dtype, copy_gbps, inplace=False)
        rows += bench_merge(timer, device, S, H, D, dtype, copy_gbps, inplace=True)
    token_list = [64, 256] if quick else [1024, 4096, 16384]
    hiddens = [1024, 4096] if quick else [4096, 8192]
    for tokens in token_list:
        for hidden in hiddens:
            rows += bench_add_rmsnorm(timer, device, tokens, hidden, dtype, copy_gbps,
                                      forced_vpt=not args.no_forced_vpt)

    os.makedirs(args.out, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "reps": reps,
        "timing": "median of per-rep CUDA events behind a GPU sleep" if device.type == "cuda" else "wall clock",
        "copy_gbps": copy_gbps,
    }
    with open(os.path.join(args.out, "ops.json"), "w") as f:
        json.dump({**meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(args.out, "ops.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))

    print(f"# {dev_name}, torch {torch.__version__}, copy ceiling {copy_gbps:.0f} GB/s (read + write)")
    print(f"{'op':<20} {'shape':<28} {'impl':<9} {'MB':>8} {'time us':>10} {'GB/s':>8} {'% copy':>7} "
          f"{'speedup':>8}")
    for r in rows:
        sp = f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else ""
        print(f"{r.op:<20} {r.shape:<28} {r.impl:<9} {r.bytes / 1e6:>8.1f} {r.time_us:>10.1f} {r.gbps:>8.0f} "
              f"{r.pct_copy:>6.0f}% {sp:>8}")
    print(f"# wrote {os.path.join(args.out, 'ops.csv')} and ops.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
