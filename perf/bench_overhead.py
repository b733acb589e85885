"""What the per-call signature exchange costs: the host round trip every sequence-parallel call
starts with (sequence_parallel._exchange: one all_gather of a small int64 signature on the control
group, so that ranks which disagree raise the same error instead of hanging).

    python perf/bench_overhead.py --out DIR                       # W = 2, 4; L = 256 (gpu_check runs this)
    python perf/bench_overhead.py --out DIR --seqs 256,1024
    python perf/bench_overhead.py --out DIR --worlds 2 --seqs 64 --reps 5 --rounds 1   # smoke

W gloo processes on this host (1 torch thread each; CPU tensors: the exchange never touches a
GPU -- on GPUs it runs on the host too, on a gloo twin of the NCCL group), B=1, Hq=Hkv=8, D=64,
fp32, causal zigzag, forward calls of ring_attention / token_ring_attention. Per configuration,
in the same processes and alternating `--rounds` times (the median round is reported):
  ms_call              one call as shipped;
  ms_call_cached       the same call with the exchange answered from a table cached at the first
                       call (the BASELINE: what a call would cost without the check; not a mode
                       ringattn offers -- it would lose the bad-input guarantee);
  ms_exchange          the exchange alone, back to back.
overhead = ms_call - ms_call_cached (and in % of ms_call_cached). Each timing is the mean over
`--reps` calls between two barriers, the max over ranks. Writes DIR/bench_overhead.csv and .json
(date, host, torch version, command) and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import int_list, write_and_print  # noqa: E402
from model import _spawn  # noqa: E402


def _timed(fn, reps: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    dist.barrier()
    mine = torch.tensor([(time.perf_counter() - t0) / reps * 1e3], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return mine.item()


def _worker(rank, world, init_file, args, out_q):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args["timeout"]))
        import ringattn.sequence_parallel as sp
        from ringattn.layout import shard_sequence

        real_exchange, rows = sp._exchange, []
        for L in args["seqs"]:
            gen = torch.Generator().manual_seed(L)
            q, k, v = (shard_sequence(torch.randn(1, L, 8, 64, generator=gen), 1, layout="zigzag") for _ in range(3))
            for alg in args["algorithms"]:
                fn = getattr(sp, f"{alg}_attention")
                call = lambda: fn(q, k, v, causal=True, layout="zigzag")  # noqa: E731
                table = {}

                def cached(name, group, w, ranks, local, device):
                    key = tuple(local.sig)
                    if key not in table:
                        table[key] = real_exchange(name, group, w, ranks, local, device)
                    return table[key]

                local = sp._local_signature("bench", q, k, v, algorithm=alg, layout="zigzag", causal=True,
                                            softmax_scale=None, backend="auto", world=world,
                                            global_ranks=list(range(world)))
                exchange = lambda: real_exchange("bench", None, world, list(range(world)), local,  # noqa: E731
                                                 torch.device("cpu"))
                for _ in range(args["warmup"]):
                    call()
                times = {"ms_call": [], "ms_call_cached": [], "ms_exchange": []}
                for _ in range(args["rounds"]):
                    sp._exchange = real_exchange
                    times["ms_call"].append(_timed(call, args["reps"]))
                    sp._exchange = cached
                    try:
                        call()  # (fills the table)
                        times["ms_call_cached"].append(_timed(call, args["reps"]))
                    finally:
                        sp._exchange = real_exchange
                    times["ms_exchange"].append(_timed(exchange, args["reps"]))
                med = {name: statistics.median(ts) for name, ts in times.items()}
                over = med["ms_call"] - med["ms_call_cached"]
                rows.append(dict(table="overhead", world=world, seq_len=L, algorithm=alg,
                                 ms_call=round(med["ms_call"], 4), ms_call_cached=round(med["ms_call_cached"], 4),
                                 ms_exchange=round(med["ms_exchange"], 4), overhead_ms=round(over, 4),
                                 overhead_pct=round(100 * over / med["ms_call_cached"], 1)))
        if rank == 0:
            out_q.put(("ok", rows))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out_q.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))


def run_world(world: int, args: dict) -> list[dict]:
    return _spawn(_worker, world, (args,), timeout=args["timeout"])  # (perf/model.py's rank spawner)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--worlds", type=int_list, default=[2, 4])
    p.add_argument("--seqs", type=int_list, default=[256])
    p.add_argument("--algorithms", default="ring,token_ring")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=int, default=300)
    a = p.parse_args(argv)
    algs = a.algorithms.split(",")
    if bad := [x for x in algs if x not in ("ring", "token_ring", "ulysses")]:
        p.error(f"unknown algorithms {bad}")
    args = dict(seqs=a.seqs, algorithms=algs, warmup=a.warmup, reps=a.reps, rounds=a.rounds, timeout=a.timeout)
    rows = [r for w in a.worlds for r in run_world(w, args)]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=f"host {platform.processor() or platform.machine()} ({os.cpu_count()} cores), gloo, CPU tensors",
                torch=torch.__version__, dtype="float32", command="python " + " ".join(sys.argv),
                shape="B=1 Hq=Hkv=8 D=64 causal zigzag fwd; baseline ms_call_cached (same processes)")
    write_and_print(a.out, "bench_overhead", meta, rows, ("overhead",))


if __name__ == "__main__":
    main()
