"""Sequence-parallel sweep: algorithm x world x sequence length x heads x causal x window x pass, one CSV/JSON.

    python perf/sweep.py --preset cpu-smoke --out /tmp/sweep                   # < 1 min on 2 CPU cores (gloo)
    python perf/sweep.py --preset cpu --out perf/results/2026-12-01_cpu_sweep.csv
    python perf/sweep.py --preset issue3 --out DIR      # GPU: 4 ranks on ONE GPU over CUDA IPC (start MPS first;
                                                        # scripts/gpu_check.sh does), S = 32k/128k, bf16, causal zigzag
    python perf/sweep.py --transport nccl --worlds 2,4,8 --seqs 16384,65536 --heads 32/32,32/8 \\
        --head-dim 128 --dtype bfloat16 --out DIR        # one GPU per rank
    python perf/sweep.py ... --fresh                     # restart; default: resume, skipping rows already in --out
    python perf/plot.py DIR/sweep.csv                    # PNGs next to the CSV

--out: a .csv path (the JSON goes next to it), or a folder (FOLDER/sweep.csv, FOLDER/sweep.json).
Every row is appended to the CSV as soon as it is measured; re-running with the same --out skips
the configurations whose rows exist (error rows too; --retry-errors drops and redoes those), so
a killed run resumes. At the end the CSV is rewritten with ratio_vs_single filled in and the JSON
(device, torch/CUDA/cuDNN versions, the command of every run, the rows) is written.

What runs. Per world size W the sweep spawns W worker processes (spawn, file:// rendezvous) that
run every configuration of that W in order; a configuration that raises, or reports nothing
within --timeout seconds (a hang), becomes an error row, the world is killed and respawned for
the rest -- never a stuck run. Algorithms (--algorithms):
  ulysses                  ringattn.ulysses_attention (algorithm="ulysses": all-to-all to head
                           shards, one attention over the sequence, all-to-all back; any layout and
                           length; refused where the group cannot split the heads)
  ring, token_ring, auto   ringattn.ring_attention / token_ring_attention / sequence_parallel_
                           attention(algorithm="auto"), backend="auto" (cuDNN on H100/H200, the
                           math kernel on CPU); resolved_algorithm = what auto picked
                           (ringattn.choose_algorithm with the same arguments: backward iff fwd_bwd;
                           its hardware: ringattn.hardware's default for the device, and on ranks
                           sharing one GPU (--transport ipc) the "shared_gpu" topology unless
                           RINGATTN_AUTO_TOPOLOGY is set)
  ulysses_ring             ringattn's 2-D mode (integrations: Ulysses all-to-all over U consecutive
                           ranks, its own uneven-capable all-to-all, then ring over R = W/U), with
                           the U that usp (yunchang) gets for the same row (perf/peers.py
                           usp_degrees), so the two 2-D rows split alike (--usp-ulysses sets both;
                           U = W is pure Ulysses, DeepSpeed-Ulysses' schedule); refused where U is 1
                           (plain ring) and on ipc (the all-to-all is a gloo collective there).
                           sent_bytes_max = its ring messages + its all-to-alls' sent bytes
                           (integrations.deepspeed.a2a_bytes_sent); recv_bytes_max stays empty
  allgather                perf/baselines.py: all-gather K/V of the whole sequence, local Q
                           against it, reduce-scatter dK/dV (collectives on gloo/nccl; P2P over
                           CudaIpcTransport on ipc); same block kernels
  torch_cp                 PyTorch's context_parallel (opt-in; see "Peers" below)
  single                   ONE process, the full sequence: block_attn_forward (+ block_attn_backward
                           given out/lse) with backend="auto" -- on CUDA the cuDNN kernel, on CPU
                           the math kernel. Run once per (seq_len, heads, head_dim, dtype, causal,
                           pass); ratio_vs_single = ms_median / its ms_median (the issue 3 target:
                           W = 4 ranks on one GPU within 1.15x of it).
Sliding windows (--windows 0,4096: 0 = none; causal rows only): ring / token_ring / auto get
sliding_window=w (the all-gather baseline and torch_cp take none and are skipped for windowed
rows); their single baseline is ringattn's own windowed attention in one process (the band's
pieces on the same block kernels: there is no single windowed cuDNN call to compare with); the
reference masks keys more than w-1 back; tflops_per_rank counts the band's pairs
(attention_flops). model.py validate predicts windowed rows with the window (cost_model: pieces).
Transports (--transport): gloo (CPU processes, default without CUDA), nccl (one GPU per rank),
ipc (several ranks SHARING ONE GPU: ringattn.transport.CudaIpcTransport via
ringattn.comm.set_transport_factory, one transport per (group, channel) with as many inbox slots
as the channel has messages per peer and step, closed after every configuration; control
traffic on the gloo default group. Without CUDA, ipc uses the transport's host simulation: that
checks the plumbing on CPU, its times mean nothing).

Timing. Every rank builds the same seeded full inputs (on its device), keeps its own tokens
(layout zigzag by default, --layout contiguous), runs --warmup calls, then --iters timed calls,
each preceded by a device synchronize and a barrier on the gloo control group; each call is
timed with CUDA events on the current stream (GPU; the IPC transport's streams join it in
wait()) or time.perf_counter (CPU). ms_median / ms_min = the max over ranks of each rank's
median / min (ms_median_per_rank has every rank's median). A "fwd" call runs with no autograd
(so auto decides on forward bytes); "fwd_bwd" = forward + backward with a fixed random
upstream gradient (grads reset to None before each call). CPU workers: --threads torch threads
each (default 1) and torch.set_flush_denormal(True) (garbage buffers in the compute-only runs
below must not hit slow denormal paths; all runs use it alike).
tflops_per_rank = FLOPs / W / time, FLOPs as in perf/bench_block_attention.py: forward
4*B*Hq*L*L*D, halved when causal; backward 2.5 x forward (fwd_bwd = 3.5 x forward).

Bytes. sent_bytes_max / recv_bytes_max = the max over ranks of the bytes each rank sent /
received in ONE call (forward, plus backward for fwd_bwd), from ringattn.comm_stats() around the
first call: the P2P messages of ring/token_ring (equal to ringattn.predict_comm_bytes; asserted
by tests/test_perf_sweep.py) and the all-gather baseline's own count (perf/baselines.py: a direct
exchange with every peer, which is also what NCCL's ring all-gather/reduce-scatter move per
rank). Metadata exchanges are not counted. torch_cp: empty (nothing to count with).
peak_mem_bytes: max over ranks of torch.cuda.max_memory_allocated during the timed calls (stats
reset after the warm-up; includes the inputs and the IPC inboxes). CPU: empty (no allocator
statistics on CPU; the process RSS would mostly be the torch import).

Correctness, cheaply, on the first call only (max_abs_err = max over ranks and over the checked
tensors; err_check says what was checked): when B*Hq*L*L <= 2^24 a float64 reference over the
full sequence (out, and dq/dk/dv for fwd_bwd) on every rank, compared on its own rows
("full64"); otherwise R = 16 evenly spaced local query rows per rank against the full K/V in
float64 (CPU) / float32 (CUDA): out, and dq for fwd_bwd ("rows16"; dk/dv depend on every row and
are not checked there). Inputs are N(0, 1).

Overlap (ring and token_ring; auto reuses the numbers of the algorithm it resolved to, same
shapes and pass, since it runs that same schedule):
  compute_only_ms  the same call with a transport whose batch_isend_irecv moves nothing and
                   returns completed works (comm.set_transport_factory): the schedule's compute
                   without any data movement (its results are garbage and never reported);
  comm_sched_ms    the same call with the block-attention kernels replaced by stubs that only
                   allocate outputs of the right shapes (the real transport moves every message;
                   merges and the schedule's other small ops still run);
  sched_only_ms    both replacements at once: what is neither attention nor data movement;
  comm_only_ms     = comm_sched_ms - sched_only_ms: the time of the messages themselves;
  overlap_fraction = 1 - (ms_median - compute_only_ms) / comm_only_ms, clamped to [0, 1]:
                   1 = communication fully hidden behind compute, 0 = fully exposed. Empty when
                   not measured or not resolvable (sweep.overlap_fraction): with noise = max(
                   ms_median - ms_min, 2% of ms_median), comm_only_ms must be >= 2 x noise and
                   ms_median - compute_only_ms within [-noise, comm_only_ms + noise]. Computed
                   from the columns whenever the CSV is (re)written.
  Each is the max over ranks of the median of --overlap-iters calls after one warm-up call.
  allgather: empty (by construction its collectives run before/after the compute, nothing
  overlaps); torch_cp, single: empty. On CPU/gloo a "wait" blocks the host and ranks share the
  cores, and the messages (a few MiB over loopback) take milliseconds against calls of hundreds:
  the CPU numbers exercise the method, and most come out not resolvable.

Peers (project requirement: run a peer library on the same shapes where one can run here).
  rfa, usp, ds_ulysses, torch_ring (perf/peers.py; opt-in: --algorithms ...,rfa,usp,ds_ulysses,torch_ring):
  ring-flash-attn 0.1.8, yunchang 0.6.4 (USP), DeepSpeed-Ulysses (deepspeed 0.19.8) and PyTorch's own
  ring engine (_templated_ring_attention, what its context_parallel dispatches to), in the same
  worker processes, on the same inputs and reference. flash_attn cannot be installed on this
  project's machines, so the three flash-attn users run on perf/flash_attn_shim: flash-attn 2.7's
  private block API computed with ringattn's own block kernel (math on CPU, cuDNN on an H100;
  the real flash_attn is used where it imports, on CUDA: block_backend says which). With the shim
  every algorithm of a row group runs the same kernel: the comparison is of schedules,
  communication and merges, not kernels. A configuration a peer cannot run (uneven lengths,
  non-causal zigzag, fp32 for the flash-attn users, head counts its all-to-all cannot split,
  windows) is written as an "unsupported: <why>" error row without spawning anything, shown as
  n/a in the table. Bytes: rfa's and yunchang's ring messages (their RingComm batches) are
  recorded in ringattn.comm_stats (channel "peer.ring"), and torch_ring's all-gathers / permutes
  and yunchang's all-to-alls (channel "peer.collective", as direct exchanges), so rfa, usp and
  torch_ring have exact sent/recv columns like ringattn's rows; ds_ulysses' all-to-alls are not
  counted (empty). peer_config records their own settings (usp: U x R; torch_ring: rotate
  method, balancing).
  Ranks sharing one GPU (--transport ipc): the peers talk torch.distributed, where NCCL refuses
  two ranks on one GPU and gloo aborts on CUDA send/recv. rfa's and yunchang's ring messages all
  go through one small class (RingComm: queue P2POps, batch_isend_irecv, wait), so perf/peers.py
  posts those batches on a CudaIpcTransport instead (the same transport ringattn's rows use):
  rfa and usp with Ulysses degree 1 run there, on the shim's cuDNN; ds_ulysses, torch_ring and
  usp with U > 1 (all-to-all / all-gather collectives) do not. On a multi-GPU NCCL machine they
  all run as they ship (--transport nccl).
  torch_cp (opt-in): PyTorch context parallel through its public API (context_parallel, DeviceMesh
  over the sweep's group). It replaces only the CUDA SDPA ops; on CPU with gloo (torch 2.14.1) it
  does not run ("Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not have a
  sharding strategy registered"; forcing SDPBackend.MATH: "aten.add.Tensor got mixed torch.Tensor
  and DTensor"), hence torch_ring above for its engine.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import queue
import shlex
import signal
import statistics
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, PERF):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# The columns perf/model.py reads; keep their names. More may be appended.
COLUMNS = [
    "date", "device", "torch", "transport", "algorithm", "resolved_algorithm", "world", "seq_len",
    "batch", "heads_q", "heads_kv", "head_dim", "dtype", "causal", "layout", "window", "pass", "ms_median",
    "ms_min", "tflops_per_rank", "sent_bytes_max", "recv_bytes_max", "peak_mem_bytes",
    "max_abs_err", "compute_only_ms", "overlap_fraction", "error", "ratio_vs_single",
    # extras
    "comm_only_ms", "comm_sched_ms", "sched_only_ms", "ms_median_per_rank", "err_check",
    "block_backend", "cuda", "warmup", "iters", "command", "peer_config",
]
KEY = ("device", "transport", "algorithm", "world", "seq_len", "batch", "heads_q", "heads_kv", "head_dim",
       "dtype", "causal", "layout", "window", "pass")
SINGLE_KEY = ("device", "seq_len", "batch", "heads_q", "heads_kv", "head_dim", "dtype", "causal", "window", "pass")
# Algorithms that take sliding_window= (the all-gather baseline and PyTorch's CP do not: skipped)
WINDOW_ALGORITHMS = ("ring", "token_ring", "auto", "ulysses", "single")
PEER_ALGORITHMS = ("rfa", "usp", "ds_ulysses", "torch_ring")   # perf/peers.py
SP_ALGORITHMS = ("ring", "token_ring", "auto", "ulysses", "ulysses_ring", "allgather", "torch_cp") + PEER_ALGORITHMS
OVERLAP_ALGORITHMS = ("ring", "token_ring")
# Messages per peer in one batch of each channel (docs/sequence_parallel.md): the IPC inbox slots.
IPC_SLOTS = {"allgather": 1, "fwd.kv": 2, "bwd.kv": 2, "bwd.dkv": 2, "fwd.q": 1, "fwd.partial": 2, "bwd.q": 4, "bwd.dq": 1}  # bwd.q: 5 with lse_grad (not swept)
FULL_REF_MAX = 1 << 24     # B*Hq*L*L up to which the float64 reference covers the whole sequence
REF_ROWS = 16              # query rows per rank checked above that

PRESETS = {
    # tiny: 2 ranks, both causal settings, MHA and GQA, every algorithm; < 1 min on 2 cores
    "cpu-smoke": dict(transport="gloo", worlds=[2], seqs=[256], heads=["4/4", "4/2"], head_dim=32, batch=1,
                      dtype="float32", causal=[True, False], passes=["fwd", "fwd_bwd"],
                      algorithms=["ring", "token_ring", "auto", "allgather"], warmup=1, iters=3,
                      overlap_iters=2, timeout=120),
    # the CPU sweep of perf/RESULTS.md (~10 min on 2 cores)
    "cpu": dict(transport="gloo", worlds=[2, 4], seqs=[1024, 4096], heads=["8/8", "8/2"], head_dim=64, batch=1,
                dtype="float32", causal=[True], passes=["fwd", "fwd_bwd"],
                algorithms=["ring", "token_ring", "ulysses", "auto", "allgather"], warmup=1, iters=5, overlap_iters=3,
                timeout=300),
    # issue 3: 4 ranks sharing one GPU (CUDA IPC + MPS) against one cuDNN attention over the full
    # sequence; few calls so that it fits in ~3 minutes of an H100 (scripts/gpu_check.sh)
    "issue3": dict(transport="ipc", worlds=[4], seqs=[32768, 131072], heads=["32/32", "32/8"], head_dim=128,
                   batch=1, dtype="bfloat16", causal=[True], passes=["fwd", "fwd_bwd"],
                   algorithms=["ring", "token_ring", "auto", "allgather"], warmup=1, iters=3, overlap_iters=2,
                   timeout=240),
}
DEFAULTS = dict(transport=None, worlds=[2], seqs=[1024], heads=["4/4"], head_dim=64, batch=1, dtype=None, windows=[0],
                causal=[True], passes=["fwd", "fwd_bwd"], algorithms=["ring", "token_ring", "auto", "allgather"],
                warmup=2, iters=5, overlap_iters=3, timeout=300)


def attention_flops(B, Hq, L, D, causal, pass_, window=None):
    """FLOPs of one call: 4*B*Hq*D per visible (query, key) pair -- L^2, L^2/2 causal, and with a
    causal sliding window w: w(w+1)/2 + (L-w)w (each query its w most recent keys); backward 2.5x."""
    if window not in (None, "") and int(window) < L:
        w = int(window)
        pairs = w * (w + 1) // 2 + (L - w) * w
        fwd = 4 * B * Hq * D * pairs
    else:
        fwd = 4 * B * Hq * L * L * D
        if causal:
            fwd //= 2
    return fwd if pass_ == "fwd" else int(3.5 * fwd)


def _window(cfg):
    """The configuration's sliding window (None: full attention). CSV rows hold "" for none."""
    w = cfg.get("window", "")
    return None if w in (None, "", "0", 0) else int(w)


