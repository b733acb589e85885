"""Cost model of ring attention (KV rotation), TokenRing (Q rotation) and Ulysses (all-to-all to
head shards): predicted per-step and total time for W ranks, from measured block-attention speed
and link bandwidth/latency.

    from ringattn import cost_model as cm
    p = cm.predict("token_ring", seq_len=131072, world_size=8, layout="zigzag", causal=True,
                   batch=1, heads_q=32, heads_kv=8, head_dim=128, dtype=torch.bfloat16,
                   backward=True, topology="nvswitch")          # profile: H100 cuDNN by default
    p.total_s, p.exposed_comm_s, p.steps, p.bytes                # bytes == predict_comm_bytes
    cm.compare(...) -> {"ring": Prediction, "token_ring": Prediction, "ulysses": Prediction}
                                                                 # (ulysses where W splits the heads)

What is simulated (docs/cost_model.md has the equations): every rank's program exactly as
ring_attention.py / token_ring.py run it -- per step the block attention of the rows that
layout.attention_block says exist (so causal zigzag's half-Q trick and the uneven chunk tables
are those of the code), the fp32 merges / adds / zero-fills / casts around it, and the P2P posts
and waits of each channel in the code's order. A discrete-event pass runs the W programs
together: compute advances a rank's stream; a message starts when both ends have posted it and
ends latency + transfer later; a wait advances the stream to the end of the batch it waits on.
So a step costs max(compute, comm) plus whatever the code does not overlap (TokenRing's last
partial, ring's last dK/dV hop, merges between waits, load imbalance). Ulysses (ulysses.py) is
three steps per pass: the all-to-all to head shards with the copies around it, the world-1 ring
program over the whole sequence for Hq/W heads, the all-to-all back -- nothing overlapped.

Transfers: a topology maps each (src, dst) pair to the resources it crosses (a GPU's NVSwitch
port per direction, a PCIe link, a shared host bridge, ring/mesh links, a NIC) and a latency.
Messages are grouped into the compute step during which the code has them in flight (a
"phase"); all messages of one phase share each resource and finish together: a message's
transfer time is max over its resources of (phase bytes on it / its bandwidth). That is exact
for the symmetric steps of the rings and an all-to-all's even split, and pessimistic for a small message sharing a link
with a large one.

Compute: ComputeProfile, t = overhead + work / rate per (backend, op, causal) -- a TFLOP/s that
saturates with block size -- fitted to measured rows (perf/model.py calibrate); memory-bound
passes (merge, add, zero, cast) t = overhead + bytes / bandwidth, fitted to the measured
merge_attn_states_ rows. The default profile H100_BF16 is the fit to the H100 CSVs in
perf/results (2026-11-22); its block shapes were square S in {4096, 16384} only, so other block
shapes (rectangular zigzag blocks, small blocks at large W) are EXTRAPOLATED by FLOP count. Its
per-call intercepts (e.g. ~0.3 ms per cuDNN backward) come from that two-size fit, so many small
blocks (a ring at short L / large W) are likely over-charged next to Ulysses' one big attention:
the model favours Ulysses there by more than a GPU may.
Link numbers in the presets are ASSUMED spec-sheet values (named where each is defined), not
measurements. Pure Python: no tensor is created.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

from ringattn.layout import RingPlan, SequenceLayout

ALGORITHMS = ("ring", "token_ring")   # the two ring schedules (compare, perf/model.py's validation grid)
MODELED = ALGORITHMS + ("ulysses",)    # what predict simulates: also Ulysses' all-to-alls (ulysses.py)

# --------------------------------------------------------------------------------------------
# Compute profile


@dataclasses.dataclass(frozen=True)
class Curve:
    """t = overhead_s + work / rate (work: FLOPs or bytes; rate: per second). Equivalent to a
    throughput rate * work / (work + overhead_s * rate) that saturates at `rate` for big work.

    points: optional measured ((work, seconds), ...) sorted by work. Then inside their range the
    time is interpolated between neighbouring points (linear in log work / log time), and outside
    it the nearest end point is scaled by the fitted line (t_end * fit(w) / fit(w_end)) -- for
    devices whose speed is not a smooth function of FLOPs (the CPU math backend)."""

    overhead_s: float
    rate: float
    points: tuple = ()

    def _fit(self, work: float) -> float:
        return self.overhead_s + work / self.rate

    def time(self, work: float) -> float:
        if work <= 0:
            return 0.0
        pts = self.points
        if not pts:
            return self._fit(work)
        if work <= pts[0][0]:
            return pts[0][1] * self._fit(work) / self._fit(pts[0][0])
        if work >= pts[-1][0]:
            return pts[-1][1] * self._fit(work) / self._fit(pts[-1][0])
        for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
            if w0 <= work <= w1:
                f = math.log(work / w0) / math.log(w1 / w0)
                return math.exp(math.log(t0) + f * math.log(t1 / t0))
        raise AssertionError("unreachable")


def interpolation_points(points) -> tuple:
    """Measured (work, seconds) -> sorted ((work, mean seconds), ...), one per distinct work."""
    by = {}
    for w, t in points:
        by.setdefault(float(w), []).append(float(t))
    return tuple((w, sum(ts) / len(ts)) for w, ts in sorted(by.items()))


def attention_flops(op: str, B: int, Hq: int, Sq: int, Sk: int, D: int, causal: bool) -> float:
    """Dense-equivalent FLOPs, as perf/bench_block_attention.py counts them (so a fitted curve
    applies unchanged): forward 4*B*Hq*Sq*Sk*D, halved for a causal (diagonal) block; backward
    2.5 x forward."""
    f = 4.0 * B * Hq * Sq * Sk * D
    if causal:
        f /= 2
    return f if op == "fwd" else 2.5 * f


def fit_curve(points) -> tuple[Curve, float]:
    """Least squares in RELATIVE error of t = a + work * b over [(work, seconds), ...], a >= 0.
    Returns (curve, max relative error over the points)."""
    pts = [(float(w), float(t)) for w, t in points if t > 0]
    if not pts:
        raise ValueError("fit_curve: no points with a positive time")
    # minimise sum((a + w b - t)^2 / t^2): normal equations
    saa = sum(1 / t / t for _, t in pts)
    sab = sum(w / t / t for w, t in pts)
    sbb = sum(w * w / t / t for w, t in pts)
    sa = sum(1 / t for _, t in pts)
    sb = sum(w / t for w, t in pts)
    det = saa * sbb - sab * sab
    a = b = None
    if len({w for w, _ in pts}) >= 2 and det > 0:
        a = (sa * sbb - sb * sab) / det
        b = (saa * sb - sab * sa) / det
    if a is None or a < 0 or b <= 0:  # one size only, or a negative intercept: pure rate
        a, b = 0.0, sb / sbb
    curve = Curve(a, 1.0 / b)
    return curve, max(abs(curve.time(w) - t) / t for w, t in pts)


@dataclasses.dataclass(frozen=True)
class ComputeProfile:
    """How long one block attention and one memory-bound pass take on one device.

    attention: {(backend, op, causal): Curve} with op "fwd" | "bwd" (the backward given the
    final out/lse, without fp32 accumulators), work = attention_flops. memory: bytes -> time of
    one merge_attn_states_-like pass (also used for zero-fill, add, cast). aliases: {"auto":
    the backend auto resolves to}. bwd_accumulates: True if the measured backward already added
    into fp32 accumulators (the CPU calibration passes them; the H100 bench did not, so the
    model adds that pass). batched_tiles: a tiled piece (documents.tile_pieces) runs as one call
    with its tiles as batch rows (CUDA), else tile by tile (documents.TILE_MODE "auto" on CPU)."""

    name: str
    dtype: str
    attention: dict
    memory: Curve
    aliases: dict
    bwd_accumulates: bool = False
    source: str = ""
    batched_tiles: bool = True

    def backend(self, backend: str) -> str:
        b = self.aliases.get(backend, backend)
        if not any(k[0] == b for k in self.attention):
            raise ValueError(f"compute profile {self.name!r} has no measurements for backend {backend!r} "
                             f"(has {sorted({k[0] for k in self.attention})})")
        return b

    def attn_time(self, op: str, backend: str, *, B, Hq, Sq, Sk, D, causal: bool) -> float:
        if Sq <= 0 or Sk <= 0:
            return 0.0
        curve = self.attention[(self.backend(backend), op, bool(causal))]
        return curve.time(attention_flops(op, B, Hq, Sq, Sk, D, causal))

    def mem_time(self, nbytes: float) -> float:
        return self.memory.time(nbytes)

    def to_json(self) -> dict:
        return dict(name=self.name, dtype=self.dtype, source=self.source, bwd_accumulates=self.bwd_accumulates,
                    batched_tiles=self.batched_tiles,
                    aliases=dict(self.aliases),
                    memory=dict(overhead_s=self.memory.overhead_s, bytes_per_s=self.memory.rate,
                                points=[list(p) for p in self.memory.points]),
                    attention=[dict(backend=b, op=op, causal=c, overhead_s=cv.overhead_s, flops_per_s=cv.rate,
                                    points=[list(p) for p in cv.points])
                               for (b, op, c), cv in sorted(self.attention.items())])

    @staticmethod
    def from_json(d: dict) -> "ComputeProfile":
        pts = lambda x: tuple(tuple(p) for p in x.get("points", ()))  # noqa: E731
        att = {(a["backend"], a["op"], bool(a["causal"])): Curve(a["overhead_s"], a["flops_per_s"], pts(a))
               for a in d["attention"]}
        m = d["memory"]
        # (profiles written before tiling: a math-only profile is a CPU one, which runs tiles one by one)
        batched = d.get("batched_tiles", not all(a["backend"] == "math" for a in d["attention"]))
        return ComputeProfile(d["name"], d["dtype"], att, Curve(m["overhead_s"], m["bytes_per_s"], pts(m)),
                              dict(d.get("aliases", {})), bool(d.get("bwd_accumulates", False)), d.get("source", ""),
                              bool(batched))


def _c(a_us, tflops):
    return Curve(a_us * 1e-6, tflops * 1e12)


# The fit (fit_curve, pooled over Hkv 32 and 8) of perf/results/2026-11-22_h100_bench_block_attention.csv
# (NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, cuDNN 9.19, bf16, B=1, Hq=32, D=128, S=Sq=Sk in
# {4096, 16384}) and of the merge_attn_states_ rows of perf/results/2026-11-22_h100_bench_ops.csv.
# tests/test_cost_model.py re-fits the CSVs and asserts these constants (to 0.5%).
# Overheads in us, rates in TFLOP/s (attention) and TB/s (memory).
H100_BF16 = ComputeProfile(
    name="h100_bf16",
    dtype="bfloat16",
    attention={
        ("cudnn", "fwd", False): _c(31.35, 602.4), ("cudnn", "fwd", True): _c(99.7, 613.2),
        ("cudnn", "bwd", False): _c(236.9, 539.8), ("cudnn", "bwd", True): _c(324.4, 524.7),
        ("flash", "fwd", False): _c(35.73, 338.9), ("flash", "fwd", True): _c(170, 343.2),
        ("flash", "bwd", False): _c(326.1, 310.7), ("flash", "bwd", True): _c(458.5, 314.1),
        ("efficient", "fwd", False): _c(124.2, 179.2), ("efficient", "fwd", True): _c(224.1, 175.3),
        ("efficient", "bwd", False): _c(402.3, 138.8), ("efficient", "bwd", True): _c(738.5, 133.8),
    },
    memory=Curve(5.705e-06, 3.029e+12),
    aliases={"auto": "cudnn"},  # the CSV: auto picked cudnn for every case
    bwd_accumulates=False,
    source="fit to perf/results/2026-11-22_h100_bench_block_attention.csv (square S 4096/16384 only; other "
           "shapes extrapolated by FLOP count) and the merge_attn_states_ rows of 2026-11-22_h100_bench_ops.csv",
)


# --------------------------------------------------------------------------------------------
# Topology: which resources a message from src to dst crosses, their bandwidth, the latency

# ASSUMED spec-sheet link numbers (bytes/s per direction), not measured in this project:
NVLINK4_H100_SXM = 450e9   # NVIDIA H100 SXM5 datasheet: NVLink 4, 900 GB/s bidirectional per GPU
PCIE5_X16 = 63.0e9         # PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes, 128b/130b -> 63.0 GB/s per direction
NDR_IB_NIC = 50e9          # NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s (one NIC per GPU)
MI300X_IF_LINK = 64e9      # AMD Instinct MI300X datasheet: Infinity Fabric link 128 GB/s bidirectional
# ASSUMED latencies per message (s): no spec sheet states one and none was measured between GPUs
# here; the order of magnitude of one NCCL send/recv. perf/model.py answer --latency-scale shows
# how much the answer depends on them.
LAT_NVLINK = 5e-6
LAT_PCIE = 10e-6
LAT_IB = 10e-6


@dataclasses.dataclass(frozen=True)
class Topology:
    """kind: nvswitch | pcie | pcie_switch | ring | mesh | inter_node | local.

    link_bps: bandwidth of the kind's main link per direction (bytes/s); latency_s per message;
    nic_bps / nic_latency_s / gpus_per_node: inter_node only; bridge_bps: pcie's shared host
    bridge (all P2P traffic crosses it, both directions together); host_bps: local's shared
    host (loopback) capacity, both directions together (0: none); full_duplex: False makes
    each link one resource for both directions; ranks_per_device: ranks sharing one device's
    compute (compute times are multiplied by it; e.g. W processes on fewer CPU cores, or ranks
    sharing one GPU); device_slots: when > 0, ranks_per_device is max(1, W / device_slots)
    instead (ranks that many at a time run at full speed: the cores / threads per rank of a CPU,
    1 for ranks sharing one GPU); call_s: the per-call metadata all_gather (26 int64 per rank)
    that every forward starts with, -1: latency_s * ceil(log2 W) (an assumed tree of tiny
    messages)."""

    kind: str
    link_bps: float
    latency_s: float
    full_duplex: bool = True
    nic_bps: float = 0.0
    nic_latency_s: float = 0.0
    gpus_per_node: int = 8
    bridge_bps: float = 0.0
    host_bps: float = 0.0
    ranks_per_device: float = 1.0
    call_s: float = -1.0
    source: str = ""
    device_slots: float = 0.0

    def ranks_sharing(self, world: int) -> float:
        """Ranks sharing one device's compute at world size `world` (compute times are multiplied by it)."""
        return max(1.0, world / self.device_slots) if self.device_slots > 0 else self.ranks_per_device

    def _dir(self, name, a, b):
        # a full-duplex link is two resources (one per direction), a half-duplex one is one
        return (name, a, b) if self.full_duplex else (name, min(a, b), max(a, b))

    def route(self, src: int, dst: int, world: int) -> tuple:
        """Resources (hashable) that a message src -> dst crosses."""
        k = self.kind
        if k in ("nvswitch", "pcie_switch", "local"):
            res = (self._port("out", src), self._port("in", dst))
            return res + ((("host",),) if k == "local" and self.host_bps > 0 else ())
        if k == "pcie":
            return (self._port("out", src), self._port("in", dst), ("bridge",))
        if k == "mesh":
            return (self._dir("link", src, dst),)
        if k == "ring":
            fwd = (dst - src) % world
            step = 1 if fwd <= world - fwd else -1  # shortest way round (ties: forward)
            hops, a = [], src
            while a != dst:
                b = (a + step) % world
                hops.append(self._dir("ring", a, b))
                a = b
            return tuple(hops)
        if k == "inter_node":
            if src // self.gpus_per_node == dst // self.gpus_per_node:
                return (self._port("out", src), self._port("in", dst))
            return (("nic_out", src), ("nic_in", dst))
        raise ValueError(f"unknown topology kind {k!r}")

    def _port(self, d, r):
        return (d, r) if self.full_duplex else ("port", r)

    def capacity(self, resource) -> float:
        name = resource[0]
        if name in ("nic_out", "nic_in"):
            return self.nic_bps
        if name == "bridge":
            return self.bridge_bps
        if name == "host":
            return self.host_bps
        return self.link_bps

    def latency(self, src: int, dst: int, world: int) -> float:
        if self.kind == "inter_node" and src // self.gpus_per_node != dst // self.gpus_per_node:
            return self.nic_latency_s
        if self.kind == "ring":
            fwd = (dst - src) % world
            return self.latency_s * min(fwd, world - fwd)
        return self.latency_s

    def call_overhead(self, world: int) -> float:
        if world <= 1:
            return 0.0
        if self.call_s >= 0:
            return self.call_s
        lat = self.nic_latency_s if self.kind == "inter_node" and world > self.gpus_per_node else self.latency_s
        return lat * math.ceil(math.log2(world))

    def scaled(self, *, bandwidth: float = 1.0, latency: float = 1.0) -> "Topology":
        """Every bandwidth times `bandwidth`, every latency times `latency` (sensitivity runs)."""
        return dataclasses.replace(self, link_bps=self.link_bps * bandwidth, nic_bps=self.nic_bps * bandwidth,
                                   bridge_bps=self.bridge_bps * bandwidth, host_bps=self.host_bps * bandwidth,
                                   latency_s=self.latency_s * latency, nic_latency_s=self.nic_latency_s * latency,
                                   call_s=self.call_s * latency if self.call_s >= 0 else self.call_s)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Topology":
        return Topology(**d)


