"""Peer libraries on the sweep's shapes: ring-flash-attn, yunchang (USP), DeepSpeed-Ulysses, PyTorch's ring.

perf/sweep.py runs these next to ringattn (--algorithms ...,rfa,usp,ds_ulysses,torch_ring) in the
same worker processes, on the same inputs, checked against the same float64 reference:

  rfa          ring-flash-attn 0.1.8 (PyPI `ring-flash-attn`): zigzag_ring_flash_attn_func for the
               zigzag layout (causal only: it asserts causal), ring_flash_attn_func for contiguous.
  usp          yunchang 0.6.4 (PyPI `yunchang`) LongContextAttention: Ulysses all-to-all over U
               consecutive ranks x its ring ("zigzag" impl for zigzag, "basic" for contiguous) over
               R = W/U strided ranks (set_seq_parallel_pg, use_ulysses_low). U = the largest divisor
               of W dividing both head counts (--usp-ulysses fixes it). Its token layout is the
               ring layout over R ranks, each segment cut into U equal pieces -- ringattn's 2-D
               layout (integrations/deepspeed.py), so positions come from the same rule.
  ds_ulysses   DeepSpeed-Ulysses (deepspeed.sequence.layer.DistributedAttention, deepspeed 0.19.8):
               all-to-all heads<->sequence, one local attention over the whole sequence for H/W
               heads (flash_attn_func), all-to-all back. Contiguous layout only (the all-to-all
               gathers the sequence in rank order).
  torch_ring   PyTorch's own ring-attention engine, the code its context_parallel dispatches SDPA to
               (torch.distributed.tensor.experimental _templated_ring_attention / _backward, private
               API), called directly with the block kernel below as its `op`: K/V all-gathered once
               (its default rotate method), dK/dV rotated with all-to-all permutes; head-tail load
               balancing (= zigzag) when causal zigzag, none for contiguous.

The block kernel. rfa/usp/ds_ulysses call flash-attention's private kernels
(flash_attn.flash_attn_interface._flash_attn_forward/_backward). When the real flash_attn imports
(and the tensors are on CUDA) they run on it, as shipped. Otherwise -- always on CPU, and on the
project's GPU machine, which has no flash_attn -- perf/flash_attn_shim puts a stand-in `flash_attn`
first on sys.path whose functions compute with ringattn's block kernel (block_attn_forward/backward,
backend="auto": the math kernel on CPU, cuDNN on an H100); torch_ring always uses that kernel.
The row's block_backend column says which ran. With the shim, every algorithm in a row group runs
the same block kernel, so the comparison is of everything but the kernel: schedule, communication,
merges, layout plumbing -- except that the shim's backward copies dq/dk/dv into the caller's
buffers (flash-attn writes them in place), one extra copy per block the peers pay.
RINGATTN_PEER_KERNEL=shim forces the shim even where flash_attn exists.

Ranks sharing one GPU (the sweep's --transport ipc): torch.distributed cannot move CUDA tensors
between them (NCCL refuses two ranks on one GPU, gloo aborts on CUDA send/recv). rfa's and
yunchang's ring messages all pass through one small class, RingComm (send_recv queues P2POps,
commit posts them with dist.batch_isend_irecv, wait waits), so make_fn(..., transport_factory=)
points its commit at a CudaIpcTransport for that group (_route_ring_comm): those two run there
(usp with Ulysses degree 1); the all-to-all / all-gather peers do not.

What a peer cannot do is refused up front with the reason (the sweep writes an error row):
lengths its layout cannot split evenly (they do not support uneven shards; see `problem`), head
counts its all-to-all cannot split, masks it lacks. Bytes: every message rfa's and yunchang's
RingComm posts is recorded in ringattn.accounting (channel "peer.ring"), so ringattn.comm_stats()
counts them as it counts ringattn's own; torch_ring's all-gathers and permutes (while its engine
runs) and yunchang's Ulysses all-to-alls are recorded too (channel "peer.collective", as direct
exchanges), and so are DeepSpeed-Ulysses' all-to-alls while its call runs. counts_bytes says when
that is ALL of a peer's traffic.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import types

import torch

PEERS = ("rfa", "usp", "ds_ulysses", "torch_ring")
SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn_shim")
_STATE: dict = {}


# ---------------------------------------------------------------------------------------------
# The block kernel behind flash_attn's API


def flash_attn_kernel(device_type: str) -> str:
    """Make `import flash_attn` work for the peers; return what it computes with (peer_kernel)."""
    if "kernel" in _STATE:
        return _STATE["kernel"]
    want = os.environ.get("RINGATTN_PEER_KERNEL", "auto")
    if want not in ("auto", "shim"):
        raise ValueError(f"RINGATTN_PEER_KERNEL must be auto or shim, got {want!r}")
    real = None
    if want == "auto" and device_type == "cuda":
        try:
            import flash_attn
            from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward  # noqa: F401
            if not getattr(flash_attn, "SHIM", False):
                real = f"flash_attn {flash_attn.__version__}"
        except ImportError:
            pass
    if real is None:
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[name]   # a real package seen above (CPU tensors, or forced shim)
        sys.path.insert(0, SHIM_DIR)
        importlib.invalidate_caches()
        import flash_attn
        assert getattr(flash_attn, "SHIM", False), flash_attn.__file__
        real = "ringattn block kernel via perf/flash_attn_shim"
    _STATE["kernel"] = real
    return real


# ---------------------------------------------------------------------------------------------
# What each peer can run, and where its tokens live


def usp_degrees(world: int, heads_q: int, heads_kv: int, ulysses: int | None = None,
                transport: str | None = None) -> tuple[int, int]:
    """(U, R) for yunchang's USP: U the largest divisor of W dividing both head counts (or the given
    one). On gloo R must be >= 2 (with R = 1 its backward still posts a send to itself, which gloo
    refuses), so there the largest such U with W/U >= 2."""
    if ulysses is None and transport == "ipc":
        ulysses = 1   # ranks sharing one GPU: only the ring's messages can go over CUDA IPC
    if ulysses is None:
        ok = [u for u in range(1, world + 1) if world % u == 0 and heads_q % u == 0 and heads_kv % u == 0
              and (transport != "gloo" or world // u >= 2 or world == 1)]
        ulysses = max(ok) if ok else 1
    if world % ulysses:
        raise ValueError(f"usp: ulysses degree {ulysses} does not divide the world size {world}")
    return ulysses, world // ulysses


def usp_split(cfg: dict, world: int) -> tuple[int, int]:
    """(U, R) of usp for a sweep configuration (usp_degrees on its heads, --usp-ulysses, transport)."""
    return usp_degrees(world, cfg["heads_q"], cfg["heads_kv"], cfg.get("usp_ulysses"), cfg.get("transport"))


def problem(alg: str, cfg: dict, world: int) -> str | None:
    """Why peer `alg` cannot run this configuration (None: it can)."""
    L, Hq, Hkv, causal, layout = cfg["seq_len"], cfg["heads_q"], cfg["heads_kv"], cfg["causal"], cfg["layout"]
    if cfg.get("window") not in (None, "", 0, "0"):
        return f"{alg}: sliding windows are not wired up for peers"
    zig = layout == "zigzag"
    split = 2 * world if zig else world
    if cfg.get("transport") == "ipc" and alg not in IPC_PEERS:
        return (f"{alg}: ranks sharing one GPU (ipc) have only gloo for torch.distributed, and its "
                f"collectives/P2P on CUDA tensors abort or go through the host; only {IPC_PEERS} (their ring "
                "messages) are routed over CUDA IPC")
    if alg in ("rfa", "usp", "ds_ulysses") and cfg["dtype"] not in ("bfloat16", "float16"):
        return f"{alg}: flash-attn kernels take fp16/bf16 only (got {cfg['dtype']})"
    if alg == "rfa":
        if zig and not causal:
            return "rfa: its zigzag ring asserts causal=True (no non-causal zigzag)"
        if L % split:
            return f"rfa: needs seq_len % {split} == 0 (equal {layout} shards; it has no uneven lengths)"
        return None
    if alg == "usp":
        if zig and not causal:
            return "usp: yunchang's zigzag ring asserts causal=True"
        U, R = usp_split(cfg, world)
        if Hq % U or Hkv % U:
            return f"usp: ulysses degree {U} must divide heads_q={Hq} and heads_kv={Hkv}"
        if U > 1 and cfg.get("transport") == "ipc":
            return "usp: on ranks sharing one GPU (ipc) only its ring runs over CUDA IPC: Ulysses degree 1 only"
        if R == 1 and world > 1 and cfg.get("transport") == "gloo":
            return "usp: with ring degree 1 its backward sends to itself, which gloo refuses (NCCL allows it)"
        if L % ((2 * R if zig else R) * U):
            return f"usp: needs seq_len % {(2 * R if zig else R) * U} == 0 (equal shards)"
        return None
    if alg == "ds_ulysses":
        if zig:
            return "ds_ulysses: its all-to-all gathers the sequence in rank order: layout=contiguous only"
        if Hq % world or Hkv % world:
            return f"ds_ulysses: world size {world} must divide heads_q={Hq} and heads_kv={Hkv}"
        if L % world:
            return f"ds_ulysses: needs seq_len % {world} == 0"
        return None
    if alg == "torch_ring":
        if zig and not causal:
            return "torch_ring: load balancing (zigzag) requires causal=True"
        if L % split:
            return f"torch_ring: needs seq_len % {split} == 0 (it chunks shards in equal halves)"
        return None
    raise ValueError(f"unknown peer {alg!r}")


def positions(alg: str, cfg: dict, world: int, rank: int, device) -> torch.Tensor:
    """Global indices of the tokens rank `rank` holds for peer `alg` (the lengths divide: see problem)."""
    from ringattn.layout import SequenceLayout

    L, layout = cfg["seq_len"], cfg["layout"]
    if alg != "usp":
        return SequenceLayout.build(L, world, layout).positions(rank, device)
    U, R = usp_split(cfg, world)
    seg = SequenceLayout.build(L, R, layout).positions(rank // U, device)   # ring rank j = g // U
    return seg.chunk(U)[rank % U]                                            # Ulysses piece i = g % U


# ---------------------------------------------------------------------------------------------
# The calls: fn(q, k, v) -> out, (B, S_local, H, D) in and out, differentiable


def make_fn(alg: str, cfg: dict, group=None, transport_factory=None):
    """fn(q, k, v) -> out for peer `alg` over `group` (None: the default group).

    transport_factory(group, channel) -> transport (e.g. the sweep's CudaIpcTransport factory for
    ranks sharing one GPU): the ring messages of rfa / usp (their RingComm batches) go over it
    instead of torch.distributed; `reserve`d here for the largest message (collective)."""
    import torch.distributed as dist

    flash_attn_kernel(cfg.get("device_type", "cpu"))
    causal = cfg["causal"]
    zig = cfg["layout"] == "zigzag"
    world = dist.get_world_size(group)
    if transport_factory is not None and alg not in IPC_PEERS:
        raise ValueError(f"{alg}: only {IPC_PEERS} can run over a transport factory (their ring is one class)")
    if alg == "rfa":
        rfa = _import_rfa()
        _route_ring_comm(rfa.utils.RingComm, group, transport_factory, ipc_message_bytes(alg, cfg, world))
        f = rfa.zigzag_ring_flash_attn.zigzag_ring_flash_attn_func if zig else rfa.ring_flash_attn.ring_flash_attn_func
        return lambda q, k, v: f(q, k, v, causal=causal, group=group)
    if alg == "usp":
        return _usp_fn(cfg, world, group, transport_factory)
    if alg == "ds_ulysses":
        from deepspeed.sequence.layer import DistributedAttention
        from flash_attn import flash_attn_func

        from ringattn.integrations.deepspeed import init_deepspeed_comm
        init_deepspeed_comm()   # deepspeed.comm over the torch.distributed world (once)

        attn = DistributedAttention(lambda q, k, v, *a, **kw: flash_attn_func(q, k, v, causal=causal),
                                    group if group is not None else dist.group.WORLD, scatter_idx=2, gather_idx=1)
        return _counted_ds_ulysses(attn)
    if alg == "torch_ring":
        g = group if group is not None else dist.group.WORLD
        return lambda q, k, v: _TorchRing.apply(q, k, v, g, causal, zig)
    raise ValueError(f"unknown peer {alg!r}")


def _import_rfa():
    """ring_flash_attn with its attention modules loaded. Its package __init__ also imports its
    Hugging Face adapter, which fails on transformers 5 (it imports
    is_flash_attn_greater_or_equal_2_10, gone there); the attention functions do not need it, so
    then the package is entered without running __init__."""
    import importlib.util

    try:
        import ring_flash_attn
    except ImportError as e:
        spec = importlib.util.find_spec("ring_flash_attn")
        if spec is None:
            raise ImportError("rfa: ring-flash-attn is not installed (pip install ring-flash-attn==0.1.8)") from e
        for name in [m for m in sys.modules if m == "ring_flash_attn" or m.startswith("ring_flash_attn.")]:
            del sys.modules[name]
        ring_flash_attn = types.ModuleType("ring_flash_attn")
        ring_flash_attn.__path__ = list(spec.submodule_search_locations)
        ring_flash_attn.__file__ = spec.origin
        sys.modules["ring_flash_attn"] = ring_flash_attn
    importlib.import_module("ring_flash_attn.ring_flash_attn")
    importlib.import_module("ring_flash_attn.zigzag_ring_flash_attn")
    return ring_flash_attn


def _usp_fn(cfg, world, group, transport_factory=None):
    import torch.distributed as dist
    import yunchang
    from yunchang.kernels import AttnType

    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        raise ValueError("usp: yunchang builds its groups over the default group; run it on the whole world")
    U, R = usp_split(cfg, world)
    key = ("usp_groups", U, R)
    if key not in _STATE:   # new_group is collective: every rank reaches this in the same order
        yunchang.set_seq_parallel_pg(U, R, dist.get_rank(), world)
        _STATE[key] = (yunchang.globals.PROCESS_GROUP.ULYSSES_PG, yunchang.globals.PROCESS_GROUP.RING_PG)
    yunchang.globals.PROCESS_GROUP.ULYSSES_PG, yunchang.globals.PROCESS_GROUP.RING_PG = _STATE[key]
    from yunchang.ring.utils import RingComm
    import yunchang.comm.all_to_all as a2a

    _route_ring_comm(RingComm, _STATE[key][1], transport_factory, ipc_message_bytes("usp", cfg, world))
    if not isinstance(a2a.dist, _CountingDist):   # its Ulysses all-to-alls, forward and backward
        a2a.dist = _CountingDist(a2a.dist)
    attn = yunchang.LongContextAttention(ring_impl_type="zigzag" if cfg["layout"] == "zigzag" else "basic",
                                         attn_type=AttnType.FA)
    causal = cfg["causal"]
    return lambda q, k, v: attn(q, k, v, causal=causal)


# ---------------------------------------------------------------------------------------------
# Ring messages over another transport (ranks sharing one GPU: CudaIpcTransport)

IPC_PEERS = ("rfa", "usp")   # their ring messages all go through one small class, RingComm
_ROUTES: dict = {}           # (RingComm class, group key) -> transport


def _group_key(group):
    import torch.distributed as dist

    return "WORLD" if group is None or group is dist.GroupMember.WORLD else id(group)


def ipc_message_bytes(alg: str, cfg: dict, world: int) -> int:
    """The largest single tensor the peer's ring sends in one call: a K or V shard, or its dK/dV
    sum, which both rfa and yunchang carry in fp32 (4 bytes per element)."""
    B, L, Hkv, D = cfg.get("batch", 1), cfg["seq_len"], cfg["heads_kv"], cfg.get("head_dim", 1)
    if alg == "usp":   # the ring runs over R ranks on (B, L/R, Hkv/U, D) after the all-to-all
        U, R = usp_split(cfg, world)
        return B * -(-L // R) * (Hkv // U) * D * 4
    return B * -(-L // world) * Hkv * D * 4


def _route_ring_comm(cls, group, transport_factory, max_message_bytes: int) -> None:
    """Make `cls` (a peer's RingComm: send_recv queues P2POps, commit posts them with
    dist.batch_isend_irecv, wait waits them) post its batches for `group` on
    transport_factory(group, "peer.ring") instead; None restores torch.distributed for `group`.
    Both ends of every pair post in the same program order (their K/V and dK/dV batches), which is
    the transport's matching rule; one transport with 4 slots holds a K/V batch and a dK/dV batch
    in flight at once (backward)."""
    _patch_ring_comm(cls)
    key = (cls, _group_key(group))
    if transport_factory is None:
        _ROUTES.pop(key, None)
        return
    t = transport_factory(group, "peer.ring")
    if getattr(t, "slots", 4) < 4:
        raise ValueError(f"peer ring transport needs >= 4 slots per peer, got {t.slots}")
    if hasattr(t, "reserve"):
        t.reserve(int(max_message_bytes))   # collective over the group
    _ROUTES[key] = t


PEER_CHANNEL = "peer.ring"                 # ringattn.comm_stats channel of the peers' ring messages
COLLECTIVE_CHANNEL = "peer.collective"     # ... and of their collectives (torch_ring, usp's all-to-alls)


def _record_exchange(ranks, me: int, sent: int, received: int) -> None:
    """A collective counted as a direct exchange: `sent` bytes to and `received` bytes from every
    other rank of the group (global `ranks`; this rank is index `me`)."""
    from ringattn import accounting

    for j, peer in enumerate(ranks):
        if j != me:
            accounting.record(COLLECTIVE_CHANNEL, peer, sent, True)
            accounting.record(COLLECTIVE_CHANNEL, peer, received, False)


def _patch_ring_comm(cls) -> None:
    """Replace cls.commit (once): record every queued message in ringattn.accounting (channel
    "peer.ring", so ringattn.comm_stats() counts the peer's ring bytes like ringattn's own), then
    post the batch on the routed transport, or dist.batch_isend_irecv as the original does."""
    if getattr(cls, "_ringattn_routed", False):
        return
    import torch.distributed as dist

    from ringattn import accounting

    def commit(self):
        if self._reqs is not None:
            raise RuntimeError("commit called twice")
        for op in self._ops:
            accounting.record(PEER_CHANNEL, op.peer, op.tensor.numel() * op.tensor.element_size(),
                              op.op in (dist.isend, dist.send))
        t = _ROUTES.get((type(self), _group_key(self._process_group)))
        self._reqs = (t.batch_isend_irecv if t is not None else dist.batch_isend_irecv)(self._ops)

    cls.commit = commit
    cls._ringattn_routed = True


def counts_bytes(alg: str, cfg: dict, world: int) -> bool:
    """Whether ringattn.comm_stats() sees ALL of peer `alg`'s traffic: rfa's ring, usp's ring and
    all-to-alls, torch_ring's functional collectives, ds_ulysses' all-to-alls (counted only while
    its own forward and backward run, _counted_ds_ulysses)."""
    if alg == "torch_ring":   # its functional collectives, counted while the engine runs
        return hasattr(_torch_cp_engine(), "ft_c")
    return alg in ("rfa", "usp", "ds_ulysses")


@functools.lru_cache(maxsize=None)
def _torch_cp_engine():
    """(module with _templated_ring_attention[_backward] and _cp_options, _RotateMethod) of this torch."""
    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(mod, a) for a in ("_templated_ring_attention", "_templated_ring_attention_backward",
                                          "_cp_options")):
            return mod
    raise RuntimeError(f"torch_ring: torch {torch.__version__} has no _templated_ring_attention(_backward)")


def _op_forward(query, key, value, is_causal=False, scale=None, **_):
    """torch's SDPA-op convention on ringattn's kernel: (B, H, S, D) -> (out, logsumexp (B, H, S))."""
    import ringattn

    out, lse = ringattn.block_attn_forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           causal="bottom_right" if is_causal else False, softmax_scale=scale)
    return out.transpose(1, 2), lse


def _op_backward(grad_out, query, key, value, out, logsumexp, is_causal=False, scale=None, **_):
    import ringattn

    t = lambda x: x.transpose(1, 2)  # noqa: E731
    dq, dk, dv = ringattn.block_attn_backward(t(grad_out), t(query), t(key), t(value), t(out), logsumexp,
                                              causal="bottom_right" if is_causal else False, softmax_scale=scale)
    return t(dq), t(dk), t(dv)


class _TorchRing(torch.autograd.Function):
    """PyTorch's ring engine forward and backward, (B, S, H, D) in and out."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, zigzag):
        mod = _torch_cp_engine()
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))   # (B, H, S, D)
        with _load_balance(mod, zigzag, group):
            out, lse = mod._templated_ring_attention(group, 2, _op_forward, qt, kt, vt, is_causal=causal)[:2]
        ctx.save_for_backward(qt, kt, vt, out, lse)
        ctx.group, ctx.causal, ctx.zigzag = group, causal, zigzag
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        mod = _torch_cp_engine()
        qt, kt, vt, out, lse = ctx.saved_tensors
        with _load_balance(mod, ctx.zigzag, ctx.group):
            dq, dk, dv = mod._templated_ring_attention_backward(
                ctx.group, 2, _op_backward, dout.transpose(1, 2).contiguous(), "grad_out", qt, kt, vt, out, lse,
                is_causal=ctx.causal)[:3]
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