def _key(row, fields=KEY):
    return tuple(str(row.get(f, "")) for f in fields)  # (rows written before a column existed: "")


# =============================================================================================
# Worker side (runs in the spawned processes)


class _DoneWork:
    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


class NullTransport:
    """Moves nothing; every op completes at once (compute-only timing; results are garbage)."""

    @staticmethod
    def batch_isend_irecv(ops):
        return [_DoneWork() for _ in ops]


def _stub_forward(q, k, v, *, causal=False, softmax_scale=None, backend="auto", softcap=None):
    B, Sq, Hq, _ = q.shape
    return (torch.empty((B, Sq, Hq, v.shape[3]), dtype=q.dtype, device=q.device),  # (v's head dim: MLA)
            torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device))


def _stub_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, backend="auto",
                   dq_out=None, dk_out=None, dv_out=None, softcap=None):
    return (dq_out if dq_out is not None else torch.empty_like(q),
            dk_out if dk_out is not None else torch.empty_like(k),
            dv_out if dv_out is not None else torch.empty_like(v))


@contextlib.contextmanager
def _stub_attention():
    """Replace the block kernels inside both schedules (their block runner, ringattn.documents,
    imports them by name)."""
    import importlib

    doc = importlib.import_module("ringattn.documents")
    saved = [(doc, n, getattr(doc, n)) for n in ("block_attn_forward", "block_attn_backward")]
    for m, n, _ in saved:
        setattr(m, n, _stub_forward if n == "block_attn_forward" else _stub_backward)
    try:
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