# The lent-H100 case: W ranks on ONE GPU (CudaIpcTransport under MPS). They share its compute
# (device_slots=1: compute times x W) and its memory bandwidth (every copy crosses the one HBM;
# CudaIpcTransport copies twice, perf/bench_ipc.py). ASSUMED until perf/bench_ipc.py's numbers are
# in perf/RESULTS.md: transfers at half the measured H100 D2D copy bandwidth (3005 GB/s read+write,
# perf/results/2026-11-22_h100_bench_ops.csv -> ~1500 GB/s of payload per copy, halved for the two
# copies) shared by all ranks; latency 12 us per message (the cross-process flag round trip
# measured under MPS, /work/shared/design.md).
_H100_COPY = 3004.5e9 / 2   # payload bytes/s of one D2D copy (the CSV counts read + write)


PRESETS = {
    "nvswitch": Topology("nvswitch", NVLINK4_H100_SXM, LAT_NVLINK,
                         source="ASSUMED: H100 SXM NVLink 4 via NVSwitch, 450 GB/s per direction per GPU "
                                "(datasheet), every pair, full duplex; latency 5 us assumed"),
    "pcie": Topology("pcie", PCIE5_X16, LAT_PCIE, bridge_bps=PCIE5_X16,
                     source="ASSUMED: PCIe 5.0 x16 per GPU (63 GB/s per direction, spec) and ONE shared host "
                            "bridge forwarding all P2P traffic at one x16 link's rate (worst case); latency "
                            "10 us assumed"),
    "pcie_switch": Topology("pcie_switch", PCIE5_X16, LAT_PCIE,
                            source="ASSUMED: PCIe 5.0 x16 per GPU behind a non-blocking switch; latency 10 us assumed"),
    "ring": Topology("ring", MI300X_IF_LINK, LAT_NVLINK,
                     source="ASSUMED, illustrative: a physical ring of 64 GB/s-per-direction links (MI300X IF "
                            "link figure); messages take the shortest way round; 5 us per hop assumed"),
    "mesh": Topology("mesh", MI300X_IF_LINK, LAT_NVLINK,
                     source="ASSUMED: full mesh, one 64 GB/s-per-direction link per pair (MI300X datasheet: "
                            "Infinity Fabric 128 GB/s bidirectional per link); latency 5 us assumed"),
    "inter_node": Topology("inter_node", NVLINK4_H100_SXM, LAT_NVLINK, nic_bps=NDR_IB_NIC, nic_latency_s=LAT_IB,
                           gpus_per_node=8,
                           source="ASSUMED: nodes of 8 H100 SXM on NVSwitch (450 GB/s per direction), one "
                                  "400 Gb/s NDR NIC per GPU between nodes (50 GB/s per direction, DGX H100 "
                                  "datasheet), non-blocking fabric; latency 5 us (NVLink) / 10 us (IB) assumed"),
    "shared_gpu": Topology("local", _H100_COPY / 2, 12e-6, host_bps=_H100_COPY / 2, device_slots=1.0,
                           source="ASSUMED: W ranks sharing ONE H100 over CudaIpcTransport (MPS): compute "
                                  "shared W ways, every message copied twice through its HBM (half the "
                                  "measured D2D copy rate, shared by all ranks); 12 us per message"),
}


