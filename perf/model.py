"""Cost model CLI (ringattn/cost_model.py): calibrate, measure, predict, validate, answer, auto.

    # compute side from the measured H100 CSVs (writes the profile JSON, prints fit vs measured)
    python perf/model.py calibrate --block-csv perf/results/2026-11-22_h100_bench_block_attention.csv \
        --ops-csv perf/results/2026-11-22_h100_bench_ops.csv --out perf/results/2026-12-01_cost_model_h100_profile.json
    # compute AND link side measured on this machine (math backend, gloo between 2 local processes)
    python perf/model.py calibrate --calibrate-local --out perf/results/2026-12-01_cost_model_cpu_profile.json
    # measured multi-rank runs: perf/sweep.py (gloo), 3 rounds merged (ms_min = min over rounds)
    python perf/model.py measure --out perf/results/2026-12-01_cost_model_cpu_runs.csv
    # predicted vs measured, per row (any CSV with the perf/sweep.py columns)
    python perf/model.py validate --sweep perf/results/2026-12-01_cost_model_cpu_runs.csv \
        --profile perf/results/2026-12-01_cost_model_cpu_profile.json --out perf/results/2026-12-01_cost_model_validation.csv
    # on the GPU machine, after perf/sweep.py wrote its CSV there (NOT run yet: no GPU was lent):
    python perf/model.py validate --sweep <gpu sweep csv> --profile perf/results/2026-12-01_cost_model_h100_profile.json \
        --topology shared_gpu
    python perf/model.py predict --algorithm token_ring --seq-len 131072 --world 8 --causal --layout zigzag
    python perf/model.py answer --out-csv perf/results/2026-12-03_cost_model_answer.csv --out-md /tmp/answer.md
    # what algorithm="auto" picks (ring / token_ring / ulysses) over the same grid, and without the fit's intercepts
    python perf/model.py auto --out-csv perf/results/2026-12-07_cost_model_auto.csv --out-md /tmp/auto.md

Profile JSON: {"compute": ComputeProfile.to_json(), "topology": Topology.to_json() or null,
"meta": {...}, "fit": [rows measured vs fitted]}. Every number in it is a fit to measured rows
named in "meta"; link numbers of the presets are ASSUMED spec-sheet values (cost_model.PRESETS).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ringattn import cost_model as cm  # noqa: E402

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _bool(x) -> bool:
    return str(x).strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------
# calibrate: from CSVs


def fit_block_csv(path: str):
    """{(impl, op, causal): Curve} fitted to a bench_block_attention.csv, the rows with their
    fitted times, the dtype and the auto alias. sdpa (not a ringattn backend) and auto (an alias
    of the backend it picked) are not fitted."""
    rows = [r for r in csv.DictReader(open(path)) if r.get("ms_median") and not r.get("error")]
    groups, dtypes, picked = {}, set(), {}
    for r in rows:
        if r["impl"] == "auto":
            picked[r["picked"]] = picked.get(r["picked"], 0) + 1
        if r["impl"] in ("sdpa", "auto"):
            continue
        c = _bool(r["causal"])
        work = cm.attention_flops(r["op"], int(r["B"]), int(r["Hq"]), int(r["S"]), int(r["S"]), int(r["D"]), c)
        groups.setdefault((r["impl"], r["op"], c), []).append((work, float(r["ms_median"]) / 1e3, r))
        dtypes.add(r["dtype"])
    curves, table = {}, []
    for key, pts in sorted(groups.items()):
        curve, _ = cm.fit_curve([(w, t) for w, t, _ in pts])
        curves[key] = curve
        for w, t, r in pts:
            table.append(dict(impl=key[0], op=key[1], causal=key[2], S=int(r["S"]), Hq=int(r["Hq"]),
                              Hkv=int(r["Hkv"]), measured_ms=t * 1e3, fitted_ms=curve.time(w) * 1e3,
                              rel_err=curve.time(w) / t - 1))
    aliases = {"auto": max(picked, key=picked.get)} if picked else {}
    return curves, table, ",".join(sorted(dtypes)), aliases


def fit_ops_csv(path: str, op: str = "merge_attn_states_"):
    rows = [r for r in csv.DictReader(open(path)) if r["op"] == op and r["impl"] == "ringattn"]
    pts = [(float(r["bytes"]), float(r["time_us"]) / 1e6) for r in rows]
    curve, _ = cm.fit_curve(pts)
    table = [dict(op=op, shape=r["shape"], bytes=int(r["bytes"]), measured_us=float(r["time_us"]),
                  fitted_us=curve.time(float(r["bytes"])) * 1e6,
                  rel_err=curve.time(float(r["bytes"])) / (float(r["time_us"]) / 1e6) - 1) for r in rows]
    return curve, table


def profile_from_csvs(block_csv: str, ops_csv: str, name: str = "h100_bf16"):
    curves, btab, dtype, aliases = fit_block_csv(block_csv)
    mem, mtab = fit_ops_csv(ops_csv)
    src = (f"fit to {os.path.relpath(block_csv, ROOT)} and the merge_attn_states_ rows of "
           f"{os.path.relpath(ops_csv, ROOT)}")
    return cm.ComputeProfile(name, dtype, curves, mem, aliases, False, src), btab, mtab


def _print_fit(btab, mtab):
    print("block attention: measured vs fitted (t = overhead + FLOPs / rate)")
    print(f"{'impl':>10} {'op':>4} {'causal':>6} {'S':>6} {'Hkv':>4} {'meas ms':>9} {'fit ms':>9} {'err':>7}")
    for r in btab:
        print(f"{r['impl']:>10} {r['op']:>4} {str(r['causal']):>6} {r.get('S', r.get('Sq', '')):>6} "
              f"{r['Hkv']:>4} {r['measured_ms']:9.4f} {r['fitted_ms']:9.4f} {100 * r['rel_err']:6.1f}%")
    if mtab:
        print("memory pass (merge_attn_states_): measured vs fitted")
        for r in mtab:
            print(f"  {r['shape']:>28} {r['bytes']:>11} B {r['measured_us']:9.2f} us fit {r['fitted_us']:9.2f} us "
                  f"{100 * r['rel_err']:6.1f}%")


# --------------------------------------------------------------------------------------------
# calibrate: on this machine


def _min_time(fn, reps, warmup=1):
    """Fastest of `reps` calls: on a machine shared with other work, interference only ever adds
    time, so the minimum is the best estimate of an undisturbed call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def cpu_idle_fraction(seconds: float = 2.0) -> float:
    """Fraction of this machine's CPU time that was idle over `seconds` (/proc/stat; 1.0 if unknown)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    try:
        i0, t0 = snap()
        time.sleep(seconds)
        i1, t1 = snap()
        return (i1 - i0) / max(1, t1 - t0)
    except OSError:
        return 1.0


def wait_idle(threshold: float, max_wait_s: float) -> float:
    """Wait until the machine is at least `threshold` idle (other engineers' jobs share it)."""
    deadline = time.monotonic() + max_wait_s
    idle = cpu_idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        print(f"  machine {100 * idle:.0f}% idle, waiting for >= {100 * threshold:.0f}% ...", flush=True)
        time.sleep(10)
        idle = cpu_idle_fraction()
    return idle


def _time_compute(threads: int, reps: int, quick: bool, barrier=None):
    """Raw timings on this process: [(key, work, seconds, shape)] for block attention and
    [(bytes, seconds)] for merge_attn_states_. With a barrier, every shape starts at the same time
    in all the processes that share it (co-scheduled as the ranks of a run are)."""
    import torch

    import ringattn
    from ringattn.ops import merge_attn_states_

    torch.set_num_threads(threads)
    sync = barrier.wait if barrier is not None else (lambda: None)
    B, Hq, D = 1, 4, 64
    # the block shapes of `measure`'s runs (n = L/W in {256, 512, 1024, 2048}): n x n, and the
    # zigzag off-diagonal n x n/2 and n/2 x n; and Ulysses' one L x L block (L in {1024, 4096}),
    # without which its 4096-token block was extrapolated 23% too fast (2026-12-07, RESULTS.md)
    sizes = [(n, n) for n in (128, 256, 512, 1024, 2048, 4096)] + [(n, n // 2) for n in (256, 512, 1024, 2048)] \
        + [(n // 2, n) for n in (512, 2048)]
    if quick:
        sizes = [(128, 128), (256, 256), (256, 128)]
    gen = torch.Generator().manual_seed(0)
    att = []
    for Sq, Sk in sizes:
        for hkv in (Hq, 1):
            for causal in ((False, True) if Sq == Sk else (False,)):
                q = torch.randn(B, Sq, Hq, D, generator=gen)
                k, v = torch.randn(B, Sk, hkv, D, generator=gen), torch.randn(B, Sk, hkv, D, generator=gen)
                dout = torch.randn(B, Sq, Hq, D, generator=gen)
                out, lse = ringattn.block_attn_forward(q, k, v, causal=causal)
                dq, dk, dv = (torch.zeros(t.shape) for t in (q, k, v))
                fns = {"fwd": lambda: ringattn.block_attn_forward(q, k, v, causal=causal),
                       "bwd": lambda: ringattn.block_attn_backward(dout, q, k, v, out, lse, causal=causal,
                                                                    dq_out=dq, dk_out=dk, dv_out=dv)}
                for op, fn in fns.items():
                    sync()
                    t = _min_time(fn, reps)
                    work = cm.attention_flops(op, B, Hq, Sq, Sk, D, causal)
                    att.append((("math", op, causal), work, t, dict(Sq=Sq, Sk=Sk, Hkv=hkv, Hq=Hq, D=D)))
    mem = []
    for rows in ((128, 256, 512, 1024, 2048, 4096) if not quick else (128, 512)):
        acc = torch.zeros(B, rows, Hq, D)
        acc_lse = torch.zeros(B, Hq, rows)
        po, pl = torch.randn(B, rows, Hq, D, generator=gen), torch.randn(B, Hq, rows, generator=gen)
        sync()
        t = _min_time(lambda: merge_attn_states_(acc, acc_lse, po, pl), max(reps, 10))
        mem.append((B * rows * Hq * (D * (8 + 4) + 12), t, f"B={B} S={rows} H={Hq} D={D}"))
    return att, mem


def _compute_worker(threads, reps, quick, barrier, out_q):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        out_q.put(("ok", _time_compute(threads, reps, quick, barrier)))
    except BaseException:  # noqa: BLE001
        out_q.put(("error", traceback.format_exc()))


def local_compute_profile(threads: int, reps: int, quick: bool, concurrent: int = 1):
    """Time ringattn.block_attn_forward/backward (backend auto -> math on CPU, fp32) at the block
    shapes of `measure`'s runs, the backward with fp32 accumulators as the algorithms pass them,
    and merge_attn_states_; fit the same curves as for the GPU, keeping the measured points to
    interpolate between. concurrent: that many processes time every shape at the same time (as
    the ranks of a multi-rank run compute at the same time); their times are averaged."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out_q = ctx.Barrier(concurrent), ctx.Queue()
    procs = [ctx.Process(target=_compute_worker, args=(threads, reps, quick, barrier, out_q), daemon=True)
             for _ in range(concurrent)]
    for p in procs:
        p.start()
    answers = [out_q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    bad = [v for k, v in answers if k != "ok"]
    if bad:
        raise RuntimeError("compute calibration failed:\n" + bad[0])
    runs = [v for _, v in answers]
    att = [(key, w, statistics.mean(r[0][i][2] for r in runs), shape) for i, (key, w, _, shape) in enumerate(runs[0][0])]
    mem_rows = [(nb, statistics.mean(r[1][i][1] for r in runs), shape) for i, (nb, _, shape) in enumerate(runs[0][1])]
    groups, table = {}, []
    for key, w, t, shape in att:
        groups.setdefault(key, []).append((w, t, shape))
    curves = {}
    for key, pts in sorted(groups.items()):  # the fit, plus the measured points to interpolate between
        curve, _ = cm.fit_curve([(w, t) for w, t, _ in pts])
        curve = dataclasses.replace(curve, points=cm.interpolation_points([(w, t) for w, t, _ in pts]))
        curves[key] = curve
        for w, t, shape in pts:
            table.append(dict(impl=key[0], op=key[1], causal=key[2], S=f"{shape['Sq']}x{shape['Sk']}",
                              Hq=shape["Hq"], Hkv=shape["Hkv"], measured_ms=t * 1e3, fitted_ms=curve.time(w) * 1e3,
                              rel_err=curve.time(w) / t - 1, line_ms=curve._fit(w) * 1e3))
    mem_pts = [(nb, t) for nb, t, _ in mem_rows]
    mem, _ = cm.fit_curve(mem_pts)
    mem = dataclasses.replace(mem, points=cm.interpolation_points(mem_pts))
    mtab = [dict(op="merge_attn_states_", shape=shape, bytes=nb, measured_us=t * 1e6, fitted_us=mem.time(nb) * 1e6,
                 rel_err=mem.time(nb) / t - 1) for nb, t, shape in mem_rows]
    prof = cm.ComputeProfile("local_cpu", "float32", curves, mem, {"auto": "math"}, True,
                             f"measured on {platform.node()} ({platform.processor() or 'cpu'}) by "
                             f"perf/model.py calibrate --calibrate-local: torch.set_num_threads({threads}), "
                             f"{concurrent} processes timing each shape at the same time (min of {reps}, averaged)",
                             batched_tiles=False)  # documents.TILE_MODE "auto" runs tiles one by one on CPU
    return prof, table, mtab


def _gloo_worker(rank, world, init_file, sizes, reps, out_q):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        peer = 1 - rank
        res = {"oneway": [], "bidi": [], "allgather_s": None}
        for n in sizes:
            a, b = torch.ones(n // 4), torch.empty(n // 4)
            ts = []
            for i in range(reps + 1):  # ping-pong: one-way = half the round trip
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(a, peer)
                    dist.recv(b, peer)
                else:
                    dist.recv(b, peer)
                    dist.send(a, peer)
                if i:
                    ts.append((time.perf_counter() - t0) / 2)
            res["oneway"].append((n, min(ts)))
            ts = []
            for i in range(reps + 1):  # both directions at once, as every ring/TokenRing step does
                dist.barrier()
                t0 = time.perf_counter()
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, a, peer), dist.P2POp(dist.irecv, b, peer)])
                for w in works:
                    w.wait()
                if i:
                    ts.append(time.perf_counter() - t0)
            res["bidi"].append((n, min(ts)))
        sig = torch.zeros(25, dtype=torch.int64)
        table = [torch.empty_like(sig) for _ in range(world)]
        ts = []
        for i in range(max(reps, 20) + 1):  # the metadata exchange every call starts with
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather(table, sig)
            [t.tolist() for t in table]
            if i:
                ts.append(time.perf_counter() - t0)
        res["allgather_s"] = min(ts)
        if rank == 0:
            out_q.put(("ok", res))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        out_q.put(("error", traceback.format_exc()))


def _spawn(target, world, args, timeout):
    """Run target(rank, world, init_file, *args, out_q) in `world` fresh processes; return the
    first answer on out_q (rank 0's), killing everything after `timeout` seconds."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="ringattn_model_")
    out_q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, os.path.join(tmp, "rdv"), *args, out_q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        kind, value = out_q.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: a hang
        kind, value = "error", f"no answer within {timeout} s (killed)"
    for p in procs:
        p.join(timeout=10 if kind == "ok" else 1)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if kind != "ok":
        raise RuntimeError(f"{getattr(target, '__name__', target)} failed:\n{value}")
    return value


def local_topology(reps: int, quick: bool, threads: int = 1):
    sizes = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20] if not quick else [4 << 10, 1 << 20]
    res = _spawn(_gloo_worker, 2, (sizes, reps), timeout=300)
    one, _ = cm.fit_curve(res["oneway"])
    bidi, _ = cm.fit_curve(res["bidi"])
    cores = os.cpu_count() or 1
    topo = cm.Topology("local", one.rate, one.overhead_s, full_duplex=True, host_bps=2 * bidi.rate,
                       ranks_per_device=1.0, call_s=res["allgather_s"], device_slots=max(1.0, cores / threads),
                       source=(f"MEASURED on {platform.node()} ({cores} CPU cores), gloo over loopback between 2 "
                               f"processes: one-way {one.rate / 1e9:.2f} GB/s + {one.overhead_s * 1e6:.0f} us; "
                               f"both directions at once {bidi.rate / 1e9:.2f} GB/s each (shared host "
                               f"{2 * bidi.rate / 1e9:.2f} GB/s); metadata all_gather {res['allgather_s'] * 1e6:.0f} us"))
    return topo, res, cores


# --------------------------------------------------------------------------------------------
# measure: real multi-rank runs


MEASURE_WORLDS, MEASURE_SEQS, MEASURE_HEADS = (2, 4), (1024, 4096), ("4/4", "4/1")
MEASURE_MASKS, MEASURE_PASSES = ("zigzag", "contiguous"), ("fwd", "fwd_bwd")


def _sweep_module():
    """perf/sweep.py, imported as `sweep` (its spawned workers pickle functions by module name)."""
    perf = os.path.join(ROOT, "perf")
    if perf not in sys.path:
        sys.path.insert(0, perf)
    import sweep

    return sweep


def measure_sweep_argv(out_csv, mask, *, worlds, seqs, heads, head_dim, passes, reps, timeout, threads=1,
                       algorithms=("ring", "token_ring")):
    """perf/sweep.py arguments for one round of the validation grid and one mask: "zigzag" = causal
    zigzag, "contiguous" = non-causal contiguous, "causal" = causal contiguous, "windowN" = causal
    contiguous with a sliding window of N; `algorithms` (default ring and token_ring; any of
    cost_model.MODELED), fp32 gloo, no single baseline and no overlap runs (the model validates
    total time)."""
    extra = []
    if mask == "zigzag":
        causal, layout = "1", "zigzag"
    elif mask == "contiguous":
        causal, layout = "0", "contiguous"
    elif mask == "causal" or mask.startswith("window"):
        causal, layout = "1", "contiguous"
        if mask != "causal":
            extra = ["--windows", str(int(mask[len("window"):]))]
    else:
        raise ValueError(f"mask must be zigzag, contiguous, causal or windowN, got {mask!r}")
    return extra + ["--out", out_csv, "--fresh", "--transport", "gloo", "--algorithms", ",".join(algorithms), "--no-single",
            "--overlap-iters", "0", "--worlds", ",".join(str(w) for w in worlds),
            "--seqs", ",".join(str(L) for L in seqs), "--heads", ",".join(heads), "--head-dim", str(head_dim),
            "--batch", "1", "--dtype", "float32", "--causal", causal, "--layout", layout, "--pass", ",".join(passes),
            "--warmup", "1", "--iters", str(reps), "--timeout", str(timeout), "--threads", str(threads),
            "--no-progress"]


def merge_rounds(rounds_rows, key):
    """One row per sweep key from several rounds of the same sweep: ms_min = min over the rounds
    (interference on a shared machine only adds time), ms_median = median of the rounds' medians;
    a key errored in every round keeps its last error row."""
    by_key = {}
    for rows in rounds_rows:
        for r in rows:
            by_key.setdefault(key(r), []).append(r)
    out = []
    for rs in by_key.values():
        ok = [r for r in rs if not r.get("error") and r.get("ms_min")]
        if not ok:
            out.append(rs[-1])
            continue
        row = dict(ok[-1])
        row["ms_min"] = min(float(r["ms_min"]) for r in ok)
        row["ms_median"] = statistics.median(float(r["ms_median"]) for r in ok)
        row["iters"] = sum(int(r.get("iters") or 0) for r in ok)
        row["command"] = f"perf/model.py measure: {len(ok)} round(s) of " + str(ok[-1].get("command", ""))
        out.append(row)
    return out


def measure(out_csv, *, rounds=3, masks=MEASURE_MASKS, **grid):
    """Real multi-rank runs for `validate`, through perf/sweep.py (the one multi-rank timing
    harness): `rounds` passes over the grid, each a fresh sweep CSV next to out_csv
    (out.roundK.MASK.csv, kept), merged into out_csv with sweep's columns. Spreading a config's
    calls over rounds lets ms_min find an undisturbed one on a busy machine."""
    sweep = _sweep_module()
    base = out_csv[:-4] if out_csv.endswith(".csv") else out_csv
    rounds_rows = []
    for k in range(rounds):
        for mask in masks:
            path = f"{base}.round{k}.{mask}.csv"
            rc = sweep.main(measure_sweep_argv(path, mask, **grid))
            if rc:
                raise SystemExit(f"perf/sweep.py stopped early (round {k}, {mask}); partial rows in {path}")
            rounds_rows.append(sweep._read_csv(path))
    rows = merge_rounds(rounds_rows, sweep._key)
    sweep._write_csv(out_csv, rows)
    return rows


# --------------------------------------------------------------------------------------------
# validate


def load_profile(path: str):
    d = json.load(open(path))
    topo = cm.Topology.from_json(d["topology"]) if d.get("topology") else None
    return cm.ComputeProfile.from_json(d["compute"]), topo, d.get("meta", {})


def topology_for_row(row, profile_topo, preset: str | None, cores: int, threads: int):
    world = int(row["world"])
    if preset == "shared_gpu":
        return shared_gpu_topology(world)
    if preset:
        return cm.get_topology(preset)
    if profile_topo is None:
        raise ValueError("no topology: pass --topology or a profile with a measured topology")
    # the measured local topology: W processes with `threads` threads each on `cores` cores
    return dataclasses.replace(profile_topo, ranks_per_device=max(1.0, world * threads / cores), device_slots=0.0)


def shared_gpu_topology(world: int):
    """W ranks on ONE GPU (the lent-H100 sweep: CudaIpcTransport under MPS): cost_model's
    "shared_gpu" preset (its numbers are ASSUMED, see there) with ranks_per_device = W spelled out."""
    return dataclasses.replace(cm.PRESETS["shared_gpu"], ranks_per_device=float(world), device_slots=0.0)


def validate(rows, profile, profile_topo, preset, cores, threads, stat="min"):
    out = []
    for row in rows:
        alg = row.get("resolved_algorithm") or row.get("algorithm")
        if row.get("error") or not row.get(f"ms_{stat}") or alg not in cm.MODELED:
            continue
        window = int(row["window"]) if str(row.get("window") or "").strip() not in ("", "0") else None
        topo = topology_for_row(row, profile_topo, preset, cores, threads)
        e = DTYPE_BYTES[str(row["dtype"]).replace("torch.", "")]
        p = cm.predict(alg, seq_len=int(row["seq_len"]), world_size=int(row["world"]), layout=row["layout"],
                       causal=_bool(row["causal"]), batch=int(row["batch"]), heads_q=int(row["heads_q"]),
                       heads_kv=int(row["heads_kv"]), head_dim=int(row["head_dim"]), dtype=e,
                       backward=row["pass"] == "fwd_bwd", topology=topo, profile=profile, sliding_window=window)
        meas = float(row[f"ms_{stat}"])
        sent_pred = max(sum(s for s, _ in ch.values()) for ch in p.bytes) if p.bytes else 0
        out.append(dict(date=row.get("date", ""), device=row.get("device", ""), algorithm=alg, world=row["world"],
                        seq_len=row["seq_len"], heads_q=row["heads_q"], heads_kv=row["heads_kv"],
                        head_dim=row["head_dim"], dtype=row["dtype"], causal=row["causal"], layout=row["layout"],
                        window=window or "", **{"pass": row["pass"]}, measured_ms=meas, predicted_ms=round(p.total_s * 1e3, 4),
                        predicted_compute_ms=round(p.compute_s * 1e3, 4),
                        predicted_exposed_ms=round(p.exposed_comm_s * 1e3, 4),
                        rel_err=round(p.total_s * 1e3 / meas - 1, 4),
                        ranks_per_device=topo.ranks_per_device,
                        sent_bytes_max=row.get("sent_bytes_max", ""), predicted_sent_bytes_max=sent_pred))
    return out


def _by_config(vrows, fields):
    pairs = {}
    for r in vrows:
        pairs.setdefault(tuple(str(r.get(k, "")) for k in fields), {})[r["algorithm"]] = r
    return pairs


def winner_agreement(vrows):
    """Per config measured with two or more algorithms: the measured and the predicted fastest."""
    res = []
    for key, d in _by_config(vrows, ("world", "seq_len", "heads_q", "heads_kv", "head_dim", "dtype", "causal",
                                     "layout", "window", "pass")).items():
        if len(d) >= 2:
            res.append(dict(key=key, measured=min(d, key=lambda a: d[a]["measured_ms"]),
                            predicted=min(d, key=lambda a: d[a]["predicted_ms"])))
    return res


def validation_markdown(vrows):
    """One line per config: measured and predicted ms of each algorithm measured, the relative
    errors, and the fastest measured / predicted."""
    algs = [a for a in cm.MODELED if any(r["algorithm"] == a for r in vrows)]
    lines = ["| W | L | Hq/Hkv | mask | pass | " + " | ".join(f"{a} meas / pred ms (err)" for a in algs)
             + " | fastest meas / pred |", "|---|---|---|---|---|" + "---|" * (len(algs) + 1)]
    for key, d in _by_config(vrows, ("world", "seq_len", "heads_q", "heads_kv", "causal", "layout", "window",
                                     "pass")).items():
        W, L, hq, hkv, causal, layout, window, pss = key
        cells = []
        for alg in algs:
            r = d.get(alg)
            cells.append("-" if r is None else
                         f"{float(r['measured_ms']):.1f} / {float(r['predicted_ms']):.1f} ({100 * float(r['rel_err']):+.0f}%)")
        best = "-"
        if len(d) >= 2:
            best = (min(d, key=lambda a: float(d[a]["measured_ms"])) + " / "
                    + min(d, key=lambda a: float(d[a]["predicted_ms"])))
        mask = f"causal {layout}" if _bool(causal) else f"non-causal {layout}"
        if window:
            mask += f", window {window}"
        lines.append(f"| {W} | {L} | {hq}/{hkv} | {mask} | {pss} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# answer: TokenRing vs ring, model predictions


ANSWER_L = [8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]
ANSWER_W = [2, 4, 8, 16, 32]
ANSWER_TOPOLOGIES = ["nvswitch", "pcie", "inter_node"]


def rate_only_profile(profile):
    """profile without the fitted per-call attention cost (the small-block extrapolation's other bound)."""
    return dataclasses.replace(profile, name=profile.name + "_rate_only",
                               attention={k: cm.Curve(0.0, c.rate) for k, c in profile.attention.items()})


def model_grid(profile, topologies=ANSWER_TOPOLOGIES, worlds=ANSWER_W, lengths=ANSWER_L, *, algorithms=cm.MODELED,
               latency_scale=1.0, bandwidth_scale=1.0, window=None):
    """Yield (cell, cost_model.compare of `algorithms`) per (topology, heads 32/32 and 32/8, mask,
    pass, W, L); cell holds those keys as the grids' CSV columns. window: instead of the causal
    zigzag / non-causal masks, causal contiguous with this sliding window."""
    masks = ((True, "contiguous"),) if window else ((True, "zigzag"), (False, "contiguous"))
    for tname in topologies:
        topo = cm.get_topology(tname).scaled(bandwidth=bandwidth_scale, latency=latency_scale)
        for hq, hkv in ((32, 32), (32, 8)):
            for causal, layout in masks:
                mask = ("causal zigzag" if causal else "non-causal") if not window else \
                    f"causal contiguous, window {window}"
                for backward in (False, True):
                    for W in worlds:
                        for L in lengths:
                            c = cm.compare(seq_len=L, world_size=W, layout=layout, causal=causal, batch=1,
                                           heads_q=hq, heads_kv=hkv, head_dim=128, dtype=2, backward=backward,
                                           topology=topo, profile=profile, sliding_window=window,
                                           algorithms=algorithms)
                            yield (dict(topology=tname, heads_q=hq, heads_kv=hkv, mask=mask,
                                        **{"pass": "fwd_bwd" if backward else "fwd"}, world=W, seq_len=L), c)


def answer_grid(profile, topologies=ANSWER_TOPOLOGIES, worlds=ANSWER_W, lengths=ANSWER_L, *,
                rate_only=False, latency_scale=1.0, bandwidth_scale=1.0, window=None):
    """One row per (topology, heads, mask, pass, W, L): predicted ring and TokenRing ms.
    window: instead of the causal zigzag / non-causal masks, causal contiguous with this sliding
    window (the layout to use with windows, docs/sequence_parallel.md)."""
    if rate_only:  # sensitivity: no fixed per-call cost (the small-block extrapolation's other bound)
        profile = rate_only_profile(profile)
    rows = []
    for cell, c in model_grid(profile, topologies, worlds, lengths, algorithms=cm.ALGORITHMS,
                              latency_scale=latency_scale, bandwidth_scale=bandwidth_scale, window=window):
        r, t = c["ring"], c["token_ring"]
        rows.append(dict(cell, ring_ms=round(r.total_s * 1e3, 4), token_ring_ms=round(t.total_s * 1e3, 4),
                         ring_exposed_ms=round(r.exposed_comm_s * 1e3, 4),
                         token_ring_exposed_ms=round(t.exposed_comm_s * 1e3, 4),
                         speedup=round(r.total_s / t.total_s, 4)))
    return rows


def _fmt_L(L):
    return f"{L // 1048576}M" if L >= 1048576 else f"{L // 1024}k"


_GRID_KEY = ("topology", "heads_q", "heads_kv", "mask", "pass", "world", "seq_len")


def grid_markdown(rows, alt, cell) -> str:
    """One line per (topology, heads, mask, pass, W), one column per L: cell(row, alt_row or None)."""
    alt_map = {tuple(r[k] for k in _GRID_KEY): r for r in (alt or [])}
    idx = {tuple(r[k] for k in _GRID_KEY): r for r in rows}
    lengths = sorted({r["seq_len"] for r in rows})
    lines = ["| topology | Hq/Hkv | mask | pass | W | " + " | ".join(_fmt_L(L) for L in lengths) + " |",
             "|---|---|---|---|---|" + "---|" * len(lengths)]
    for key in dict.fromkeys(tuple(r[k] for k in _GRID_KEY[:6]) for r in rows):
        cells = [cell(idx[key + (L,)], alt_map.get(key + (L,))) for L in lengths]
        t, hq, hkv, mask, pss, W = key
        lines.append(f"| {t} | {hq}/{hkv} | {mask} | {pss} | {W} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def answer_markdown(rows, alt=None, alt_name=""):
    """Per (topology, heads, mask, pass, W): TokenRing speedup over ring at each L (>1: TokenRing
    faster). alt: a sensitivity grid shown as a second number where its winner differs."""
    def cell(r, a):
        s = r["speedup"]
        text = f"**{s:.2f}**" if s > 1.05 else f"{s:.2f}"
        if a is not None and (a["speedup"] > 1.05) != (s > 1.05):
            text += f" ({a['speedup']:.2f})"
        return text

    return grid_markdown(rows, alt, cell)


def answer_summary_markdown(rows):
    """Per (topology, heads, mask, pass) x W: where TokenRing is predicted > 5% faster (the L range
    and its best speedup), else ring with the range of TokenRing's speedup (< 1: slower)."""
    worlds = sorted({r["world"] for r in rows})
    lines = ["| topology | Hq/Hkv | mask | pass | " + " | ".join(f"W={w}" for w in worlds) + " |",
             "|---|---|---|---|" + "---|" * len(worlds)]
    keys = list(dict.fromkeys((r["topology"], r["heads_q"], r["heads_kv"], r["mask"], r["pass"]) for r in rows))
    for key in keys:
        cells = []
        for w in worlds:
            mine = sorted((r for r in rows if (r["topology"], r["heads_q"], r["heads_kv"], r["mask"], r["pass"]) == key
                           and r["world"] == w), key=lambda r: r["seq_len"])
            won = [r for r in mine if r["speedup"] > 1.05]
            lo, hi = min(r["speedup"] for r in mine), max(r["speedup"] for r in mine)
            if won:
                span = _fmt_L(won[0]["seq_len"]) + ("" if len(won) == 1 else "-" + _fmt_L(won[-1]["seq_len"]))
                gaps = len(won) != won[-1]["seq_len"].bit_length() - won[0]["seq_len"].bit_length() + 1
                cells.append(f"**TR {span}{' (not all)' if gaps else ''}: up to {hi:.2f}x**")
            elif lo < 1 / 1.05:
                cells.append(f"ring ({lo:.2f}-{hi:.2f})")
            else:
                cells.append(f"within 5% ({lo:.2f}-{hi:.2f})")
        t, hq, hkv, mask, pss = key
        lines.append(f"| {t} | {hq}/{hkv} | {mask} | {pss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


def _write_csv(path, rows, fields=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = fields or list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def cmd_calibrate(a):
    meta = dict(date=_now(), command="python " + " ".join(sys.argv))
    if a.calibrate_local:
        meta["cpu_idle_before"] = wait_idle(a.wait_idle, a.max_wait) if a.wait_idle else cpu_idle_fraction()
        concurrent = a.concurrent or max(1, (os.cpu_count() or 1) // a.threads)
        prof, btab, mtab = local_compute_profile(a.threads, a.reps, a.quick, concurrent)
        topo, raw, cores = local_topology(a.reps, a.quick, a.threads)
        meta.update(cores=cores, threads_per_rank=a.threads, concurrent_processes=concurrent, gloo=raw,
                    device=platform.processor() or "cpu")
        print(topo.source)
    else:
        prof, btab, mtab = profile_from_csvs(a.block_csv, a.ops_csv)
        topo = None
        meta.update(extrapolation=(
            "measured block shapes: square S=Sq=Sk in {4096, 16384}, B=1, Hq=32, Hkv in {32, 8}, D=128, bf16. "
            "Other shapes are EXTRAPOLATED by FLOP count along t = overhead + FLOPs/rate: rectangular zigzag "
            "blocks (n x n/2) assume the rate of a square block of the same FLOPs; blocks smaller than 4096^2 "
            "(W >= 16 at short L) are dominated by the fitted overhead, which mixes launch/host cost with the "
            "kernel's ramp-up and is the least certain part (answer --rate-only gives the other bound)."))
    _print_fit(btab, mtab)
    worst = max(abs(r["rel_err"]) for r in btab)
    print(f"max |relative error| of the block-attention fit: {100 * worst:.1f}%")
    doc = dict(compute=prof.to_json(), topology=topo.to_json() if topo else None, meta=meta, fit=btab, memory_fit=mtab)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {a.out}")


def cmd_measure(a):
    if a.wait_idle:
        wait_idle(a.wait_idle, a.max_wait)
    rows = measure(a.out, rounds=a.rounds, masks=a.masks or MEASURE_MASKS, worlds=a.worlds or MEASURE_WORLDS,
                   seqs=a.seqs or MEASURE_SEQS, heads=a.heads or MEASURE_HEADS, head_dim=a.head_dim,
                   passes=a.passes or MEASURE_PASSES, reps=a.reps, timeout=a.timeout, threads=a.threads,
                   algorithms=tuple(a.algorithms))
    for r in rows:
        print(f"{r['algorithm']:>10} W={r['world']} L={r['seq_len']} {r['heads_q']}/{r['heads_kv']} "
              f"{r['layout']:>10} causal={r['causal']!s:5} {r['pass']:>7} ms_min {float(r['ms_min'] or 'nan'):9.2f}"
              + (f" ERROR {r['error']}" if r.get("error") else ""))
    print(f"wrote {a.out}")


def _mask_label(r) -> str:
    label = (("zigzag c" if r["layout"] == "zigzag" else "contig c") if _bool(r["causal"]) else r["layout"][:10])
    return label + (f" w{r['window']}" if r.get("window") else "")


def cmd_validate(a):
    prof, ptopo, meta = load_profile(a.profile)
    cores = a.cores or meta.get("cores") or os.cpu_count()
    rows = list(csv.DictReader(open(a.sweep)))
    v = validate(rows, prof, ptopo, a.topology, cores, a.threads, stat=a.stat)
    if not v:
        raise SystemExit(f"no usable rows (an algorithm the model simulates, no error) in {a.sweep}")
    print(f"predicted vs measured ({a.sweep}; profile {a.profile}; topology "
          f"{a.topology or (ptopo.source if ptopo else '?')})")
    print(f"{'alg':>10} {'W':>2} {'L':>6} {'Hq/Hkv':>6} {'mask':>14} {'pass':>7} {'meas ms':>9} {'pred ms':>9} "
          f"{'err':>7} {'ranks/dev':>9}")
    for r in v:
        print(f"{r['algorithm']:>10} {r['world']:>2} {r['seq_len']:>6} {r['heads_q']}/{r['heads_kv']:<4} "
              f"{_mask_label(r):>14} {r['pass']:>7} {r['measured_ms']:9.2f} "
              f"{r['predicted_ms']:9.2f} {100 * r['rel_err']:6.1f}% {r['ranks_per_device']:9.1f}")
    errs = [abs(r["rel_err"]) for r in v]
    print(f"rows {len(v)}: median |err| {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.1f}%")
    agree = winner_agreement(v)
    if agree:
        ok = sum(x["measured"] == x["predicted"] for x in agree)
        print(f"fastest algorithm predicted correctly in {ok}/{len(agree)} configs measured with two or more")
    if a.out:
        _write_csv(a.out, v)
        print(f"wrote {a.out}")
    if a.out_md:
        _emit_markdown(validation_markdown(v), a.out_md)


def cmd_predict(a):
    prof = load_profile(a.profile)[0] if a.profile else None
    p = cm.predict(a.algorithm, seq_len=a.seq_len, world_size=a.world, layout=a.layout, causal=a.causal,
                   batch=a.batch, heads_q=a.heads_q, heads_kv=a.heads_kv, head_dim=a.head_dim,
                   dtype=DTYPE_BYTES[a.dtype], backward=not a.fwd_only, topology=a.topology, profile=prof)
    print(f"{p.algorithm} W={p.world_size} L={p.seq_len} {p.passes} on {p.topology} ({p.profile}): "
          f"total {p.total_s * 1e3:.3f} ms, compute {p.compute_s * 1e3:.3f} ms, exposed comm "
          f"{p.exposed_comm_s * 1e3:.3f} ms (critical rank {p.critical_rank})")
    print(f"{'pass':>4} {'step':>4} {'compute ms':>10} {'wait ms':>9} {'end ms':>9}  blocks")
    for s in p.steps:
        print(f"{s.pass_:>4} {s.step:>4} {s.compute_s * 1e3:10.3f} {s.wait_s * 1e3:9.3f} {s.end_s * 1e3:9.3f}  "
              + ", ".join(f"{op} {sq}x{sk}{' c' if c else ''}" for op, sq, sk, c in s.blocks))
    sent = {ch: v[0] for ch, v in p.bytes[p.critical_rank].items()}
    print("bytes sent by the critical rank:", sent)


def _emit_markdown(md: str, path) -> None:
    """Write md to path (a --out-md argument), or print it when there is none."""
    if path:
        with open(path, "w") as f:
            f.write(md + "\n")
        print(f"wrote {path}")
    else:
        print(md)


def cmd_answer(a):
    prof = load_profile(a.profile)[0] if a.profile else cm.H100_BF16
    if a.from_csv:  # re-render a grid computed before
        rows = [dict(r, heads_q=int(r["heads_q"]), heads_kv=int(r["heads_kv"]), world=int(r["world"]),
                     seq_len=int(r["seq_len"]), speedup=float(r["speedup"])) for r in csv.DictReader(open(a.from_csv))]
        alt = [dict(r, speedup=float(r["speedup_rate_only"])) for r in rows] if "speedup_rate_only" in rows[0] else None
    else:
        rows = answer_grid(prof, latency_scale=a.latency_scale, bandwidth_scale=a.bandwidth_scale, window=a.window)
        alt = answer_grid(prof, rate_only=True, latency_scale=a.latency_scale, bandwidth_scale=a.bandwidth_scale,
                          window=a.window) if a.rate_only_alt else None
    if alt and not a.from_csv:
        for r, x in zip(rows, alt):
            r["speedup_rate_only"] = x["speedup"]
    if a.out_csv and not a.from_csv:
        _write_csv(a.out_csv, rows)
        print(f"wrote {a.out_csv}")
    _emit_markdown(answer_summary_markdown(rows) + "\n\n" + answer_markdown(rows, alt), a.out_md)
    won = [r for r in rows if r["speedup"] > 1.05]
    lost = [r for r in rows if r["speedup"] < 1 / 1.05]
    print(f"cells: {len(rows)}; TokenRing faster by > 5%: {len(won)}; ring faster by > 5%: {len(lost)}")
    if alt:
        print(f"rate-only compute (no fitted overhead): {verdict_changes(rows, alt)} cells change verdict")
    for name, kw in (("latency x 0", dict(latency_scale=0.0)), ("latency x 4", dict(latency_scale=4.0)),
                     ("bandwidth x 0.5", dict(bandwidth_scale=0.5))) if a.sensitivity else ():
        other = answer_grid(prof, window=a.window, **kw)
        print(f"{name}: {verdict_changes(rows, other)} of {len(rows)} cells change verdict")


# --------------------------------------------------------------------------------------------
# auto: what algorithm="auto" picks over the answer grid, Ulysses included


AUTO_LETTER = {"ring": "R", "token_ring": "T", "ulysses": "U"}


def auto_grid(profile, topologies=ANSWER_TOPOLOGIES, worlds=ANSWER_W, lengths=ANSWER_L, *, rate_only=False):
    """One row per (topology, heads, mask, pass, W, L): the three predicted ms and the algorithm
    sequence_parallel.auto_rule picks from them (bottleneck bytes from the same predictions)."""
    from ringattn.sequence_parallel import auto_rule, bottleneck_bytes

    rows = []
    for cell, c in model_grid(rate_only_profile(profile) if rate_only else profile, topologies, worlds, lengths):
        secs = {a: p.total_s for a, p in c.items()}
        pick, _ = auto_rule(secs, {a: bottleneck_bytes(p.bytes) for a, p in c.items()})
        rows.append(dict(cell, **{f"{a}_ms": round(t * 1e3, 4) for a, t in secs.items()},
                         ulysses_exposed_ms=round(c["ulysses"].exposed_comm_s * 1e3, 4) if "ulysses" in c else "",
                         auto=pick))
    return rows


def auto_markdown(rows, alt=None):
    """Per (topology, heads, mask, pass, W): auto's pick at each L (R ring, T token_ring, U ulysses)
    and Ulysses' predicted speedup over the faster ring; alt (the rate-only grid) in parentheses
    where its pick differs."""
    def cell(r, a):
        text = AUTO_LETTER[r["auto"]]
        if r["auto"] == "ulysses":
            text += f" {min(r['ring_ms'], r['token_ring_ms']) / r['ulysses_ms']:.2f}"
        if a is not None and a["auto"] != r["auto"]:
            text += f" ({AUTO_LETTER[a['auto']]})"
        return text

    return grid_markdown(rows, alt, cell)


def cmd_auto(a):
    prof = load_profile(a.profile)[0] if a.profile else cm.H100_BF16
    rows = auto_grid(prof)
    alt = auto_grid(prof, rate_only=True)
    for r, x in zip(rows, alt):
        r["auto_rate_only"] = x["auto"]
    if a.out_csv:
        _write_csv(a.out_csv, rows)
        print(f"wrote {a.out_csv}")
    _emit_markdown(auto_markdown(rows, alt), a.out_md)
    for name, grid in (("fitted profile", rows), ("rate-only", alt)):
        n = {alg: sum(r["auto"] == alg for r in grid) for alg in AUTO_LETTER}
        print(f"{name}: cells {len(grid)}; auto picks " + ", ".join(f"{k} {v}" for k, v in n.items()))
    print(f"cells whose pick changes without the fitted per-call overhead: "
          f"{sum(r['auto'] != x['auto'] for r, x in zip(rows, alt))}")


def _verdict(speedup: float) -> str:
    return "token_ring" if speedup > 1.05 else "ring" if speedup < 1 / 1.05 else "within 5%"


def verdict_changes(rows, other) -> int:
    """Cells whose verdict (TokenRing / ring faster by > 5%, or within 5%) differs between two grids."""
    return sum(_verdict(a["speedup"]) != _verdict(b["speedup"]) for a, b in zip(rows, other))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--block-csv", default=os.path.join(ROOT, "perf/results/2026-11-22_h100_bench_block_attention.csv"))
    c.add_argument("--ops-csv", default=os.path.join(ROOT, "perf/results/2026-11-22_h100_bench_ops.csv"))
    c.add_argument("--calibrate-local", action="store_true", help="measure compute and gloo links on this machine")
    c.add_argument("--threads", type=int, default=1, help="torch threads per rank (local)")
    c.add_argument("--concurrent", type=int, default=0,
                   help="processes timing each block shape at once (default: cores / threads, as in a run)")
    c.add_argument("--reps", type=int, default=5)
    c.add_argument("--quick", action="store_true")
    c.add_argument("--out", required=True)
    for x in (c,):
        x.add_argument("--wait-idle", type=float, default=0.0, help="wait until the CPU is this idle (0..1)")
        x.add_argument("--max-wait", type=float, default=600)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--reps", type=int, default=3, help="timed calls per config and round")
    m.add_argument("--rounds", type=int, default=3, help="passes over the whole config list")
    m.add_argument("--timeout", type=float, default=300, help="seconds per configuration (perf/sweep.py --timeout)")
    m.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    m.add_argument("--worlds", type=int, nargs="+")
    m.add_argument("--seqs", type=int, nargs="+")
    m.add_argument("--heads", nargs="+", help="Hq/Hkv pairs, e.g. 8/8 8/2")
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--masks", nargs="+", help="zigzag = causal zigzag, contiguous = non-causal contiguous, "
                   "causal = causal contiguous, windowN = causal contiguous, sliding window N (e.g. window512)")
    m.add_argument("--passes", nargs="+", choices=("fwd", "fwd_bwd"))
    m.add_argument("--algorithms", nargs="+", choices=cm.MODELED, default=["ring", "token_ring"])
    m.add_argument("--wait-idle", type=float, default=0.0, help="wait until the CPU is this idle (0..1)")
    m.add_argument("--max-wait", type=float, default=600)
    v = sub.add_parser("validate")
    v.add_argument("--sweep", required=True)
    v.add_argument("--profile", required=True)
    v.add_argument("--topology", default=None, help="a cost_model preset or shared_gpu (default: the profile's)")
    v.add_argument("--cores", type=int, default=None)
    v.add_argument("--threads", type=int, default=1, help="torch threads per rank in the sweep")
    v.add_argument("--stat", choices=("min", "median"), default="min",
                   help="measured column compared: ms_min (default: interference on a shared machine only adds "
                        "time) or ms_median")
    v.add_argument("--out", default=None)
    v.add_argument("--out-md", default=None, help="a markdown table, one line per config")
    q = sub.add_parser("predict")
    q.add_argument("--algorithm", choices=cm.MODELED, required=True)
    q.add_argument("--seq-len", type=int, required=True)
    q.add_argument("--world", type=int, required=True)
    q.add_argument("--layout", default="zigzag")
    q.add_argument("--causal", action="store_true")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--heads-q", type=int, default=32)
    q.add_argument("--heads-kv", type=int, default=8)
    q.add_argument("--head-dim", type=int, default=128)
    q.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    q.add_argument("--fwd-only", action="store_true")
    q.add_argument("--topology", default="nvswitch", choices=sorted(cm.PRESETS))
    q.add_argument("--profile", default=None)
    u = sub.add_parser("auto", help="what algorithm='auto' picks over the answer grid (Ulysses included), with "
                       "the rate-only profile's pick where it differs")
    u.add_argument("--profile", default=None, help="default: cost_model.H100_BF16")
    u.add_argument("--out-csv", default=None)
    u.add_argument("--out-md", default=None)
    w = sub.add_parser("answer")
    w.add_argument("--profile", default=None, help="default: cost_model.H100_BF16")
    w.add_argument("--latency-scale", type=float, default=1.0)
    w.add_argument("--window", type=int, default=None,
                   help="sliding window: causal contiguous with this window instead of the two unmasked masks")
    w.add_argument("--bandwidth-scale", type=float, default=1.0)
    w.add_argument("--rate-only-alt", action="store_true",
                   help="also run with zero compute overhead; show its value where the winner differs")
    w.add_argument("--from-csv", default=None, help="re-render the tables of an --out-csv written before")
    w.add_argument("--sensitivity", action="store_true",
                   help="also count the cells whose verdict changes with latency x0 / x4 and bandwidth x0.5")
    w.add_argument("--out-csv", default=None)
    w.add_argument("--out-md", default=None)
    a = p.parse_args(argv)
    {"calibrate": cmd_calibrate, "measure": cmd_measure, "validate": cmd_validate, "predict": cmd_predict,
     "answer": cmd_answer, "auto": cmd_auto}[a.cmd](a)


if __name__ == "__main__":
    main()
