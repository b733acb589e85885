"""Ring-shift latency and bandwidth of CudaIpcTransport: 2 and 4 processes on ONE GPU.

    python perf/bench_ipc.py --out perf/out/ipc                  # GPU machine; start MPS first (gpu_check.sh does)
    python perf/bench_ipc.py --out /tmp/ipc --worlds 2 --quick   # a smoke run: fewer sizes and steps

Each rank sends to rank+1 and receives from rank-1 (the K/V rotation of ring attention), through
`CudaIpcTransport.batch_isend_irecv` + `wait()`. Step i sends what step i-1 received, so a step
is one full hop (latency), not a pipelined stream. Per message size:
- us/step: CUDA events on the caller's stream around N steps after warm-up, max over ranks;
  host us/step: wall time of the same loop (when it exceeds us/step, posting is host-bound);
- GB/s: bytes / step time (one direction, per rank);
- baseline: the same bytes copied device-to-device in one process (`dst.copy_(src)`), timed in
  rank 0 while the other ranks wait at a barrier. The transport copies twice (into the peer's
  inbox, then out to the recv tensor), so about half the baseline GB/s is its ceiling.
After each size every rank checks it holds the bytes that started (hops) ranks upstream.
Writes OUT/bench_ipc.csv and OUT/bench_ipc.json after each world (a run cut short keeps the
worlds it finished); prints a table last. A hung world is killed after --timeout seconds and
reported as an error row, never a hang.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import queue
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LATENCY_SIZES = [4, 64, 1024, 16 << 10, 64 << 10]
BANDWIDTH_SIZES = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def _steps_for(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) steps: many for small messages, ~2 GB moved for large ones."""
    timed = max(10, min(500, (2 << 30) // max(nbytes, 1)))
    if quick:
        timed = max(5, timed // 10)
    return max(3, timed // 10), timed


def _time_copy(nbytes: int, quick: bool, dev) -> float:
    """Microseconds per same-process D2D copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    warm, timed = _steps_for(nbytes, quick)
    for _ in range(warm):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / timed


def _rank_main(rank: int, world: int, init_file: str, args: dict, results) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=args["timeout"]),
        )
        from ringattn.transport import CudaIpcTransport

        t = CudaIpcTransport(device=dev, slots=args["slots"], sync=args["sync"], check=args["check"], timeout_s=120)
        sizes = args["sizes"]
        t.reserve(max(sizes))
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        bufs = [torch.empty(max(sizes), dtype=torch.uint8, device=dev) for _ in range(2)]
        rows = []
        for nbytes in sizes:
            baseline_us = _time_copy(nbytes, args["quick"], dev) if rank == 0 else float("nan")
            dist.barrier()
            a, b = bufs[0][:nbytes], bufs[1][:nbytes]
            a.fill_(rank + 1)
            ops = [  # step parity p: send views[p], receive into views[1-p]
                [dist.P2POp(dist.isend, a, nxt), dist.P2POp(dist.irecv, b, prv)],
                [dist.P2POp(dist.isend, b, nxt), dist.P2POp(dist.irecv, a, prv)],
            ]
            warm, timed = _steps_for(nbytes, args["quick"])
            for i in range(warm):
                for w in t.batch_isend_irecv(ops[i % 2]):
                    w.wait()
            t.synchronize(timeout_s=120)
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for i in range(warm, warm + timed):
                for w in t.batch_isend_irecv(ops[i % 2]):
                    w.wait()
            end.record()
            host_s = time.perf_counter() - t0
            t.synchronize(timeout_s=120)
            us = start.elapsed_time(end) * 1e3 / timed
            hops = warm + timed
            last = (a, b)[hops % 2]  # step hops-1 received into views[1 - (hops-1) % 2]
            want = (rank - hops) % world + 1
            lo, hi = int(last.min()), int(last.max())
            ok = lo == hi == want
            rows.append({
                "nbytes": nbytes, "steps": timed, "us_per_step": us, "host_us_per_step": host_s * 1e6 / timed,
                "baseline_us": baseline_us, "ok": ok,
                "check_detail": "" if ok else f"rank {rank}: bytes in [{lo}, {hi}], expected all {want}",
            })
        stats = t.stats()
        t.close()
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            results.put(("ok", {"ranks": gathered, "sync": stats["sync"], "slots": stats["slots"]}))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def run_world(world: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="ringattn_bench_ipc_")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdzv"), args, results)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args["timeout"]
    outcome = None
    while outcome is None and time.monotonic() < deadline:
        try:
            outcome = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                outcome = ("error", "all ranks exited without a result")
    for p in procs:
        p.join(timeout=10 if outcome and outcome[0] == "ok" else 1)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if outcome is None:
        outcome = ("error", f"no result within {args['timeout']} s (a hang); the ranks were killed")
    return {"status": outcome[0], "data": outcome[1]}


def _write(out: str, rows, errors, meta, device_name: str, mps: bool) -> None:
    fields = ["world", "nbytes", "us_per_step", "host_us_per_step", "GBps", "baseline_us", "baseline_GBps", "vs_baseline", "ok", "sync", "error"]
    with open(os.path.join(out, "bench_ipc.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})
    with open(os.path.join(out, "bench_ipc.json"), "w") as f:
        json.dump({
            "command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name, "torch": torch.__version__, "mps": mps, "worlds": meta, "rows": rows, "errors": errors,
        }, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for bench_ipc.csv / bench_ipc.json")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--sync", default=None, choices=["auto", "memops", "triton"],
                    help="flag mechanism (default: RINGATTN_IPC_SYNC or auto)")
    ap.add_argument("--check", default=None, choices=["device", "host", "none"],
                    help="header check (default: RINGATTN_IPC_CHECK or device)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per world before it is killed")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ipc.py needs a CUDA GPU")
    sizes = LATENCY_SIZES + BANDWIDTH_SIZES
    if a.quick:
        sizes = [4, 16 << 10, 1 << 20, 16 << 20]
    args = {"slots": a.slots, "sync": a.sync, "check": a.check, "quick": a.quick, "timeout": a.timeout, "sizes": sizes}
    os.makedirs(a.out, exist_ok=True)
    device_name = torch.cuda.get_device_name(0)
    mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")) and os.path.exists(
        os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", ""), "control")
    )
    # Several transports' streams must not share hardware queues (see ringattn.transport.cuda_ipc);
    # the spawned ranks inherit this before they start CUDA.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    rows, errors, meta = [], [], {}
    for world in a.worlds:
        res = run_world(world, args)
        if res["status"] != "ok":
            errors.append(f"world {world}: {res['data']}")
            rows.append({"world": world, "nbytes": -1, "error": res["data"].strip().splitlines()[-1][:200]})
            _write(a.out, rows, errors, meta, device_name, mps)
            continue
        meta[world] = {"sync": res["data"]["sync"], "slots": res["data"]["slots"]}
        per_rank = res["data"]["ranks"]
        for i, nbytes in enumerate(sizes):
            r = [pr[i] for pr in per_rank]
            us = max(x["us_per_step"] for x in r)
            base = r[0]["baseline_us"]
            rows.append({
                "world": world, "nbytes": nbytes, "us_per_step": round(us, 2),
                "host_us_per_step": round(max(x["host_us_per_step"] for x in r), 2),
                "GBps": round(nbytes / us / 1e3, 2), "baseline_us": round(base, 2),
                "baseline_GBps": round(nbytes / base / 1e3, 2), "vs_baseline": round(base / us, 3),
                "ok": all(x["ok"] for x in r), "error": "; ".join(x["check_detail"] for x in r if not x["ok"]),
                "sync": res["data"]["sync"],
            })
        _write(a.out, rows, errors, meta, device_name, mps)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    print(f"\nCudaIpcTransport ring shift on one {device_name} (MPS {'on' if mps else 'off'}); baseline = same-process D2D copy")
    print(f"{'world':>5} {'bytes':>10} {'us/step':>9} {'host us':>8} {'GB/s':>8} {'copy us':>8} {'copy GB/s':>9} {'ok':>3}")
    for r in rows:
        if r["nbytes"] < 0:
            print(f"{r['world']:>5} {'ERROR':>10} {r['error']}")
            continue
        print(f"{r['world']:>5} {r['nbytes']:>10} {r['us_per_step']:>9.1f} {r['host_us_per_step']:>8.1f} {r['GBps']:>8.2f} "
              f"{r['baseline_us']:>8.1f} {r['baseline_GBps']:>9.2f} {'y' if r['ok'] else 'N':>3}")
    if errors or not all(r.get("ok") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