class _Env:
    """Per-process state: device, groups, transports."""

    def __init__(self, rank, world, args):
        import torch.distributed as dist

        self.rank, self.world, self.args = rank, world, args
        self.transport_kind = args["transport"]
        if self.transport_kind == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.transport_kind == "ipc" and torch.cuda.is_available():
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        elif self.transport_kind == "none" and torch.cuda.is_available() and not args["cpu"]:
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(args["threads"])
            torch.set_flush_denormal(True)
        if self.transport_kind == "ipc" and self.device.type == "cuda" and not os.environ.get("RINGATTN_AUTO_TOPOLOGY"):
            import ringattn  # auto is told the ranks share one GPU (ringattn.hardware; module docstring)

            ringattn.set_auto_hardware(topology="shared_gpu")
        self.ctrl = None if self.transport_kind != "nccl" else dist.new_group(backend="gloo")
        self.ipc = {}
        self.cache = {}

    # ---- transports -----------------------------------------------------------------------
    def ipc_factory(self, group, channel):
        from ringattn.transport import CudaIpcTransport

        key = (id(group), channel)
        if key not in self.ipc:
            kw = dict(device=self.device) if self.device.type == "cuda" else dict(_backend="host-sim")
            self.ipc[key] = CudaIpcTransport(group=group, slots=IPC_SLOTS.get(channel, 4), timeout_s=120, **kw)
        return self.ipc[key]

    def baseline_transport(self):
        """allgather's exchange: collectives on gloo/nccl; P2P over one CudaIpcTransport on ipc."""
        if self.transport_kind != "ipc":
            return None
        return self.ipc_factory(None, "allgather")

    def close_transports(self):
        for t in self.ipc.values():
            t.close()
        self.ipc = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self):
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier(group=self.ctrl)


def _gen_full(shape_key, device):
    """Seeded full q, k, v, dout (B, L, H, D): identical on every rank (same device type)."""
    B, L, Hq, Hkv, D, dtype = shape_key
    seed = B * 1_000_003 + L * 101 + Hq * 7 + Hkv * 3 + D
    gen = torch.Generator(device=device).manual_seed(seed)

    def mk(h):
        return torch.randn(B, L, h, D, generator=gen, device=device, dtype=torch.float32 if device.type == "cpu"
                           else dtype).to(dtype)

    q, k, v, dout = mk(Hq), mk(Hkv), mk(Hkv), mk(Hq)
    return q, k, v, dout