def get_topology(topology) -> Topology:
    if isinstance(topology, Topology):
        return topology
    if topology not in PRESETS:
        raise ValueError(f"unknown topology {topology!r}: choose one of {sorted(PRESETS)} or pass a Topology")
    return PRESETS[topology]


# --------------------------------------------------------------------------------------------
# Rank programs: the code's schedules as lists of ops


@dataclasses.dataclass
class _Op:
    kind: str            # "compute" | "delay" | "post" | "wait"
    step: tuple          # (pass, step)
    seconds: float = 0.0
    what: str = ""
    channel: str = ""
    msgs: tuple = ()     # post: ((key, "send"|"recv", peer, nbytes), ...)


class _Msg:
    __slots__ = ("key", "src", "dst", "nbytes", "phase", "channel", "posted", "end", "xfer")

    def __init__(self, key, src, dst, nbytes, phase, channel):
        self.key, self.src, self.dst, self.nbytes, self.phase, self.channel = key, src, dst, nbytes, phase, channel
        self.posted = {}   # side -> time
        self.end = None
        self.xfer = 0.0


@dataclasses.dataclass(frozen=True)
class _Shape:
    lay: SequenceLayout
    causal: bool
    B: int
    Hq: int
    Hkv: int
    D: int
    e: int
    plan: RingPlan = dataclasses.field(default=None, compare=False)  # the blocks (and pieces) of the mask

    def block(self, q_owner: int, kv_owner: int):
        """The code's block of this pair (RingPlan.block: layout.attention_block, trimmed and cut
        into pieces for packed documents and sliding windows), or None."""
        return self.plan.block(q_owner, kv_owner)