class _load_balance:
    """For one engine call: torch's global CP option enable_load_balance (zigzag <=> head-tail
    balancing), and the engine's functional collectives (its module global `ft_c`) swapped for a
    proxy that records their bytes in ringattn.accounting (channel "peer.collective"), as a direct
    exchange: all_gather_single sends the tensor to, and receives one from, every other rank;
    permute_tensor sends it to its destination and receives one from its source."""

    def __init__(self, mod, on: bool, group=None):
        self.mod, self.on, self.group = mod, on, group

    def __enter__(self):
        self.old = self.mod._cp_options.enable_load_balance
        self.mod._cp_options.enable_load_balance = self.on
        self.real = getattr(self.mod, "ft_c", None)
        if self.real is not None and self.group is not None:
            self.mod.ft_c = _CountingCollectives(self.real, self.group)

    def __exit__(self, *exc):
        self.mod._cp_options.enable_load_balance = self.old
        if self.real is not None:
            self.mod.ft_c = self.real


class _CountingCollectives:
    """torch.distributed._functional_collectives with all_gather_single / permute_tensor counted."""

    def __init__(self, real, group):
        import torch.distributed as dist

        self._real = real
        self._ranks = dist.get_process_group_ranks(group)
        self._me = dist.get_rank(group)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def all_gather_single(self, x, *args, **kwargs):
        n = x.numel() * x.element_size()
        _record_exchange(self._ranks, self._me, n, n)
        return self._real.all_gather_single(x, *args, **kwargs)

    def permute_tensor(self, x, src_dst, *args, **kwargs):
        from ringattn import accounting

        n = x.numel() * x.element_size()
        dst, src = src_dst[self._me], list(src_dst).index(self._me)   # rank i sends to src_dst[i]
        if dst != self._me:
            accounting.record(COLLECTIVE_CHANNEL, self._ranks[dst], n, True)
        if src != self._me:
            accounting.record(COLLECTIVE_CHANNEL, self._ranks[src], n, False)
        return self._real.permute_tensor(x, src_dst, *args, **kwargs)