def _ref_full(q, k, v, dout, causal, window=None):
    """float64 reference over the whole sequence: out, dq, dk, dv (B, L, H, D)."""
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(g, 2)) * q.shape[3] ** -0.5
    if causal:
        L = q.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if window is not None:  # keys more than window-1 positions back
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-window), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vd.repeat_interleave(g, 2))
    out.backward(dout.double())
    return out.detach(), qd.grad, kd.grad, vd.grad


def _ref_rows(q, k, v, dout, causal, rows, window=None):
    """out and dq for the global query positions `rows` (R,) against the full K/V: (B, R, Hq, D).
    float64 on CPU, float32 on CUDA; K/V never repeated (grouped einsum)."""
    ct = torch.float64 if q.device.type == "cpu" else torch.float32
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    scale = D ** -0.5
    kf, vf = k.to(ct), v.to(ct)                                   # (B, L, Hkv, D)
    qr = q[:, rows].to(ct).view(B, len(rows), Hkv, g, D)           # (B, R, Hkv, g, D)
    dor = dout[:, rows].to(ct).view(B, len(rows), Hkv, g, D)
    s = torch.einsum("brhgd,blhd->bhgrl", qr, kf) * scale          # (B, Hkv, g, R, L)
    if causal:
        keys = torch.arange(L, device=q.device)
        s = s.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
        if window is not None:
            s = s.masked_fill(keys[None, :] <= rows[:, None] - window, float("-inf"))
    p = torch.softmax(s, -1)
    o = torch.einsum("bhgrl,blhd->brhgd", p, vf)
    dp = torch.einsum("brhgd,blhd->bhgrl", dor, vf)
    delta = (dor * o).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)   # (B, Hkv, g, R, 1)
    dq = torch.einsum("bhgrl,blhd->brhgd", p * (dp - delta), kf) * scale
    return o.reshape(B, len(rows), Hq, D), dq.reshape(B, len(rows), Hq, D)


class _Shape:
    """One shape's local inputs and reference (cached while consecutive configs share it)."""

    def __init__(self, cfg, env):
        from ringattn.layout import SequenceLayout

        dtype = getattr(torch, cfg["dtype"])
        B, L, Hq, Hkv, D = cfg["batch"], cfg["seq_len"], cfg["heads_q"], cfg["heads_kv"], cfg["head_dim"]
        causal = cfg["causal"]
        dev = env.device
        full = _gen_full((B, L, Hq, Hkv, D, dtype), dev)
        if cfg["algorithm"] == "single":
            pos = torch.arange(L, device=dev)
        elif cfg["algorithm"] in PEER_ALGORITHMS:
            import peers
            pos = peers.positions(cfg["algorithm"], cfg, env.world, env.rank, dev)
        elif cfg["algorithm"] == "ulysses_ring":
            pos = _ulysses_plan(cfg, env).shard(torch.arange(L, device=dev)[None], dim=1)[0]
        else:
            pos = SequenceLayout.build(L, env.world, cfg["layout"]).positions(env.rank, dev)
        self.pos = pos
        if B * Hq * L * L <= FULL_REF_MAX:
            ref = _ref_full(*full, causal, _window(cfg))
            self.check = "full64"
            self.ref_out, self.ref_grads = ref[0][:, pos], [r[:, pos] for r in ref[1:]]
            self.rows = None
        else:
            idx = torch.linspace(0, len(pos) - 1, REF_ROWS, device=dev).round().long()
            self.rows = idx
            o, dq = _ref_rows(*full, causal, pos[idx], _window(cfg))
            self.check = f"rows{REF_ROWS}"
            self.ref_out, self.ref_grads = o, [dq]
        self.q, self.k, self.v, self.dout = (t[:, pos].contiguous() for t in full)
        self.full = full if cfg["algorithm"] == "torch_cp" else None
        del full
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def max_err(self, out, grads):
        """Max |got - ref| over out (and the checked grads when given)."""
        pairs = [(out, self.ref_out)]
        if grads is not None:
            pairs += list(zip(grads, self.ref_grads))
        err = 0.0
        for got, want in pairs:
            got = got.detach()
            if self.rows is not None:
                got = got[:, self.rows]
            err = max(err, (got.to(want.dtype) - want).abs().max().item())
        return err


def _call_fn(cfg, env, shape):
    """fn(q, k, v) -> out for one sequence-parallel algorithm (the step wraps autograd)."""
    import ringattn
    import baselines

    causal, layout, w = cfg["causal"], cfg["layout"], _window(cfg)
    alg = cfg["algorithm"]
    if alg == "ring":
        return lambda q, k, v: ringattn.ring_attention(q, k, v, causal=causal, layout=layout, sliding_window=w)
    if alg in ("token_ring", "auto", "ulysses"):
        return lambda q, k, v: ringattn.sequence_parallel_attention(q, k, v, causal=causal, layout=layout,
                                                                    algorithm=alg, sliding_window=w)
    if alg == "allgather":
        t = env.baseline_transport()
        return lambda q, k, v: baselines.allgather_attention(q, k, v, causal=causal, layout=layout, transport=t)
    if alg == "ulysses_ring":
        plan = _ulysses_plan(cfg, env)
        plan._seq_len = cfg["seq_len"]   # as the HF pre-hook sets it per forward
        return lambda q, k, v: plan.attention(q, k, v, causal=causal, softmax_scale=None)
    if alg in PEER_ALGORITHMS:
        import peers
        return peers.make_fn(alg, dict(cfg, device_type=env.device.type),
                             transport_factory=env.ipc_factory if env.transport_kind == "ipc" else None)
    raise ValueError(alg)


def ulysses_degree(cfg, world):
    """ulysses_ring's U: the one usp (yunchang) uses for the same configuration (perf/peers.py),
    so the two 2-D rows split the same way."""
    import peers
    return peers.usp_split(cfg, world)[0]


def _ulysses_plan(cfg, env):
    """ringattn's 2-D plan (Ulysses U x ring R, ringattn's own all-to-all) for this configuration."""
    from ringattn.integrations.deepspeed import make_ulysses_ring_groups
    from ringattn.integrations.huggingface import SequenceParallelPlan

    u = ulysses_degree(cfg, env.world)
    key = ("ulysses_plan", u, cfg["layout"])
    if key not in env.cache:
        ug, rg = make_ulysses_ring_groups(u)   # collective over the default group; cached by ringattn
        env.cache[key] = SequenceParallelPlan(group=None, algorithm="ulysses+ring", layout=cfg["layout"],
                                              ulysses_size=u, ulysses_group=ug, ring_group=rg,
                                              use_deepspeed=False)
    return env.cache[key]