class _Builder:
    """Collects one rank's ops; compute times come from the profile (times ranks_per_device)."""

    def __init__(self, rank: int, shape: _Shape, profile: ComputeProfile, backend: str, share: float, msgs: dict):
        self.r, self.sh, self.prof, self.backend, self.share = rank, shape, profile, backend, share
        self.ops: list[_Op] = []
        self.msgs = msgs
        self.blocks: dict = {}   # (pass, step) -> [(op, Sq, Sk, causal)]

    def attn(self, op, step, Sq, Sk, causal, B=None):
        sh = self.sh
        B = sh.B if B is None else B
        t = self.prof.attn_time(op, self.backend, B=B, Hq=sh.Hq, Sq=Sq, Sk=Sk, D=sh.D, causal=causal)
        self.blocks.setdefault(step, []).append((op, Sq, Sk, bool(causal)) + ((B,) if B != sh.B else ()))
        self.ops.append(_Op("compute", step, t * self.share, f"attn {op} {Sq}x{Sk}{' causal' if causal else ''}"))

    def block(self, op, step, blk):
        """Block `blk` (layout.Block) forward or backward (with its fp32 accumulate), as
        documents.block_forward / block_backward run it: one block attention; or, for a block cut
        into pieces (packed documents, sliding windows), one per piece plus the passes around them
        -- the zero-filled fp32 out / -inf lse and its cast (forward), a merge per piece, for an
        anti-causal piece the reversed copies in and out, for a tiled piece (documents.tile_pieces:
        T tiles run as T times the batch rows) its reshape copies (batch > 1) and lse reorder, and
        backward the fp32 scratch of either added back. Each call pays the profile's intercept."""
        from ringattn.documents import _per_tile, _whole

        sh = self.sh
        ps = blk.pieces
        if not ps or (len(ps) == 1 and _whole(blk, ps[0])):
            self.attn(op, step, blk.q_len, blk.kv_len, ps[0].causal if ps else blk.causal)
            if op == "bwd":
                _bwd_accumulate(self, step, blk.q_len, blk.kv_len)
            return
        if not self.prof.batched_tiles and any(p.tiles > 1 for p in ps):
            ps = _per_tile(ps)
        q_row, kv_row, e = sh.Hq * sh.D, sh.Hkv * sh.D, sh.e  # elements of one token's q / k
        if op == "fwd":
            self.mem(step, sh.B * blk.q_len * sh.Hq * (sh.D + 1) * 4, "zero fp32 out, -inf lse (pieced block)")
        for p in ps:
            B, T = p.nb or sh.B, p.tiles
            qn, kn = p.q_len * T, p.kv_len * T     # the rows the piece spans
            copied = p.flip or (T > 1 and B > 1)   # inputs reversed, or tiles reshaped into new batch rows
            seq_in = (1 if op == "fwd" else 3) * qn * q_row * e + 2 * kn * kv_row * e  # q (dout, out), k, v
            nb = 2 * B * seq_in if copied else 0
            if p.flip and op == "fwd":
                nb += 2 * B * qn * q_row * e       # out reversed back
            scratch = op == "bwd" and (p.flip or (T > 1 and B > 1))  # batch 1: tiles are views of the sums
            if p.flip or T > 1:
                nb += 2 * B * qn * sh.Hq * 4       # lse reversed / reordered
            if scratch:
                nb += B * (qn * q_row + 2 * kn * kv_row) * 4  # zero the fp32 scratch
            self.mem(step, nb, "reverse / tile a piece")
            self.attn(op, step, p.q_len, p.kv_len, True if p.flip else p.causal, B * T)
            if op == "fwd":
                self.mem(step, _merge_bytes(sh, qn, B), "merge a piece")
            else:
                _bwd_accumulate(self, step, p.q_len, p.kv_len, B * T)
                if scratch:
                    self.mem(step, B * (qn * q_row + 2 * kn * kv_row) * 12, "add the scratch back")
        if op == "fwd":
            self.mem(step, sh.B * blk.q_len * q_row * (4 + e), "cast the pieced block's out")

    def mem(self, step, nbytes, what):
        if nbytes > 0:
            self.ops.append(_Op("compute", step, self.prof.mem_time(nbytes) * self.share, what))

    def post(self, step, phase, channel, sends, recvs):
        """sends/recvs: [(peer, [nbytes of each tensor])]; message keys pair the two ends."""
        msgs = []
        for side, lst in (("send", sends), ("recv", recvs)):
            for peer, sizes in lst:
                src, dst = (self.r, peer) if side == "send" else (peer, self.r)
                for part, nb in enumerate(sizes):
                    key = (step[0], channel, step[1], src, dst, part)
                    m = self.msgs.get(key)
                    if m is None:
                        m = self.msgs[key] = _Msg(key, src, dst, nb, (step[0], phase), channel)
                    elif m.nbytes != nb:
                        raise AssertionError(f"cost model schedule bug: {key} is {m.nbytes} B at one end, {nb} at the other")
                    msgs.append((key, side, peer, nb))
        self.ops.append(_Op("post", step, channel=channel, msgs=tuple(msgs)))

    def delay(self, step, seconds, what):
        """Time the stream stands still that is not compute (the metadata all_gather)."""
        if seconds > 0:
            self.ops.append(_Op("delay", step, seconds, what))

    def wait(self, step, channel):
        self.ops.append(_Op("wait", step, channel=channel))