class _CountingDist:
    """torch.distributed (or deepspeed.comm) as one peer module sees it (yunchang.comm.all_to_all's
    or deepspeed.sequence.layer's `dist` global), with all_to_all_single's bytes recorded (channel
    "peer.collective") while `counting()` is true: even splits, so 1/W of the input to each other
    rank and 1/W of the output from each."""

    def __init__(self, real, counting=lambda: True):
        self._real, self._counting = real, counting

    def __getattr__(self, name):
        return getattr(self._real, name)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          *args, **kwargs):
        if self._counting():
            import torch.distributed as dist

            if output_split_sizes is not None or input_split_sizes is not None:
                raise NotImplementedError("peers: counting uneven all_to_all_single is not wired up")
            ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            w = len(ranks)
            _record_exchange(ranks, ranks.index(dist.get_rank()), input.numel() * input.element_size() // w,
                             output.numel() * output.element_size() // w)
        return self._real.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group,
                                            *args, **kwargs)


_DS_COUNTING = [False]   # True while a ds_ulysses call's forward or backward runs (_counted_ds_ulysses)


class _DsCounting(torch.autograd.Function):
    """Identity that sets _DS_COUNTING to `on` when the gradient flows through it: placed on
    DistributedAttention's output (on: its backward all-to-alls follow) and inputs (off: they are done)."""

    @staticmethod
    def forward(ctx, on, *xs):
        ctx.on = on
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        _DS_COUNTING[0] = ctx.on
        return (None, *grads)