def _make_step(cfg, env, shape, stack):
    """step() -> (out, grads or None): one call of the configuration."""
    import ringattn

    q, k, v, dout = shape.q, shape.k, shape.v, shape.dout
    alg, causal = cfg["algorithm"], cfg["causal"]
    bwd = cfg["pass"] == "fwd_bwd"
    if alg == "single" and _window(cfg) is not None:
        # one process: ringattn's own windowed attention (the band's pieces on the same kernels)
        cfg = dict(cfg, algorithm="ring", layout="contiguous")
    elif alg == "single":
        def step():
            out, lse = ringattn.block_attn_forward(q, k, v, causal=causal)
            if not bwd:
                return out, None
            return out, ringattn.block_attn_backward(dout, q, k, v, out, lse, causal=causal)
        return step
    if alg == "torch_cp":
        return _torch_cp_step(cfg, env, shape, stack)
    fn = _call_fn(cfg, env, shape)
    if not bwd:
        def step():
            with torch.no_grad():
                return fn(q, k, v), None
        return step
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(dout)
        return out, [leaves[0].grad, leaves[1].grad, leaves[2].grad]
    return step


def _torch_cp_step(cfg, env, shape, stack):
    """PyTorch context parallel on the sweep's group (see the module docstring, "Peers").

    Its buffers are the full (B, H, L, D) tensors, sharded by context_parallel itself with its
    head-tail balancer (= zigzag for causal), entered once for the whole configuration."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel

    if cfg["layout"] != "zigzag" or not cfg["causal"]:
        raise ValueError("torch_cp: only causal zigzag (its head-tail load balancer) is wired up")
    mesh = DeviceMesh(env.device.type, list(range(env.world)))
    bufs = [t.transpose(1, 2).contiguous() for t in shape.full]  # (B, H, L, D)
    stack.enter_context(context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4,
                                         no_restore_buffers=set(bufs)))
    qb, kb, vb, db = bufs
    gqa = cfg["heads_q"] != cfg["heads_kv"]
    bwd = cfg["pass"] == "fwd_bwd"
    leaves = [t.detach().clone().requires_grad_(bwd) for t in (qb, kb, vb)]

    def step():
        for t in leaves:
            t.grad = None
        with contextlib.nullcontext() if bwd else torch.no_grad():
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)
        grads = None
        if bwd:
            out.backward(db)
            grads = [t.grad.transpose(1, 2) for t in leaves]
        return out.transpose(1, 2), grads
    return step


def _time(step, env, warmup, iters):
    """Per-call milliseconds of `iters` calls after `warmup` calls (barrier before each)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        env.sync()
        env.barrier()
        if env.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    env.sync()
    return times


def _run_config(cfg, env, shape, overlap_cache):
    """This rank's measurements of one configuration (a dict; rank 0 combines them)."""
    import ringattn
    import ringattn.comm as comm

    res = {}
    ipc = env.transport_kind == "ipc"
    with contextlib.ExitStack() as stack:
        if ipc and cfg["algorithm"] != "single":
            comm.set_transport_factory(env.ipc_factory)
            stack.callback(comm.set_transport_factory, None)
            stack.callback(env.close_transports)
        step = _make_step(cfg, env, shape, stack)
        env.sync()
        env.barrier()
        from ringattn.integrations.deepspeed import a2a_bytes_sent
        a2a0 = a2a_bytes_sent()
        with ringattn.comm_stats() as st:
            out, grads = step()
        env.sync()
        res["sent"], res["recv"] = st.sent_bytes, st.recv_bytes
        res["a2a_sent"] = a2a_bytes_sent() - a2a0   # ulysses_ring's all-to-alls (sent side only)
        res["err"] = shape.max_err(out, grads)
        del out, grads
        a = env.args
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        times = _time(step, env, max(0, a["warmup"] - 1), a["iters"])
        res["median"], res["min"] = statistics.median(times), min(times)
        res["peak"] = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None
        if cfg["algorithm"] in OVERLAP_ALGORITHMS and env.world > 1 and a["overlap_iters"] > 0:
            real_factory = env.ipc_factory if ipc else None
            oi = a["overlap_iters"]
            comm.set_transport_factory(lambda group, channel: NullTransport())
            res["compute_only"] = statistics.median(_time(step, env, 1, oi))
            comm.set_transport_factory(real_factory)
            with _stub_attention():
                res["comm_sched"] = statistics.median(_time(step, env, 1, oi))
                comm.set_transport_factory(lambda group, channel: NullTransport())
                res["sched_only"] = statistics.median(_time(step, env, 1, oi))
            comm.set_transport_factory(real_factory)
    return res


def _resolved(cfg, world, device_type):
    import ringattn

    if cfg["algorithm"] != "auto":
        return cfg["algorithm"]
    return ringattn.choose_algorithm(
        seq_len=cfg["seq_len"], world_size=world, layout=cfg["layout"], causal=cfg["causal"], batch=cfg["batch"],
        heads_q=cfg["heads_q"], heads_kv=cfg["heads_kv"], head_dim=cfg["head_dim"],
        dtype=getattr(torch, cfg["dtype"]), backward=cfg["pass"] == "fwd_bwd", sliding_window=_window(cfg),
        device=device_type).algorithm


def _combine(cfg, env, per_rank, overlap_cache):
    """Rank 0: one CSV row from every rank's measurements."""
    import ringattn

    W = env.world
    mx = lambda name: max(r[name] for r in per_rank) if all(r.get(name) is not None for r in per_rank) else None  # noqa: E731
    row = dict(cfg)
    row["resolved_algorithm"] = _resolved(cfg, W, env.device.type) if cfg["algorithm"] != "single" else "single"
    row["ms_median"], row["ms_min"] = mx("median"), mx("min")
    row["ms_median_per_rank"] = ";".join(f"{r['median']:.4g}" for r in per_rank)
    flops = attention_flops(cfg["batch"], cfg["heads_q"], cfg["seq_len"], cfg["head_dim"], cfg["causal"], cfg["pass"],
                            _window(cfg))
    row["tflops_per_rank"] = flops / W / (row["ms_median"] * 1e-3) / 1e12
    if cfg["algorithm"] in PEER_ALGORITHMS:
        import peers
        counted = peers.counts_bytes(cfg["algorithm"], cfg, W)   # their ring messages are recorded too
    else:
        counted = cfg["algorithm"] not in ("torch_cp", "ulysses_ring")
    if counted:  # (else traffic comm_stats does not see: collectives)
        row["sent_bytes_max"], row["recv_bytes_max"] = mx("sent"), mx("recv")
    elif cfg["algorithm"] == "ulysses_ring":   # its ring + its all-to-alls' sent bytes; received: not tracked
        row["sent_bytes_max"] = max(r["sent"] + r["a2a_sent"] for r in per_rank)
    row["peak_mem_bytes"] = mx("peak")
    row["max_abs_err"] = mx("err")
    ov_key = (cfg["seq_len"], cfg["batch"], cfg["heads_q"], cfg["heads_kv"], cfg["head_dim"], cfg["dtype"],
              cfg["causal"], cfg["layout"], _window(cfg), cfg["pass"])
    if cfg["algorithm"] in OVERLAP_ALGORITHMS and mx("compute_only") is not None:
        overlap_cache[(ov_key, cfg["algorithm"])] = (mx("compute_only"), mx("comm_sched"), mx("sched_only"))
    got = overlap_cache.get((ov_key, row["resolved_algorithm"])) if cfg["algorithm"] in ("ring", "token_ring", "auto") else None
    if got is not None:
        c, cs, so = got
        row["compute_only_ms"], row["comm_sched_ms"], row["sched_only_ms"] = c, cs, so
        comm_only = cs - so
        row["comm_only_ms"] = comm_only
    if cfg["algorithm"] == "torch_cp":
        row["block_backend"] = "sdpa"
    else:  # what backend="auto" runs for a (diagonal) block of these shapes
        q = torch.empty(cfg["batch"], 1, cfg["heads_q"], cfg["head_dim"], dtype=getattr(torch, cfg["dtype"]),
                        device=env.device)
        k = torch.empty(cfg["batch"], 1, cfg["heads_kv"], cfg["head_dim"], dtype=q.dtype, device=env.device)
        row["block_backend"] = ringattn.select_backend(q, k, k, causal=cfg["causal"])
    if cfg["algorithm"] in PEER_ALGORITHMS:   # the peer's kernel: the same one via the shim, or flash_attn
        import peers
        row["block_backend"] = peers.kernel_label(cfg["algorithm"], env.device.type, row["block_backend"])
        row["peer_config"] = peers.config_label(cfg["algorithm"], cfg, W)
    if cfg["algorithm"] == "ulysses_ring":
        u = ulysses_degree(cfg, W)
        row["peer_config"] = f"ringattn ulysses+ring U={u} R={W // u} (its own all-to-all)"
    row["err_check"] = env.err_check
    row["warmup"], row["iters"] = env.args["warmup"], env.args["iters"]
    return row