def _merge_bytes(sh: _Shape, rows: int, B: int | None = None) -> int:
    # merge_attn_states_ (as perf/bench_ops.py counts it): fp32 acc out read+write, partial out
    # read (q dtype), fp32 acc lse read+write, fp32 partial lse read
    return (sh.B if B is None else B) * rows * sh.Hq * (sh.D * (8 + sh.e) + 12)


def _ring_fwd(b: _Builder, at: int = 0):
    """KV rotation's forward; its steps are numbered from `at` (Ulysses runs it at world 1 as its step 1)."""
    sh, r = b.sh, b.r
    lay, W = sh.lay, sh.lay.world_size
    n = lay.local_lengths
    S = sh.plan.ring_steps  # KV rotation runs steps 0..S (the early stop of windows / documents)
    d = sh.plan.direction   # K/V go to r + d
    kv_tok = sh.B * sh.Hkv * sh.D * sh.e  # bytes of k (or v) per token
    for s in range(S + 1):
        st = ("fwd", at + s)
        j = (r - d * s) % W
        if s < S:
            _post_kv(b, st, s, "fwd.kv", j, kv_tok)
        blk = sh.block(r, j)
        if blk is not None:
            b.block("fwd", st, blk)
            if s == 0:
                b.mem(st, sh.B * n[r] * sh.Hq * sh.D * (sh.e + 4), "init fp32 accumulator")
            else:
                b.mem(st, _merge_bytes(sh, blk.q_len), "merge")
        if s < S:
            b.wait(st, "fwd.kv")
    b.mem(("fwd", at + S), sh.B * n[r] * sh.Hq * sh.D * (4 + sh.e), "cast out")


def _post_kv(b: _Builder, st, s: int, channel: str, j: int, kv_tok: int):
    """Step s of KV rotation: send block j's rows that hop s+1 carries (RingPlan.kv_hops; a copy
    when they are a strict part of what we hold and batch > 1), receive block r-s-1's."""
    sh, r, W = b.sh, b.r, b.sh.lay.world_size
    H, d = sh.plan.kv_hops, sh.plan.direction
    held = sh.lay.local_len(r) if s == 0 else H[j][s - 1][1]
    out, inn = H[j][s][1], H[(r - d * (s + 1)) % W][s][1]
    if sh.B > 1 and 0 < out < held:
        b.mem(st, 2 * kv_tok * out * 2, "contiguous copy of the travelling K/V rows")
    b.post(st, s, channel, [((r + d) % W, [kv_tok * out] * 2)] if out else [],
           [((r - d) % W, [kv_tok * inn] * 2)] if inn else [])


def _bwd_accumulate(b: _Builder, st, q_rows, kv_rows, B=None):
    """The fp32 accumulate of one block backward, when the profile's backward did not include it."""
    if not b.prof.bwd_accumulates:
        sh = b.sh
        B = sh.B if B is None else B
        b.mem(st, B * sh.D * (8 + sh.e) * (q_rows * sh.Hq + 2 * kv_rows * sh.Hkv), "accumulate dq/dk/dv")


def _ring_bwd(b: _Builder, at: int = 0):
    """KV rotation's backward; steps numbered from `at`, as in _ring_fwd."""
    sh, r = b.sh, b.r
    lay, W = sh.lay, sh.lay.world_size
    n = lay.local_lengths
    kv_tok = sh.B * sh.Hkv * sh.D * sh.e
    dkv_tok = sh.B * sh.Hkv * sh.D * 4
    q_el = sh.B * n[r] * sh.Hq * sh.D
    d = sh.plan.direction  # K/V and the dK/dV sums go to r + d
    nxt, prv = (r + d) % W, (r - d) % W
    S = sh.plan.ring_steps
    b.mem(("bwd", at), q_el * 4, "zero dq")
    if S == 0:  # a world of one, or no rank needs another's K/V: local only
        st = ("bwd", at)
        b.mem(st, 2 * 4 * n[r] * sh.B * sh.Hkv * sh.D, "zero dk/dv")
        b.block("bwd", st, sh.block(r, r))
        b.mem(st, (q_el + 2 * sh.B * n[r] * sh.Hkv * sh.D) * (4 + sh.e), "cast dq/dk/dv")
        return
    m = [rows for _, rows in sh.plan.kv_ranges]  # the travelling rows of each rank's K/V and dK/dV sums
    keep = m[r] != n[r]  # our other rows' dK/dV stay home (ring_attention.ring_backward)
    kv_el = sh.B * sh.Hkv * sh.D
    for s in range(S + 1):
        st = ("bwd", at + s)
        j = (r - d * s) % W
        if s < S:
            _post_kv(b, st, s, "bwd.kv", j, kv_tok)
        blk = sh.block(r, j)
        if s == 0:
            b.mem(st, 2 * 4 * n[j] * kv_el, "zero dk/dv sums" if not keep else "zero dk/dv home")
            b.block("bwd", st, blk)
            if keep:
                b.mem(st, 2 * 8 * m[r] * kv_el, "copy the travelling rows' dk/dv into the sums")
        else:
            if blk is not None:
                b.mem(st, 2 * 4 * blk.kv_len * kv_el, "zero dk/dv scratch")
                b.block("bwd", st, blk)
            b.wait(st, "bwd.dkv")
            if blk is not None:
                b.mem(st, 2 * 12 * blk.kv_len * kv_el, "add scratch into dk/dv sums")
        # the sums posted now are in flight during the next step's compute: phase s + 1. After step
        # S they go straight home to j (S = W - 1: the next rank, the ring's last hop).
        to, frm = (nxt, prv) if s < S else (j, (r + d * S) % W)
        m_in = m[(r - d * (s + 1)) % W] if s < S else m[r]
        b.post(st, s + 1, "bwd.dkv", [(to, [dkv_tok * m[j]] * 2)] if m[j] else [],
               [(frm, [dkv_tok * m_in] * 2)] if m_in else [])
        if s < S:
            b.wait(st, "bwd.kv")
    st = ("bwd", at + S)
    b.wait(st, "bwd.dkv")
    if keep:
        b.mem(st, 2 * 8 * m[r] * kv_el, "sums home into dk/dv")
    b.mem(st, (q_el + 2 * sh.B * n[r] * sh.Hkv * sh.D) * (4 + sh.e), "cast dq/dk/dv")