def _counted_ds_ulysses(attn):
    """fn(q, k, v) running DeepSpeed's DistributedAttention with its all-to-alls counted.

    deepspeed.sequence.layer calls them through its module global `dist` (deepspeed.comm), which
    ringattn's own 2-D DeepSpeed path (integrations/deepspeed.py, which counts its all-to-alls
    itself) goes through too: the proxy counts only inside this call's forward and, through the
    _DsCounting markers around it, its backward (the autograd engine runs the output's marker
    first, then DeepSpeed's backward all-to-alls, then the inputs' marker)."""
    import deepspeed.sequence.layer as ds_layer

    if not isinstance(ds_layer.dist, _CountingDist):
        ds_layer.dist = _CountingDist(ds_layer.dist, lambda: _DS_COUNTING[0])

    def fn(q, k, v):
        q, k, v = _DsCounting.apply(False, q, k, v)
        _DS_COUNTING[0] = True
        try:
            out = attn(q, k, v, 0)
        finally:
            _DS_COUNTING[0] = False
        (out,) = _DsCounting.apply(True, out)
        return out
    return fn


# ---------------------------------------------------------------------------------------------
# Labels for the sweep's rows


def kernel_label(alg: str, device_type: str, ringattn_backend: str) -> str:
    """What block kernel peer `alg` ran (the sweep's block_backend column)."""
    if alg == "torch_ring":
        return f"{ringattn_backend} (ringattn kernel as torch's op)"
    k = flash_attn_kernel(device_type)
    return k if k.startswith("flash_attn ") else f"{ringattn_backend} (ringattn kernel via flash_attn shim)"


def config_label(alg: str, cfg: dict, world: int) -> str:
    """The peer's own configuration (the sweep's peer_config column)."""
    zig = cfg["layout"] == "zigzag"
    if alg == "rfa":
        return "ring-flash-attn " + ("zigzag_ring_flash_attn_func" if zig else "ring_flash_attn_func")
    if alg == "usp":
        U, R = usp_split(cfg, world)
        return f"yunchang LongContextAttention U={U} R={R} ring={'zigzag' if zig else 'basic'}"
    if alg == "ds_ulysses":
        return "deepspeed DistributedAttention + flash_attn_func"
    if alg == "torch_ring":
        mod = _torch_cp_engine()
        return (f"torch _templated_ring_attention rotate={mod._cp_options.rotate_method.name.lower()} "
                f"load_balance={zig}")
    raise ValueError(alg)