def _positions_kind(cfg):
    """What decides a configuration's tokens per rank besides the shape (the _Shape cache key)."""
    if cfg["algorithm"] in ("usp", "ulysses_ring"):
        return "2d"       # ring layout over R ranks, then U pieces (the same rule in both)
    return cfg["algorithm"] == "torch_cp"   # keeps the full tensors too


def _worker(rank, world, init_file, args, configs, results):
    env = None
    key = None
    try:
        os.environ.setdefault("OMP_NUM_THREADS", str(args["threads"]))
        import torch.distributed as dist

        backend = "nccl" if args["transport"] == "nccl" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args["timeout"]))
        env = _Env(rank, world, args)
        results.put(("ready", rank, None))
        shape, shape_key, overlap_cache = None, None, {}
        for cfg in configs:
            key = cfg["_key"]
            if rank == 0:
                results.put(("start", key, None))
            sk = (cfg["batch"], cfg["seq_len"], cfg["heads_q"], cfg["heads_kv"], cfg["head_dim"], cfg["dtype"],
                  cfg["causal"], cfg["layout"], _window(cfg), _positions_kind(cfg))
            if sk != shape_key:
                shape = shape_key = None
                if env.device.type == "cuda":
                    torch.cuda.empty_cache()
                shape, shape_key = _Shape(cfg, env), sk
            env.err_check = shape.check + (":out,dq,dk,dv" if shape.rows is None else ":out,dq") \
                if cfg["pass"] == "fwd_bwd" else shape.check + ":out"
            res = _run_config(cfg, env, shape, overlap_cache)
            gathered = [None] * world
            if world > 1:
                dist.all_gather_object(gathered, res, group=env.ctrl)
            else:
                gathered = [res]
            if rank == 0:
                row = _combine({k: v for k, v in cfg.items() if not k.startswith("_")}, env, gathered, overlap_cache)
                results.put(("row", key, row))
        results.put(("done", rank, None))
        env.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which kills the world
        tb = traceback.format_exc()
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        results.put(("error", key, {"rank": rank, "line": line, "traceback": tb}))
        time.sleep(2)
        os._exit(1)


# =============================================================================================
# Parent side


def _spawn_world(world, configs, args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="ringattn_sweep_")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "rdzv"), args, configs, results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs, results


def _kill(procs):
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


class Terminated(Exception):
    """SIGTERM (e.g. from `timeout` in scripts/gpu_check.sh): stop, kill the world, write what exists."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_world(world, configs, args, on_row, log):
    """Run `configs` (all of world size `world`); on_row(row) for each; errors become rows."""
    remaining = list(configs)
    while remaining:
        procs, results = _spawn_world(world, remaining, args)
        try:
            if _drive_world(world, procs, results, remaining, args, on_row, log):
                return
        finally:  # also on Terminated / KeyboardInterrupt: never leave workers on the device
            _kill(procs)


def _drive_world(world, procs, results, remaining, args, on_row, log):
    """Collect one spawned world's rows; True when nothing is left to respawn for."""
    current, deadline = None, time.monotonic() + args["startup_timeout"]
    finished = 0
    broken = None
    while True:
        try:
            kind, key, payload = results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline:
                broken = (current, f"no result within {args['timeout'] if current else args['startup_timeout']:.0f} s "
                                   "(a hang); the world was killed")
                break
            if not all(p.is_alive() for p in procs):
                time.sleep(2.0)  # let an error message arrive first
                try:
                    kind, key, payload = results.get(timeout=1.0)
                except queue.Empty:
                    broken = (current, "a rank exited without a result (crash); the world was killed")
                    break
            else:
                continue
        if kind == "start":
            current, deadline = key, time.monotonic() + args["timeout"]
        elif kind == "row":
            cfg = next(c for c in remaining if c["_key"] == key)
            remaining.remove(cfg)
            on_row(payload)
            current = None
            deadline = time.monotonic() + args["timeout"]
        elif kind == "error":
            log(f"world {world}: rank {payload['rank']} failed on {key}:\n{payload['traceback']}")
            broken = (key or current, f"rank {payload['rank']}: {payload['line']}")
            break
        elif kind == "done":
            finished += 1
            if finished == world:
                break
    if broken is not None:
        _kill(procs)
        bad_key, msg = broken
        bad = next((c for c in remaining if c["_key"] == bad_key), None)
        if bad is None:  # failed before its first configuration: all of them fail
            for c in remaining:
                on_row(_error_row(c, msg))
            remaining.clear()
            return True
        remaining.remove(bad)
        on_row(_error_row(bad, msg))
        return False  # respawn for the rest
    for p in procs:
        p.join(timeout=30)
    for c in remaining:  # reported done without a row: should not happen
        on_row(_error_row(c, "no row reported"))
    remaining.clear()
    return True


def _error_row(cfg, msg):
    row = {k: v for k, v in cfg.items() if not k.startswith("_")}
    row["error"] = msg
    return row