def _token_ring_pass(b: _Builder, op: str):
    """TokenRing forward (op "fwd") or backward ("bwd"), as token_ring.py runs them."""
    sh, r = b.sh, b.r
    lay, W = sh.lay, sh.lay.world_size
    n = lay.local_lengths
    B, Hq, Hkv, D, e = sh.B, sh.Hq, sh.Hkv, sh.D, sh.e
    q_el = B * n[r] * Hq * D
    qch, rch = ("fwd.q", "fwd.partial") if op == "fwd" else ("bwd.q", "bwd.dq")
    st0 = (op, 0)
    if op == "bwd":
        b.mem(st0, q_el * 4 + 2 * 4 * B * n[r] * Hkv * D, "zero dq/dk/dv")
    diag = sh.block(r, r)
    cast = q_el * (4 + e) if op == "fwd" else (q_el + 2 * B * n[r] * Hkv * D) * (4 + e)

    def diagonal_block():
        b.block(op, st0, diag)
        if op == "fwd":
            b.mem(st0, q_el * (e + 4), "init fp32 accumulator")

    if W == 1:
        diagonal_block()
        b.mem(st0, cast, "cast")
        return
    if op == "bwd":
        b.mem(st0, q_el * (2 * e + 24), "delta = rowsum(dout * out)")

    # what one Q row costs on the wire: fwd q; bwd q, dout (q dtype) + lse, delta (fp32 per head)
    def q_sizes(rows):
        if op == "fwd":
            return [B * rows * Hq * D * e]
        return [B * rows * Hq * D * e] * 2 + [B * Hq * rows * 4] * 2

    def reply_sizes(rows):
        if op == "fwd":
            return [B * rows * Hq * D * e, B * Hq * rows * 4]  # out (q dtype), lse fp32
        return [B * rows * Hq * D * 4]                          # fp32 dq partial

    copied = set()

    def post_q(s, st, phase):
        dst, src = (r + s) % W, (r - s) % W
        send_blk, recv_blk = sh.block(r, dst), sh.block(src, r)
        if send_blk is not None and send_blk.q_len != n[r] and (send_blk.q_start, send_blk.q_len) not in copied:
            copied.add((send_blk.q_start, send_blk.q_len))  # _Payload.rows: one contiguous copy per call
            b.mem(st, sum(q_sizes(send_blk.q_len)) * 2, "contiguous copy of the late-chunk payload")
        b.post(st, phase, qch, [(dst, q_sizes(send_blk.q_len))] if send_blk else [],
               [(src, q_sizes(recv_blk.q_len))] if recv_blk else [])
        return recv_blk

    nxt_blk = post_q(1, st0, 0)  # posted before the diagonal block, which hides that transfer
    diagonal_block()
    pending = None
    for s in range(1, W):
        st = (op, s)
        dst, src = (r + s) % W, (r - s) % W
        b.wait(st, qch)
        blk = nxt_blk
        if s + 1 < W:
            nxt_blk = post_q(s + 1, st, s)
        if blk is not None:
            if op == "bwd":
                b.mem(st, B * blk.q_len * Hq * D * 4, "zero dq partial")
                b.mem(st, B * blk.q_len * Hq * D * (e + 28), "out' = dout * delta / |dout|^2")
            b.block(op, st, blk)
        b.wait(st, rch)
        if pending is not None:
            b.mem(st, _merge_bytes(sh, pending) if op == "fwd" else B * pending * Hq * D * 12,
                  "merge partial" if op == "fwd" else "add dq partial")
            pending = None
        own = sh.block(r, dst)
        # posted after this step's compute: in flight during the next step (phase s + 1)
        b.post(st, s + 1, rch, [(src, reply_sizes(blk.q_len))] if blk else [],
               [(dst, reply_sizes(own.q_len))] if own else [])
        if own is not None:
            pending = own.q_len
    st = (op, W - 1)
    b.wait(st, rch)
    if pending is not None:
        b.mem(st, _merge_bytes(sh, pending) if op == "fwd" else B * pending * Hq * D * 12,
              "merge partial" if op == "fwd" else "add dq partial")
    b.mem(st, cast, "cast")


