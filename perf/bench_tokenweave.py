"""TokenWeave benchmarks: fused AllReduce+residual+RMSNorm vs the unfused sequence, and token-split
overlap on a tensor-parallel decoder layer. Ranks share one GPU (run under MPS).

    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY; nvidia-cuda-mps-control -d
    python perf/bench_tokenweave.py --out perf/out/tokenweave            # everything, 2 ranks
    python perf/bench_tokenweave.py --out OUT --world 4 --max-ctas 4,8,16,32 --skip-layer
    python perf/bench_tokenweave.py --cpu-smoke --out /tmp/twsmoke    # flow check without a GPU
    echo quit | nvidia-cuda-mps-control

Part 1 (fused op), bf16, tokens 1..8192 x hidden 4096/8192, W ranks on cuda:0 (gloo control
group, symmetric memory with TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1):
    fused        ringattn fused op, residual in/out full (same semantics as the unfused sequence);
                 input already in the symmetric buffer (the row-parallel GEMM writes it there)
    fused_shard  the same with the residual token-sharded in and out (TokenWeave's layer mode)
    fused_1shot / fused_2shot  the fused op forced one-shot / two-shot (picks one_shot_max_tokens)
    unfused      torch symm_mem one_shot_all_reduce or two_shot_all_reduce_ (the faster of the two,
                 both reported), then add_rmsnorm (ringattn's CUDA op if built, else eager torch)
Timing: each rank captures `--calls` back-to-back calls in a CUDA graph (GPU time, no Python),
replays `--iters` times after warm-up, CUDA events; the slowest rank's mean per call is
reported. Eager per-call times (with Python) are reported too. ctas = CTAs (<= SMs) of the kernel.
Part 2 (token split): a Llama-8B-shaped decoder layer (hidden 4096, 32 heads, 8 KV heads,
intermediate 14336) sharded over W ranks, TokenWeaveDecoderStack of 2 layers + final norm, bf16,
with and without token splitting, eager and (where capture works) CUDA graph.

Outputs (rank 0): OUT/bench_tokenweave_fused.csv, OUT/bench_tokenweave_split.csv,
OUT/bench_tokenweave.json; the short table is printed last.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


SMOKE = False  # --cpu-smoke: the whole flow on CPU (gloo, host-sim kernel, wall clock), tiny sizes


def _timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    if SMOKE:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters  # us per fn()


def _slowest(us: float) -> float:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, us)
    return max(everyone)


def _graph_us(make_call, calls, iters, warmup):
    """GPU time per call: `calls` calls captured in one graph, replayed."""
    if SMOKE:
        return _slowest(_timed(make_call, iters, warmup))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            make_call()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            make_call()
    torch.cuda.synchronize()
    dist.barrier()
    return _slowest(_timed(g.replay, iters, warmup) / calls)


def _add_rmsnorm_impl():
    from ringattn.tokenweave.fused_allreduce_rmsnorm import _add_rmsnorm, _ringattn_op

    name = "ringattn CUDA add_rmsnorm" if _ringattn_op("add_rmsnorm", "cuda") is not None else "eager torch add+rmsnorm"
    return _add_rmsnorm, name


def bench_fused(args, rank, world):
    import torch.distributed._symmetric_memory as symm

    from ringattn.tokenweave import AllReduceRMSNorm, TokenWeaveConfig, shard_bounds
    from ringattn.tokenweave.fused_allreduce_rmsnorm import _enable_symm_for_group

    dev = torch.device("cpu") if SMOKE else torch.device("cuda", 0)
    dtype = torch.bfloat16
    group = dist.group.WORLD
    _enable_symm_for_group(group)  # torch < 2.10 needs it before symm_mem ops on the group
    add_rmsnorm, add_name = _add_rmsnorm_impl()
    rows = []
    max_t = max(args.tokens)
    for H in args.hidden:
        # unfused baseline: symmetric input buffer for torch's symm_mem all-reduce
        if SMOKE:
            base_buf = torch.zeros(max_t * H, dtype=dtype)
        else:
            base_buf = symm.empty(max_t * H, dtype=dtype, device=dev)
            symm.rendezvous(base_buf, group)
        for ctas in args.max_ctas:
            sim = dict(path="symm", symm_backend="host-sim") if SMOKE else {}
            cfgs = {
                "auto": TokenWeaveConfig(max_ctas=ctas, timeout_s=60, **sim),
                "1shot": TokenWeaveConfig(max_ctas=ctas, one_shot_max_tokens=1 << 30, timeout_s=60, **sim),
                "2shot": TokenWeaveConfig(max_ctas=ctas, one_shot_max_tokens=0, timeout_s=60, **sim),
            }
            handles = {k: AllReduceRMSNorm(group, dev, c) for k, c in cfgs.items()}
            for k, h in handles.items():
                h.reserve(max_t, H, dtype)
            w = torch.ones(H, dtype=dtype, device=dev)
            for T in args.tokens:
                r = dict(world=world, hidden=H, tokens=T, max_ctas=ctas, add_rmsnorm=add_name)
                h = handles["auto"]
                r["path"] = h.path_for(T, H, dtype)
                r["ctas"] = h.ctas(T, H, dtype)
                r["path_shard"] = h.path_for(T, H, dtype, True)
                r["ctas_shard"] = h.ctas(T, H, dtype, True)
                res = torch.zeros(T, H, dtype=dtype, device=dev)
                b, e = shard_bounds(T, world, rank)
                res_shard = torch.zeros(e - b, H, dtype=dtype, device=dev)
                for key, hh, shard in (("fused", h, False), ("fused_shard", h, True),
                                       ("fused_1shot", handles["1shot"], False), ("fused_2shot", handles["2shot"], False)):
                    buf = hh.input_buffer(T, H, dtype, 0)
                    buf.zero_()
                    rr = res_shard if shard else res

                    def call(hh=hh, buf=buf, rr=rr, shard=shard):
                        hh(buf, rr, w, 1e-6, shard_residual_in=shard, copy_out=False)

                    r[f"{key}_us"] = _graph_us(call, args.calls, args.iters, args.warmup)
                    if key == "fused":
                        r["fused_eager_us"] = _slowest(_timed(call, args.iters, args.warmup))
                x = base_buf[: T * H].view(T, H)
                x.zero_()

                def one_shot():
                    if SMOKE:
                        out = x.clone()
                        dist.all_reduce(out)
                    else:
                        out = torch.ops.symm_mem.one_shot_all_reduce(x, "sum", group.group_name)
                    add_rmsnorm(out, res, w, 1e-6)

                def two_shot():
                    if SMOKE:
                        dist.all_reduce(x)
                    else:
                        torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", group.group_name)
                    add_rmsnorm(x, res, w, 1e-6)

                for key, fn in (("unfused_1shot", one_shot), ("unfused_2shot", two_shot)):
                    try:
                        r[f"{key}_us"] = _graph_us(fn, args.calls, args.iters, args.warmup)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        r[f"{key}_us"] = float("nan")
                        r[f"{key}_error"] = f"{type(e).__name__}: {e}"[:200]
                r["unfused_eager_us"] = _slowest(_timed(one_shot if T <= 64 else two_shot, args.iters, args.warmup))
                cands = [v for v in (r["unfused_1shot_us"], r["unfused_2shot_us"]) if v == v]
                r["unfused_us"] = min(cands) if cands else float("nan")
                r["speedup"] = r["unfused_us"] / r["fused_us"] if r["fused_us"] > 0 else float("nan")
                r["speedup_shard"] = r["unfused_us"] / r["fused_shard_us"] if r["fused_shard_us"] > 0 else float("nan")
                rows.append(r)
                if rank == 0:
                    print(f"[fused] H={H} T={T} ctas<={ctas}: {r['path']} {r['fused_us']:.1f} us (shard "
                          f"{r['fused_shard_us']:.1f}) vs unfused {r['unfused_us']:.1f} us -> {r['speedup']:.2f}x", flush=True)
    return rows


def bench_split(args, rank, world):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from ringattn.tokenweave import TokenWeaveConfig, TokenWeaveDecoderStack

    dev = torch.device("cpu") if SMOKE else torch.device("cuda", 0)
    dtype = torch.bfloat16
    hidden, inter = (256, 512) if SMOKE else (4096, 14336)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=16384)
    torch.manual_seed(0)
    with torch.device(dev):
        layers = [LlamaDecoderLayer(cfg, layer_idx=i).to(dtype).eval() for i in range(2)]
        norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
        rope = LlamaRotaryEmbedding(cfg)
        with torch.no_grad():  # construction may leave weights uninitialised
            for l in layers:
                for prm in l.parameters():
                    prm.normal_(0, 0.02) if prm.dim() == 2 else prm.fill_(1.0)
    tw_cfg = TokenWeaveConfig(timeout_s=60, **(dict(path="symm", symm_backend="host-sim") if SMOKE else {}))
    stacks = {
        split: TokenWeaveDecoderStack(layers, norm, dist.group.WORLD, token_split=split, split_min_tokens=0, config=tw_cfg, device=dev)
        for split in (False, True)
    }
    del layers
    if not SMOKE:
        torch.cuda.empty_cache()
    rows = []
    for T in args.layer_tokens:
        h = torch.randn(1, T, hidden, dtype=dtype, device=dev) * 0.1
        pos = torch.arange(T, device=dev)[None]
        cos, sin = rope(h, pos)
        r = dict(world=world, tokens=T, hidden=hidden, layers=2)
        for split, st in stacks.items():
            tag = "split" if split else "nosplit"

            def call(st=st):
                with torch.no_grad():
                    st(h, position_embeddings=(cos, sin))

            r[f"{tag}_eager_us"] = _slowest(_timed(call, max(3, args.iters // 5), 3))
            try:
                r[f"{tag}_graph_us"] = _graph_us(call, 1, max(3, args.iters // 5), 3)
            except Exception as e:  # noqa: BLE001
                r[f"{tag}_graph_us"] = float("nan")
                r[f"{tag}_graph_error"] = f"{type(e).__name__}: {e}"[:200]
        from ringattn.tokenweave.token_split import num_sms, split_ranges

        first = stacks[True].layers[0]
        r["split_at"] = split_ranges(T, True, 0, first.gemm_cols, num_sms(dev))[0][1]
        r["path"] = first.handle(dev).path_for(r["split_at"], hidden, dtype)
        for m in ("eager", "graph"):
            a, b = r[f"nosplit_{m}_us"], r[f"split_{m}_us"]
            r[f"gain_{m}"] = a / b if b == b and b > 0 else float("nan")
        rows.append(r)
        if rank == 0:
            print(f"[split] T={T}: no split {r['nosplit_eager_us']:.0f} us, split {r['split_eager_us']:.0f} us (eager); "
                  f"graph {r['nosplit_graph_us']:.0f} / {r['split_graph_us']:.0f} us", flush=True)
    return rows


def worker(rank, world, init_file, args, q):
    global SMOKE
    SMOKE = args.cpu_smoke
    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    try:
        if not SMOKE:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        out = {}
        if not args.skip_fused:
            out["fused"] = bench_fused(args, rank, world)
        if not args.skip_layer:
            out["split"] = bench_split(args, rank, world)
        q.put((rank, True, out))
    except BaseException:  # noqa: BLE001
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _write_csv(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "perf", "out", "tokenweave"))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=_ints, default=_ints("1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192"))
    p.add_argument("--hidden", type=_ints, default=_ints("4096,8192"))
    p.add_argument("--max-ctas", type=_ints, default=_ints("8,32"), help="CTA caps to compare (8: the default; 32: the kernel max)")
    p.add_argument("--layer-tokens", type=_ints, default=_ints("512,1024,2048,4096,8192"))
    p.add_argument("--calls", type=int, default=20, help="calls per captured graph")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-fused", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--timeout", type=float, default=1500)
    p.add_argument("--cpu-smoke", action="store_true", help="check the flow on CPU (host-sim kernel, tiny sizes); no numbers")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import queue
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = tempfile.mktemp(prefix="ringattn_twbench_")
    procs = [ctx.Process(target=worker, args=(r, args.world, init_file, args, q)) for r in range(args.world)]
    for pr in procs:
        pr.start()
    results, errors = {}, {}
    deadline = time.monotonic() + args.timeout
    while len(results) + len(errors) < args.world and time.monotonic() < deadline:
        try:
            r, ok, v = q.get(timeout=5)
        except queue.Empty:
            if errors or not any(pr.is_alive() for pr in procs):
                if not any(pr.is_alive() for pr in procs):
                    break
            continue
        (results if ok else errors)[r] = v
    for pr in procs:
        pr.join(timeout=10)
        if pr.is_alive():
            pr.kill()
    for r, e in sorted(errors.items()):
        print(f"--- rank {r} failed:\n{e}")
    missing = sorted(set(range(args.world)) - set(results) - set(errors))
    if missing:
        print(f"--- ranks {missing} did not finish within {args.timeout:.0f} s")
    if 0 not in results:
        sys.exit(1)
    out = results[0]
    meta = dict(device="cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(0), torch=torch.__version__, world=args.world,
                mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), args={k: v for k, v in vars(args).items()})
    with open(os.path.join(args.out, "bench_tokenweave.json"), "w") as f:
        json.dump(dict(meta=meta, **out), f, indent=1, default=str)
    lines = [f"== bench_tokenweave: {meta['device']}, torch {meta['torch']}, {args.world} ranks on one GPU =="]
    if "fused" in out:
        _write_csv(os.path.join(args.out, "bench_tokenweave_fused.csv"), out["fused"])
        lines.append(f"fused AR+residual+RMSNorm vs unfused (symm AR + add_rmsnorm [{out['fused'][0]['add_rmsnorm']}]), bf16, us/call (CUDA graph)")
        lines.append(f"{'H':>5} {'T':>5} {'cap':>3} {'ctas':>4} {'path':>12} {'fused':>8} {'shard':>8} {'1shot':>8} {'2shot':>8} {'unfused':>8} {'x':>5}")
        for r in out["fused"]:
            lines.append(f"{r['hidden']:>5} {r['tokens']:>5} {r['max_ctas']:>3} {r['ctas']:>4} {r['path']:>12} {r['fused_us']:>8.1f} "
                         f"{r['fused_shard_us']:>8.1f} {r['fused_1shot_us']:>8.1f} {r['fused_2shot_us']:>8.1f} "
                         f"{r['unfused_us']:>8.1f} {r['speedup']:>5.2f}")
        for ctas in sorted({r["max_ctas"] for r in out["fused"]}):
            sp = [r["speedup"] for r in out["fused"] if r["max_ctas"] == ctas]
            big = [r["speedup"] for r in out["fused"] if r["max_ctas"] == ctas and r["tokens"] >= 1024]
            lines.append(f"max_ctas {ctas}: min speedup {min(sp):.2f}x (target >= 1.0); min at >= 1024 tokens "
                         f"{min(big) if big else float('nan'):.2f}x (target >= 1.3)")
    if "split" in out:
        _write_csv(os.path.join(args.out, "bench_tokenweave_split.csv"), out["split"])
        lines.append(f"token split on a 2-layer TP Llama-8B-shaped stack (hidden {out['split'][0]['hidden']}, "
                     f"fused path at the split: {out['split'][-1]['path']}), us per forward; (g) = CUDA graph")
        lines.append(f"{'T':>5} {'split@':>6} {'nosplit':>9} {'split':>9} {'gain':>5} {'nosplit(g)':>10} {'split(g)':>9} {'gain':>5}")
        for r in out["split"]:
            lines.append(f"{r['tokens']:>5} {r['split_at']:>6} {r['nosplit_eager_us']:>9.0f} {r['split_eager_us']:>9.0f} "
                         f"{r['gain_eager']:>5.2f} {r['nosplit_graph_us']:>10.0f} {r['split_graph_us']:>9.0f} {r['gain_graph']:>5.2f}")
    print("\n".join(lines))
    with open(os.path.join(args.out, "bench_tokenweave_summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    sys.exit(1 if errors or missing else 0)


if __name__ == "__main__":
    main()