def _ulysses_problem(c):
    u = ulysses_degree(c, c["world"])
    if u == 1:
        return "ulysses_ring: Ulysses degree 1 (the usp rule for this configuration) is plain ring"
    if c["transport"] == "ipc":
        return "ulysses_ring: its all-to-all is a torch.distributed collective (gloo only on ranks sharing one GPU)"
    if c["heads_q"] % u or c["heads_kv"] % u:
        return f"ulysses_ring: U={u} must divide heads_q={c['heads_q']} and heads_kv={c['heads_kv']}"
    if _window(c) is not None:
        return "ulysses_ring: sliding windows are not wired up in the sweep"
    return None


def _refuse_unsupported(configs, on_row):
    """Write an "unsupported: ..." error row for each peer configuration perf/peers.py cannot run
    (without spawning anything); return the rest."""
    keep = []
    for c in configs:
        why = None
        if c["algorithm"] in PEER_ALGORITHMS:
            import peers
            why = peers.problem(c["algorithm"], c, c["world"])
        elif c["algorithm"] == "ulysses_ring":
            why = _ulysses_problem(c)
        elif c["algorithm"] == "ulysses":
            from ringattn.ulysses import heads_problem
            why = heads_problem(c["heads_q"], c["heads_kv"], c["world"])
        if why:
            on_row(_error_row(c, "unsupported: " + why))
        else:
            keep.append(c)
    return keep


def _parse_heads(spec):
    out = []
    for h in spec:
        q, _, kv = h.partition("/")
        out.append((int(q), int(kv or q)))
    return out


def build_configs(args, device_name):
    """Every configuration (singles first, then by world, shape-major), as dicts with a `_key`."""
    singles, by_world = [], {}
    for L in args.seqs:
        for hq, hkv in _parse_heads(args.heads):
            for causal in args.causal:
                for w in args.windows:
                    if w and not causal:
                        continue  # sliding windows are causal
                    for p in args.passes:
                        base = dict(device=device_name, seq_len=L, batch=args.batch, heads_q=hq, heads_kv=hkv,
                                    head_dim=args.head_dim, dtype=args.dtype, causal=causal, pass_=p,
                                    window=w or "")
                        if not args.no_single:
                            singles.append(dict(base, transport="none", algorithm="single", world=1, layout=""))
                        for W in args.worlds:
                            for alg in args.algorithms:
                                if w and alg not in WINDOW_ALGORITHMS:
                                    continue
                                c = dict(base, transport=args.transport, algorithm=alg, world=W, layout=args.layout)
                                if alg in ("usp", "ulysses_ring") and getattr(args, "usp_ulysses", None):
                                    c["usp_ulysses"] = args.usp_ulysses
                                by_world.setdefault(W, []).append(c)
    out = []
    for group in ([singles] if singles else []) + [by_world[w] for w in sorted(by_world)]:
        for c in group:
            c["pass"] = c.pop("pass_")
            c["_key"] = _key(c)
        out.append(group)
    return out


def _read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def overlap_fraction(ms_median, ms_min, compute_only_ms, comm_only_ms):
    """1 - (T - C) / M clamped to [0, 1], or None when the measurement cannot resolve it. With
    noise = max(T - T_min, 2% of T) (the call's run-to-run spread): M must be >= 2 x noise, and
    the exposed time T - C must lie within [-noise, M + noise] (a compute-only run slower than the
    real one, or a real run slower than compute plus all messages, means noise decided)."""
    T, C, M = ms_median, compute_only_ms, comm_only_ms
    if None in (T, C, M):
        return None
    noise = max(T - (ms_min if ms_min is not None else T), 0.02 * T)
    if M < 2 * noise or not -noise <= T - C <= M + noise:
        return None
    return min(1.0, max(0.0, 1.0 - (T - C) / M))


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fill_derived(rows):
    """ratio_vs_single and overlap_fraction of every row, from its measured columns."""
    singles = {_key(r, SINGLE_KEY): r for r in rows if r["algorithm"] == "single" and not r.get("error")}
    for r in rows:
        s = singles.get(_key(r, SINGLE_KEY))
        ms, ref = _float(r.get("ms_median")), _float(s["ms_median"]) if s else None
        r["ratio_vs_single"] = f"{ms / ref:.4g}" if ms and ref and not r.get("error") else ""
        ov = overlap_fraction(ms, _float(r.get("ms_min")), _float(r.get("compute_only_ms")),
                              _float(r.get("comm_only_ms")))
        r["overlap_fraction"] = "" if ov is None else f"{ov:.4g}"


def _write_csv(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c, "")) for c in COLUMNS})
    os.replace(tmp, path)


def print_table(rows, file=sys.stdout):
    """One line per (world, seq_len, heads, causal, pass): single ms, then ms / ratio per algorithm."""
    algs = [a for a in SP_ALGORITHMS if any(r["algorithm"] == a for r in rows)]
    sp = [r for r in rows if r["algorithm"] != "single"]
    singles = {_key(r, SINGLE_KEY): r for r in rows if r["algorithm"] == "single"}
    head = f"{'W':>2} {'L':>7} {'Hq/Hkv':>6} {'causal':>6} {'layout':>10} {'window':>6} {'pass':>7} | {'single ms':>9} |" + "".join(
        f" {a + ' ms (x single, overlap)':>34} |" for a in algs) + " auto->"
    print(head, file=file)
    groups = {}
    for r in sp:
        groups.setdefault((r["world"], r["seq_len"], r["heads_q"], r["heads_kv"], r["causal"], r.get("window", ""),
                           r["pass"], r.get("layout", "")), []).append(r)
    for (W, L, hq, hkv, causal, win, p, lay), mine in groups.items():
        s = singles.get(_key(mine[0], SINGLE_KEY))
        line = f"{W:>2} {L:>7} {f'{hq}/{hkv}':>6} {str(causal):>6} {lay:>10} {str(win or '-'):>6} {p:>7} | " \
               f"{(_num(s['ms_median']) if s and not s.get('error') else '-'):>9} |"
        resolved = "-"
        for a in algs:
            r = next((x for x in mine if x["algorithm"] == a), None)
            if r is None:
                cell = "-"
            elif str(r.get("error")).startswith("unsupported:"):
                cell = "n/a"
            elif r.get("error"):
                cell = "ERROR"
            else:
                ov = r.get("overlap_fraction")
                cell = f"{_num(r['ms_median'])} ({_num(r.get('ratio_vs_single'), 3) or '-'}x, " \
                       f"{(_num(ov, 2) if ov not in (None, '') else '-')})"
                if a == "auto":
                    resolved = r.get("resolved_algorithm", "-")
            line += f" {cell:>34} |"
        print(line + f" {resolved}", file=file)