def _heads_shape(b: _Builder) -> tuple:
    """(world-1 shape of this rank's head block over the whole sequence, its KV heads of every rank)."""
    from ringattn.ulysses import head_blocks

    sh, W = b.sh, b.sh.lay.world_size
    hb = head_blocks(sh.Hq, sh.Hkv, W)
    kv = [d - c for _, _, c, d in hb]
    lay1 = SequenceLayout.build(sh.lay.seq_len, 1, "contiguous")
    plan1 = _plan(lay1, sh.causal, sh.plan.documents, sh.plan.window)
    return dataclasses.replace(sh, lay=lay1, Hq=sh.Hq // W, Hkv=kv[b.r], plan=plan1), kv


def _single_rank(b: _Builder, sh1: _Shape, program, op: str) -> None:
    """Run a ring program at world 1 (ulysses' attention of its head block) as step 1 of `op`."""
    sh, r = b.sh, b.r
    b.sh, b.r = sh1, 0
    try:
        program(b, at=1)
    finally:
        b.sh, b.r = sh, r


def _ulysses_pass(b: _Builder, op: str):
    """Ulysses forward ("fwd") or backward ("bwd"), as ulysses.py runs them: step 0 the all-to-all
    to head shards (the other ranks' head pieces copied contiguous, one batch of W-1 sends and
    receives, one concatenation of every rank's chunks in token order), step 1 the world-1 ring
    program over the whole sequence for this rank's heads, step 2 the all-to-all back (each
    rank's rows: zigzag's two chunks concatenated, strided ones copied; the batch; one
    concatenation of the received head blocks, or shared KV heads' fp32 dK/dV summed and cast).
    Nothing overlaps: every batch is waited for before the next op."""
    sh, r = b.sh, b.r
    W, n = sh.lay.world_size, sh.lay.local_lengths
    L, B, D, e, Hq = sh.lay.seq_len, sh.B, sh.D, sh.e, sh.Hq
    sh1, kv = _heads_shape(b)
    hq = Hq // W
    zig = sh.lay.layout == "zigzag"
    shared = op == "bwd" and sh.Hkv < W  # W/Hkv ranks share a KV head: fp32 dK/dV on the wire, summed
    kv_e = 4 if shared else e
    peers = [j for j in range(W) if j != r]
    row = B * D  # elements of one token of one head
    # step 0: seq -> heads. fwd: q, k, v (hq, kv_j, kv_j heads of my n_r tokens to rank j); bwd: dout.
    st = (op, 0)
    ch_in, ch_out = ("fwd.a2a", "fwd.out") if op == "fwd" else ("bwd.dout", "bwd.dqkv")
    heads_in = (lambda j: [hq, kv[j], kv[j]]) if op == "fwd" else (lambda j: [hq])
    if W > 1:  # head slices of (B, n, H, D) are strided: one contiguous copy for each other rank
        b.mem(st, 2 * row * e * n[r] * sum(sum(heads_in(j)) for j in peers), "head pieces, contiguous")
    b.post(st, 0, ch_in, [(j, [row * e * n[r] * h for h in heads_in(j)]) for j in peers],
           [(j, [row * e * n[j] * h for h in heads_in(r)]) for j in peers])
    b.wait(st, ch_in)
    mine = row * e * L * sum(heads_in(r))          # the head-layout tensors over the whole sequence
    b.mem(st, 2 * mine, "one concatenation of every rank's chunks in token order")
    # step 1: the world-1 attention of my head block
    _single_rank(b, sh1, _ring_fwd if op == "fwd" else _ring_bwd, op)
    # step 2: heads -> seq. fwd: out (q dtype) and lse (fp32); bwd: dq (q dtype), dk, dv (kv_e)
    st = (op, 2)
    # per tensor: (heads of rank j's block, element size, is an lse)
    if op == "fwd":
        outs = [(lambda j: hq, e, False), (lambda j: hq, 4, True)]                 # out, lse
    else:
        outs = [(lambda j: hq, e, False), (lambda j: kv[j], kv_e, False), (lambda j: kv[j], kv_e, False)]
    per = lambda h, size, lse, j: (B * h(j) if lse else row * h(j)) * size  # noqa: E731  one token of j's block
    nb = 0
    for h, size, lse in outs:  # rank j's rows: zigzag, two chunks concatenated; else a view, copied
        strided = B * h(r) > 1 if lse else B > 1  # to be sent when strided (my own rows never travel)
        nb += sum(2 * per(h, size, lse, r) * n[j] for j in range(W) if zig or (strided and j != r))
    b.mem(st, nb, "token pieces, contiguous")
    b.post(st, 2, ch_out, [(j, [per(*t, r) * n[j] for t in outs]) for j in peers],
           [(j, [per(*t, j) * n[r] for t in outs]) for j in peers])
    b.wait(st, ch_out)
    for i, t in enumerate(outs):  # disjoint head blocks: one concatenation; shared KV heads: zero-fill + fp32 adds
        got = sum(per(*t, j) for j in range(W)) * n[r]
        b.mem(st, (3 if shared and i > 0 else 2) * got, "assemble the head blocks")
    if shared:
        b.mem(st, 2 * row * sh.Hkv * n[r] * (4 + e), "cast the summed fp32 dk/dv")


_PROGRAMS: dict[tuple[str, str], Callable] = {
    ("ring", "fwd"): _ring_fwd, ("ring", "bwd"): _ring_bwd,
    ("token_ring", "fwd"): lambda b: _token_ring_pass(b, "fwd"),
    ("token_ring", "bwd"): lambda b: _token_ring_pass(b, "bwd"),
    ("ulysses", "fwd"): lambda b: _ulysses_pass(b, "fwd"),
    ("ulysses", "bwd"): lambda b: _ulysses_pass(b, "bwd"),
}


# --------------------------------------------------------------------------------------------
# Simulation


@dataclasses.dataclass(frozen=True)
class StepTime:
    """One step of one rank: its compute, the time its stream stood waiting, when it ended."""

    pass_: str         # "fwd" | "bwd"
    step: int
    compute_s: float
    wait_s: float
    end_s: float
    blocks: tuple      # ((op, Sq, Sk, causal), ...) block attentions computed in this step


@dataclasses.dataclass(frozen=True)
class Prediction:
    algorithm: str
    world_size: int
    seq_len: int
    passes: str                  # "fwd" | "fwd_bwd"
    total_s: float               # the last rank's finish time
    rank_total_s: tuple          # each rank's finish time
    rank_compute_s: tuple        # each rank's busy time (attention + memory passes)
    exposed_comm_s: float        # total_s - the critical rank's compute: what overlap did not hide
    critical_rank: int
    steps: tuple                 # StepTime of the critical rank
    rank_steps: tuple            # StepTime tuples of every rank
    bytes: tuple                 # per rank {channel: (sent, received)} -- equals predict_comm_bytes
    comm_s: float                # the critical rank's summed message time (latency + transfer), overlapped or not
    topology: str
    profile: str

    @property
    def compute_s(self) -> float:
        return self.rank_compute_s[self.critical_rank]


def _transfer_times(msgs: dict, topo: Topology, world: int) -> None:
    """Bottleneck sharing per phase: a message's transfer time is max over its resources of
    (bytes of that phase on the resource) / capacity. Stores it on the message as .xfer."""
    load: dict = {}
    routes = {}
    for m in msgs.values():
        rt = routes[m.key] = topo.route(m.src, m.dst, world)
        for res in rt:
            k = (m.phase, res)
            load[k] = load.get(k, 0) + m.nbytes
    for m in msgs.values():
        t = 0.0
        for res in routes[m.key]:
            cap = topo.capacity(res)
            if math.isinf(cap):
                continue
            t = max(t, load[(m.phase, res)] / cap)
        m.xfer = t + topo.latency(m.src, m.dst, world)


def _simulate(programs, msgs, W):
    t = [0.0] * W
    busy = [0.0] * W
    pc = [0] * W
    pending = [dict() for _ in range(W)]          # channel -> [msg keys]
    steps = [dict() for _ in range(W)]            # (pass, step) -> [compute, wait, end]
    comm = [0.0] * W
    done = 0
    while done < W:
        progressed = False
        for r in range(W):
            ops = programs[r].ops
            while pc[r] < len(ops):
                op = ops[pc[r]]
                rec = steps[r].setdefault(op.step, [0.0, 0.0, 0.0])
                if op.kind == "compute":
                    t[r] += op.seconds
                    busy[r] += op.seconds
                    rec[0] += op.seconds
                elif op.kind == "delay":
                    t[r] += op.seconds
                    rec[1] += op.seconds
                elif op.kind == "post":
                    keys = []
                    for key, side, _, _ in op.msgs:
                        m = msgs[key]
                        m.posted[side] = t[r]
                        if len(m.posted) == 2:
                            m.end = max(m.posted.values()) + m.xfer
                        keys.append(key)
                    pending[r][op.channel] = keys
                else:  # wait: every message of the channel's batch (both ends must have posted)
                    keys = pending[r].pop(op.channel, [])
                    ends = [msgs[k].end for k in keys]
                    if any(x is None for x in ends):
                        pending[r][op.channel] = keys
                        break
                    mine = [msgs[k] for k in keys]
                    comm[r] += max((m.xfer for m in mine), default=0.0)
                    until = max(ends, default=t[r])
                    if until > t[r]:
                        rec[1] += until - t[r]
                        t[r] = until
                rec[2] = t[r]
                pc[r] += 1
                progressed = True
                if pc[r] == len(ops):
                    done += 1
        if not progressed and done < W:
            raise AssertionError("cost model: the simulated schedule deadlocked (a schedule bug)")
    return t, busy, steps, comm


@functools.lru_cache(maxsize=16)
def _plan(lay: SequenceLayout, causal: bool, documents, window) -> RingPlan:
    """A RingPlan for the blocks only (RingPlan.block does not depend on the rank); cached, so
    predicting both algorithms, or forward and backward, cuts the blocks once."""
    from ringattn.layout import _mask_plan

    return _mask_plan(lay, causal, documents, window)


def _elem(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:
        raise ValueError(f"dtype must be a torch.dtype or an element size in bytes, got {dtype!r}")
    return int(itemsize)


def predict(algorithm: str, *, seq_len: int, world_size: int, layout: str = "contiguous", causal: bool = False,
            batch: int = 1, heads_q: int, heads_kv: int, head_dim: int, dtype=2, backward: bool = True,
            topology="nvswitch", profile: ComputeProfile | None = None, backend: str = "auto",
            cu_seqlens=None, sliding_window=None) -> Prediction:
    """Predicted time of one call (forward, plus backward when `backward`) on every rank.

    dtype: of q/k/v (a torch.dtype or its element size; default 2 = bf16). topology: a preset
    name (PRESETS) or a Topology. profile: ComputeProfile (default H100_BF16). cu_seqlens /
    sliding_window: the call's packed documents / causal sliding window, as
    sequence_parallel_attention takes them: the blocks are then the code's trimmed, pieced ones,
    KV rotation stops after RingPlan.ring_steps, TokenRing skips the pairs the mask never joins."""
    if algorithm not in MODELED:
        raise ValueError(f"algorithm must be one of {MODELED}, got {algorithm!r}")
    from ringattn.sequence_parallel import _documents_arg, _window_arg  # (it imports this module lazily too)
    from ringattn.ulysses import heads_problem

    if algorithm == "ulysses" and (problem := heads_problem(heads_q, heads_kv, world_size)):
        raise ValueError(problem)

    topo = get_topology(topology)
    prof = profile or H100_BF16
    lay = SequenceLayout.build(seq_len, world_size, layout)
    docs = _documents_arg(cu_seqlens, seq_len, batch)
    window = _window_arg(sliding_window, causal, seq_len)
    plan = _plan(lay, bool(causal), docs, window)
    sh = _Shape(lay, bool(causal), batch, heads_q, heads_kv, head_dim, _elem(dtype), plan)
    msgs: dict = {}
    passes = ("fwd", "bwd") if backward else ("fwd",)
    programs = []
    for r in range(world_size):
        bld = _Builder(r, sh, prof, backend, topo.ranks_sharing(world_size), msgs)
        bld.delay(("fwd", 0), topo.call_overhead(world_size), "metadata all_gather")
        for p in passes:
            _PROGRAMS[(algorithm, p)](bld)
        programs.append(bld)
    _transfer_times(msgs, topo, world_size)
    t, busy, steps, comm = _simulate(programs, msgs, world_size)
    per_rank_bytes = [dict() for _ in range(world_size)]
    for m in msgs.values():
        for rank, i in ((m.src, 0), (m.dst, 1)):
            cur = list(per_rank_bytes[rank].get(m.channel, (0, 0)))
            cur[i] += m.nbytes
            per_rank_bytes[rank][m.channel] = tuple(cur)
    rank_steps = tuple(
        tuple(StepTime(k[0], k[1], v[0], v[1], v[2], tuple(programs[r].blocks.get(k, ())))
              for k, v in steps[r].items())
        for r in range(world_size))
    crit = max(range(world_size), key=lambda r: t[r])
    return Prediction(algorithm, world_size, seq_len, "fwd_bwd" if backward else "fwd", t[crit], tuple(t),
                      tuple(busy), t[crit] - busy[crit], crit, rank_steps[crit], rank_steps,
                      tuple(per_rank_bytes), comm[crit], topo.kind, prof.name)


def compare(algorithms=MODELED, **kw) -> dict:
    """{"ring": Prediction, "token_ring": Prediction[, "ulysses": Prediction]} for the same
    arguments as predict: each of `algorithms` (default all), Ulysses only where the world size
    splits the heads (ulysses.heads_problem)."""
    from ringattn.ulysses import heads_problem

    if heads_problem(kw["heads_q"], kw["heads_kv"], kw["world_size"]):
        algorithms = tuple(a for a in algorithms if a != "ulysses")
    return {alg: predict(alg, **kw) for alg in algorithms}


# choose_algorithm's use of the model. The simulation is O(W^2) Python operations (15 ms at W = 8,
# 0.3 s at 32, 6 s at 128 on one CPU core), once per distinct argument set: above AUTO_MAX_WORLD
# auto does not run it. And it predicts at L rounded to a quarter octave (auto_seq_len): the
# predicted gap changes slowly with L, and this bounds the cache when lengths vary per call.
AUTO_MAX_WORLD = 64
# Packed documents change with every batch, so each new packing is a new simulation: only up to
# this world size (~25 ms at 16, 0.1 s at 32, 0.5 s at 64 on one CPU core, measured 2026-12-03).
AUTO_MAX_WORLD_DOCUMENTS = 16


def auto_seq_len(seq_len: int, world_size: int, layout: str) -> int:
    """seq_len rounded to the nearest 2^(k/4) (at least one token per chunk of the layout)."""
    q = round(2 ** (round(4 * math.log2(max(seq_len, 1))) / 4))
    return max(q, world_size if layout == "contiguous" else 2 * world_size)


@functools.lru_cache(maxsize=4096)
def predicted_times(seq_len: int, world_size: int, layout: str, causal: bool, batch: int, heads_q: int,
                    heads_kv: int, head_dim: int, elem_size: int, backward: bool, topology,
                    window: int | None = None, documents: tuple | None = None, hardware=None,
                    backend: str = "auto") -> dict:
    """{algorithm: predicted seconds} for ring, token_ring and (where the world size splits the
    heads) ulysses; cached (choose_algorithm calls it on every call). window / documents: the
    sliding window / packed documents (normalised, as sequence_parallel._window_arg /
    _documents_arg give them). hardware: a ringattn.hardware.Hardware (hashed by its
    fingerprint) whose compute profile is used (None: H100_BF16); `topology` is passed apart.
    backend: the profile's curve the blocks are timed with (predict's backend)."""
    kw = dict(seq_len=seq_len, world_size=world_size, layout=layout, causal=causal, batch=batch, heads_q=heads_q,
              heads_kv=heads_kv, head_dim=head_dim, dtype=elem_size, backward=backward, topology=topology,
              cu_seqlens=documents, sliding_window=window, profile=hardware.profile if hardware else None,
              backend=backend)
    return {alg: p.total_s for alg, p in compare(**kw).items()}


# packed documents: a cache of its own (every batch brings new boundaries; one forward's layers ask the same)
predicted_times_packed = functools.lru_cache(maxsize=8)(predicted_times.__wrapped__)
