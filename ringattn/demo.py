"""ringattn's main job (for now: a multi-rank demo of the op layer; the long-context training
job replaces it in a later issue).

    bash scripts/demo.sh                                   # 4 CPU ranks via torchrun (gloo)
    launch/torchrun.sh 4 -m ringattn.demo --seq 4096       # the same, by hand
    launch/mpirun.sh 2 -m ringattn.demo --quick            # mpirun + mpi4py bootstrap

Each rank holds a contiguous shard of Q, K and V of one long sequence. It gathers the K/V
shards, computes one (out, lse) block per shard with ringattn.block_attn_forward and folds
them into an fp32 accumulator with the merge op, then checks its rows against a single-process
float64 attention. Then a tensor-parallel step: all_reduce of a partial activation followed by
ringattn.add_rmsnorm, checked against the eager composition. Prints a table on rank 0 and
exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.distributed import init_distributed


def _reference_attention(q, k, v, causal):
    # q,k,v: (B, L, H, D) float64 -> (B, L, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048, help="global sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="tiny sizes (launcher smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.heads, args.head_dim, args.hidden = 64, 2, 16, 64

    info = init_distributed()
    rank, world = info.rank, info.world_size
    dev = info.device
    torch.manual_seed(0)
    L, H, D = args.seq, args.heads, args.head_dim
    if L < world:
        raise SystemExit(f"--seq {L} must be >= the number of ranks {world}")
    q, k, v = (torch.randn(1, L, H, D, dtype=torch.float64) for _ in range(3))
    bounds = [L * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    q_loc = q[:, lo:hi].float().to(dev)
    k_loc, v_loc = (t[:, lo:hi].float().to(dev).contiguous() for t in (k, v))

    t0 = time.perf_counter()
    # Gather every rank's K/V shard (the simple baseline; ring algorithms avoid this). Shards
    # may differ by one token and all_gather needs equal sizes: pad to the largest, then slice.
    pad = max(bounds[r + 1] - bounds[r] for r in range(world))
    kv_loc = torch.zeros(2, 1, pad, H, D, device=dev)
    kv_loc[0, :, : hi - lo], kv_loc[1, :, : hi - lo] = k_loc, v_loc
    kvs = [torch.empty_like(kv_loc) for _ in range(world)]
    dist.all_gather(kvs, kv_loc)
    ks = [kvs[r][0, :, : bounds[r + 1] - bounds[r]] for r in range(world)]
    vs = [kvs[r][1, :, : bounds[r + 1] - bounds[r]] for r in range(world)]
    acc_out = torch.zeros(1, hi - lo, H, D, device=dev)
    acc_lse = torch.full((1, H, hi - lo), float("-inf"), device=dev)
    for r in range(rank + 1):  # causal: shards after ours are fully masked
        part_out, part_lse = ringattn.block_attn_forward(q_loc, ks[r], vs[r], causal=(r == rank))
        ringattn.merge_attn_states_(acc_out, acc_lse, part_out, part_lse)
    t_attn = time.perf_counter() - t0
    ref = _reference_attention(q, k, v, causal=True)[:, lo:hi]
    attn_err = (acc_out.double().cpu() - ref).abs().max().item()

    # Tensor-parallel step: y = rmsnorm(allreduce(x) + residual) * w.
    T, Hd = max(L // world, 1), args.hidden  # same token count on every rank (TP)
    x = torch.randn(T, Hd, generator=torch.Generator().manual_seed(100 + rank)).to(dev)
    res = torch.randn(T, Hd, generator=torch.Generator().manual_seed(7)).to(dev)
    w = torch.randn(Hd, generator=torch.Generator().manual_seed(8)).to(dev)
    t0 = time.perf_counter()
    if world > 1:
        dist.all_reduce(x)
    y, new_res = ringattn.add_rmsnorm(x, res, w, 1e-6)
    t_norm = time.perf_counter() - t0
    ref_res = x.double() + res.double()
    ref_y = ref_res * torch.rsqrt(ref_res.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    norm_err = (y.double() - ref_y).abs().max().item()

    stats = torch.tensor([attn_err, norm_err, t_attn, t_norm], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    ok = all(s[0] < 1e-4 and s[1] < 1e-3 for s in gathered)
    if rank == 0:
        print(f"ringattn demo: {world} ranks ({info.launcher}, {info.backend}), seq {L}, heads {H}, head_dim {D}")
        print(f"{'rank':>4} {'attn max err':>13} {'attn ms':>9} {'ar+rmsnorm err':>15} {'ms':>8}")
        for r, s in enumerate(gathered):
            print(f"{r:>4} {s[0].item():>13.2e} {s[2].item() * 1e3:>9.2f} {s[1].item():>15.2e} {s[3].item() * 1e3:>8.2f}")
        print("demo OK" if ok else "demo FAILED: errors above tolerance (attn 1e-4, norm 1e-3)")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