def _num(v, digits=4):
    if v in (None, ""):
        return ""
    return f"{float(v):.{digits}g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a .csv path, or a folder (FOLDER/sweep.csv + .json)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named sweep; explicit flags override it")
    csv_list = lambda f: lambda s: [f(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--algorithms", type=csv_list(str), help=f"comma list of {SP_ALGORITHMS}")
    ap.add_argument("--worlds", type=csv_list(int))
    ap.add_argument("--seqs", type=csv_list(int), help="global sequence lengths")
    ap.add_argument("--heads", type=csv_list(str), help="Hq/Hkv pairs, e.g. 32/32,32/8")
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--causal", type=csv_list(lambda s: s.lower() in ("1", "true", "yes")), help="e.g. 1,0")
    ap.add_argument("--pass", dest="passes", type=csv_list(str), help="fwd,fwd_bwd")
    ap.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    ap.add_argument("--windows", type=csv_list(int), help="causal sliding windows, 0 = none, e.g. 0,4096 "
                    f"(only {', '.join(WINDOW_ALGORITHMS)} take one; non-causal rows skip windows)")
    ap.add_argument("--transport", choices=["gloo", "nccl", "ipc"])
    ap.add_argument("--usp-ulysses", type=int, help="usp (yunchang) and ulysses_ring (ringattn's 2-D mode, the "
                    "same split): Ulysses degree U (default: the largest divisor of the world size dividing both "
                    "head counts, with W/U >= 2 on gloo); the ring degree is W/U (U = W: pure Ulysses)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--overlap-iters", type=int, help="timed calls of each overlap run (0: skip them)")
    ap.add_argument("--timeout", type=float, help="seconds per configuration before the world is killed")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    ap.add_argument("--no-single", action="store_true", help="skip the single-process baseline rows")
    ap.add_argument("--cpu", action="store_true", help="run the single baseline on CPU even with CUDA")
    ap.add_argument("--fresh", action="store_true", help="discard existing rows in --out")
    ap.add_argument("--retry-errors", action="store_true", help="drop existing error rows and run them again")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    # ipc: a stream blocked in cuStreamWaitValue32 blocks its hardware queue; with more streams
    # than queues (CUDA's default is 8) other streams could sit behind it (ringattn/transport).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    preset = dict(DEFAULTS, **PRESETS.get(args.preset, {}))
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)

    has_cuda = torch.cuda.is_available()
    if args.transport is None:
        args.transport = "nccl" if has_cuda and torch.cuda.device_count() > 1 else ("ipc" if has_cuda else "gloo")
    if args.dtype is None:
        args.dtype = "bfloat16" if has_cuda and args.transport != "gloo" else "float32"
    bad = [a for a in args.algorithms if a not in SP_ALGORITHMS]
    if bad:
        ap.error(f"unknown algorithms {bad}; choose from {SP_ALGORITHMS}")
    on_gpu = has_cuda and args.transport in ("nccl", "ipc")
    if args.transport == "nccl" and not has_cuda:
        ap.error("--transport nccl needs CUDA GPUs")
    device_name = torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.processor() or platform.machine()}, " \
                                                               f"{os.cpu_count()} cores)"
    if args.transport == "ipc" and not has_cuda:
        device_name += " ipc-host-sim"
    if not on_gpu:
        args.cpu = True

    if args.out.endswith(".csv"):
        csv_path = args.out
    else:
        os.makedirs(args.out, exist_ok=True)
        csv_path = os.path.join(args.out, "sweep.csv")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    json_path = csv_path[:-4] + ".json"
    existing = [] if args.fresh else _read_csv(csv_path)
    if args.retry_errors:
        existing = [r for r in existing if not r.get("error")]
    done = {_key(r) for r in existing}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv) if argv is None else \
        shlex.join(["sweep.py"] + list(argv))
    run_meta = dict(date=date, command=command, device=device_name, torch=torch.__version__, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if on_gpu else None, transport=args.transport,
                    python=platform.python_version(), host_cpus=os.cpu_count(),
                    mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")))
    groups = build_configs(args, device_name)
    todo = [[c for c in g if c["_key"] not in done] for g in groups]
    total = sum(len(g) for g in todo)
    print(f"# {date} {device_name} torch {torch.__version__} transport {args.transport}: {total} configurations to "
          f"run, {sum(len(g) for g in groups) - total} already in {csv_path}", file=sys.stderr)

    rows = list(existing)
    _write_csv(csv_path, rows)
    log_path = csv_path[:-4] + ".log"
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        bar = None

    def log(msg):
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    def on_row(row):
        row.update(date=date, torch=torch.__version__, cuda=(torch.version.cuda or "") if on_gpu else "", command=command)
        row.setdefault("device", device_name)
        rows.append(row)
        with open(csv_path, "a", newline="") as f:  # append at once: a killed run keeps it
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerow(
                {c: _fmt(row.get(c, "")) for c in COLUMNS})
        if bar is not None:
            bar.set_postfix_str(f"{row['algorithm']} W={row['world']} L={row['seq_len']} {row['pass']}"
                                + (" ERROR" if row.get("error") else ""))
            bar.update(1)

    wargs = dict(transport=args.transport, warmup=args.warmup, iters=args.iters, overlap_iters=args.overlap_iters,
                 timeout=args.timeout, startup_timeout=args.startup_timeout, threads=args.threads, cpu=args.cpu)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stopped = None
    try:
        for g in todo:
            g = _refuse_unsupported(g, on_row)
            if not g:
                continue
            W = g[0]["world"]
            wa = dict(wargs, transport="none" if g[0]["algorithm"] == "single" else args.transport)
            run_world(W, g, wa, on_row, log)
    except (Terminated, KeyboardInterrupt) as e:
        stopped = type(e).__name__
        print(f"# {stopped}: stopped early; writing the {len(rows)} rows measured so far", file=sys.stderr)
    if bar is not None:
        bar.close()

    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    _fill_derived(rows)
    _write_csv(csv_path, rows)
    meta = {}
    if os.path.exists(json_path) and not args.fresh:
        try:
            with open(json_path) as f:
                meta = json.load(f).get("meta", {})
        except (OSError, ValueError):
            meta = {}
    meta.setdefault("runs", []).append(run_meta)
    meta.update(columns=COLUMNS, flops="fwd 4*B*Hq*L*L*D (halved if causal); fwd_bwd 3.5 x fwd; per rank: / world",
                timing="max over ranks of the per-rank median of --iters calls (barrier before each) after --warmup",
                overlap="1 - (ms_median - compute_only_ms) / comm_only_ms, comm_only_ms = comm_sched_ms - sched_only_ms")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    errors = [r for r in rows if r.get("error")]
    print(f"# wrote {csv_path} ({len(rows)} rows, {len(errors)} errors) and {json_path}", file=sys.stderr)
    for r in errors:
        print(f"ERROR {r['algorithm']} W={r['world']} L={r['seq_len']} {r['heads_q']}/{r['heads_kv']} "
              f"{r['pass']}: {r['error']}", file=sys.stderr)
    print_table([_typed(r) for r in rows])
    return 1 if stopped else 0


def _typed(r):
    out = dict(r)
    for k in ("world", "seq_len", "heads_q", "heads_kv"):
        try:
            out[k] = int(out[k])
        except (TypeError, ValueError):
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
