"""Who holds which tokens of the global sequence, and which (Q, K/V) block pairs causal attention
needs. Pure index arithmetic plus shard_sequence / gather_sequence.

Layouts over W ranks of a global sequence of L tokens:
  contiguous  L cut into W consecutive chunks c_0..c_{W-1}; rank r holds c_r.
  zigzag      L cut into 2W chunks c_0..c_{2W-1}; rank r holds cat(c_r, c_{2W-1-r}) (every rank
              gets one early and one late chunk, which balances causal work).
Uneven L: chunk sizes differ by at most one token, earlier chunks taking the extra tokens
(split_sizes). Chunks of length 0 are refused: L must be >= W (contiguous) or >= 2W (zigzag),
the error names the minimum (min_seq_len).

Gradients of shard_sequence / gather_sequence follow the SUM convention of data/sequence
parallelism: the training loss is the sum of the per-rank losses, so
  shard_sequence backward:  the local gradient lands in this rank's rows, zeros elsewhere
                            (no communication; a tensor replicated on every rank then has its
                            gradient split over ranks -- all-reduce it, as for any replicated
                            parameter);
  gather_sequence backward: all-reduce (sum) of the full gradient, then this rank's rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def split_sizes(n: int, parts: int) -> list[int]:
    """n items in `parts` near-equal pieces, earlier pieces one bigger."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def check_layout_name(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(world_size: int, layout: str) -> int:
    return world_size if check_layout_name(layout) == "contiguous" else 2 * world_size


def min_seq_len(world_size: int, layout: str) -> int:
    """Shortest global sequence with no empty chunk (every rank holds >= 1 token per chunk)."""
    return num_chunks(world_size, layout)


def seq_len_error(seq_len: int, world_size: int, layout: str) -> str | None:
    need = min_seq_len(world_size, layout)
    if seq_len >= need:
        return None
    return (f"a global sequence of {seq_len} tokens is too short for {world_size} ranks with "
            f"layout={layout!r}: it is cut into {need} chunks and every chunk needs >= 1 token; "
            f"use at least {need} tokens, fewer ranks, or layout='contiguous'")


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """The chunk table of one global sequence over one group (identical on every rank)."""

    layout: str          # "contiguous" | "zigzag"
    world_size: int      # W
    seq_len: int         # L, global
    chunk_sizes: tuple   # W (contiguous) or 2W (zigzag) chunk lengths, sum L
    chunk_starts: tuple  # global offset of each chunk

    @staticmethod
    def build(seq_len: int, world_size: int, layout: str) -> "SequenceLayout":
        check_layout_name(layout)
        problem = seq_len_error(seq_len, world_size, layout)
        if problem:
            raise ValueError(problem)
        sizes = split_sizes(seq_len, num_chunks(world_size, layout))
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        return SequenceLayout(layout, world_size, seq_len, tuple(sizes), tuple(starts))

    def chunk_ids(self, rank: int) -> tuple:
        if self.layout == "contiguous":
            return (rank,)
        return (rank, 2 * self.world_size - 1 - rank)

    def segments(self, rank: int) -> list[tuple[int, int]]:
        """(global start, length) of the pieces rank holds, in local order."""
        return [(self.chunk_starts[c], self.chunk_sizes[c]) for c in self.chunk_ids(rank)]

    def local_len(self, rank: int) -> int:
        return sum(self.chunk_sizes[c] for c in self.chunk_ids(rank))

    @property
    def local_lengths(self) -> tuple:
        return tuple(self.local_len(r) for r in range(self.world_size))

    def first_len(self, rank: int) -> int:
        """Tokens of rank's first chunk (zigzag: c_r; contiguous: all of them)."""
        return self.chunk_sizes[rank]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global positions of rank's tokens, in local order: (local_len,) int64."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments(rank)])


class Block(NamedTuple):
    """The part of one (Q owner, K/V owner) pair that attention needs. Rows are local indices."""

    q_start: int
    q_len: int
    kv_start: int
    kv_len: int
    causal: bool  # top-left causal mask; only on diagonal blocks, where q_len == kv_len
    # Packed sequences (ringattn.documents): the per-document sub-blocks, rows relative to
    # q_start / kv_start (then `causal` is unused: each piece carries its own). () = one dense block.
    pieces: tuple = ()


def attention_block(lay: SequenceLayout, q_owner: int, kv_owner: int, causal: bool) -> Block | None:
    """Which rows of q_owner's Q meet which rows of kv_owner's K/V (None: fully masked).

    Non-causal: everything. Causal, contiguous: kv_owner < q_owner everything, == diagonal,
    > nothing. Causal, zigzag (q_owner i holds c_i, c_{2W-1-i}; halves from the chunk table,
    so uneven lengths are exact):
      j == i  both chunks, causal diagonal (local order is global order);
      j <  i  all of Q against j's FIRST chunk c_j (c_{2W-1-j} lies after both of i's chunks);
      j >  i  i's SECOND chunk c_{2W-1-i} against all of j's K/V (c_i precedes both of j's).
    """
    nq, nk = lay.local_len(q_owner), lay.local_len(kv_owner)
    if not causal:
        return Block(0, nq, 0, nk, False)
    if q_owner == kv_owner:
        return Block(0, nq, 0, nk, True)
    if lay.layout == "contiguous":
        return Block(0, nq, 0, nk, False) if kv_owner < q_owner else None
    if kv_owner < q_owner:
        return Block(0, nq, 0, lay.first_len(kv_owner), False)
    a = lay.first_len(q_owner)
    return Block(a, nq - a, 0, nk, False)


# --------------------------------------------------------------------------------------------
# Group helpers


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the "
                         f"given process group (ranks {dist.get_process_group_ranks(group)})")
    return rank, dist.get_world_size(group)


def no_autocast(device: torch.device):
    """A context with autocast off on `device`'s type (a no-op for types autocast lacks): the
    kernels, merges and backward keep their fp32 accumulation inside an autocast region."""
    dev = device.type
    return torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda", "xpu") else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming a dtype, stable across processes (for metadata signatures)."""
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


def collective_device(group, like: torch.device) -> torch.device:
    """Where small control tensors for collectives on `group` must live (gloo: CPU)."""
    if like.type == "cpu":
        return like
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return like
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# shard / gather


def _norm_dim(x: torch.Tensor, dim: int, fn: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim={dim} out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous") -> torch.Tensor:
    """This rank's tokens of the full sequence x (same x on every rank), a contiguous copy.

    x: (..., L, ...) with the sequence on `dim`. Returns (..., local_len, ...). Differentiable
    (backward: the local gradient in this rank's rows, zeros elsewhere; see the module doc).
    """
    dim = _norm_dim(x, dim, "shard_sequence")
    check_layout_name(layout)
    rank, world = group_rank_and_size(group)
    lay = SequenceLayout.build(x.shape[dim], world, layout)
    parts = [x.narrow(dim, s, n) for s, n in lay.segments(rank)]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].contiguous().clone()


def _gather_forward(x: torch.Tensor, dim: int, group, layout: str, seq_len: int | None = None):
    rank, world = group_rank_and_size(group)
    if world == 1:
        SequenceLayout.build(x.shape[dim], 1, layout)
        if seq_len is not None and seq_len != x.shape[dim]:
            raise ValueError(f"gather_sequence: seq_len={seq_len} was given, but the one rank holds "
                             f"{x.shape[dim]} tokens")
        return x.clone(), (x.shape[dim],)
    # One int64 signature per rank: ndim, dtype, every dim size (the sequence dim may differ),
    # and the seq_len the caller promised (-1: none).
    from ringattn.comm import control_group

    dev = collective_device(group, x.device)  # the data's all_gather
    cgroup, cdev = control_group(group, x.device)  # the signature's (on the host where possible)
    sig = torch.full((2 + 8 + 1,), -1, dtype=torch.int64)
    sig[0] = x.dim()
    sig[1] = dtype_code(x.dtype)
    for i, s in enumerate(x.shape[:8]):
        sig[2 + i] = s
    if seq_len is not None:
        sig[10] = seq_len
    sigs = [torch.empty_like(sig, device=cdev) for _ in range(world)]
    dist.all_gather(sigs, sig.to(cdev), group=cgroup)
    sigs = [s.cpu() for s in sigs]
    lengths = [int(s[2 + dim]) if dim < 8 else -1 for s in sigs]
    other = [tuple(int(v) for i, v in enumerate(s.tolist()[:10]) if i != 2 + dim) for s in sigs]
    if any(int(s[0]) > 8 for s in sigs) or any(o != other[0] for o in other):
        raise ValueError(
            "gather_sequence: ranks disagree on the non-sequence dims or dtype of x (every rank must "
            "hold (..., local_len, ...) with the same other dims and dtype): "
            + "; ".join(f"rank {r}: ndim {int(s[0])}, shape {tuple(int(v) for v in s[2:2 + min(8, int(s[0]))])}"
                        for r, s in enumerate(sigs)))
    lay = SequenceLayout.build(sum(lengths), world, layout)
    if tuple(lengths) != lay.local_lengths:
        raise ValueError(
            f"gather_sequence: ranks hold {lengths} tokens, but layout={layout!r} over {world} ranks "
            f"cuts a sequence of {lay.seq_len} tokens into {list(lay.local_lengths)}")
    promised = [int(s[10]) for s in sigs]
    if any(p not in (-1, lay.seq_len) for p in promised):
        raise ValueError(
            f"gather_sequence: the ranks hold {lay.seq_len} tokens in all ({lengths}), but they were given "
            "seq_len " + ", ".join(f"rank {r}: {'none' if p == -1 else p}" for r, p in enumerate(promised)))
    # gloo's all_gather needs equal sizes: pad to the longest shard.
    longest = max(lengths)
    padded_shape = list(x.shape)
    padded_shape[dim] = longest
    mine = x.new_zeros(padded_shape, device=dev)
    mine.narrow(dim, 0, x.shape[dim]).copy_(x)
    bufs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    full_shape = list(x.shape)
    full_shape[dim] = lay.seq_len
    full = x.new_empty(full_shape)
    for r, buf in enumerate(bufs):
        off = 0
        for s, n in lay.segments(r):
            full.narrow(dim, s, n).copy_(buf.narrow(dim, off, n))
            off += n
    return full, tuple(lengths)


def _gather_backward(grad_full: torch.Tensor, dim: int, group, layout: str) -> torch.Tensor:
    # Sum convention: every rank's loss may use the full tensor; the shard's gradient is the
    # sum over ranks of their gradients at its rows.
    g = grad_full.contiguous().clone()
    _, world = group_rank_and_size(group)
    if world > 1:
        dev = collective_device(group, g.device)
        gd = g.to(dev)
        dist.all_reduce(gd, group=group)
        g = gd.to(g.device)
    return shard_sequence(g, dim, group, layout)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, layout, seq_len):
        full, _ = _gather_forward(x, dim, group, layout, seq_len)
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        return full

    @staticmethod
    def backward(ctx, grad_full):
        return _gather_backward(grad_full, ctx.dim, ctx.group, ctx.layout), None, None, None, None


def gather_sequence(x_local: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous",
                    seq_len: int | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard (collective; the inverse of shard_sequence).

    x_local: (..., local_len, ...) with the sequence on `dim`; local lengths may differ by rank
    (learned with one small all_gather). Returns (..., L, ...) on every rank. Differentiable
    (backward: all-reduce of the full gradient, then this rank's rows).
    seq_len: the global length L, if the caller knows it: checked against what the ranks hold
    (a ValueError on every rank if wrong), and what lets torch.compile trace the call as one op
    (the output shape is then known at trace time; without it, a graph break: ringattn.compiled).
    """
    dim = _norm_dim(x_local, dim, "gather_sequence")
    check_layout_name(layout)
    if seq_len is not None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"gather_sequence: seq_len must be a positive int or None, got {seq_len!r}")
    if torch.compiler.is_compiling():
        from ringattn.compiled import traced_gather
        return traced_gather(x_local, dim, group, layout, seq_len)
    return _GatherSequence.apply(x_local, dim, group, layout, seq_len)


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """Everything a sequence-parallel algorithm needs that every rank of the group agrees on
    (built once per forward from the metadata exchange, reused by the backward)."""

    group: object              # process group (None: default)
    rank: int                  # this rank's index in the group
    world_size: int            # W
    layout: SequenceLayout     # chunk table of the global sequence
    causal: bool
    softmax_scale: float
    backend: str               # block attention backend ("auto", "math", ...)
    # Packed sequences: global document boundaries (0, ..., L) (ringattn.documents), or None.
    documents: tuple | None = None
    # Causal sliding window (each query sees its `window` most recent keys, itself included), or None.
    window: int | None = None
    # Logit softcapping c of every block (scores -> c * tanh(scores / c); Gemma 2), 0.0: off.
    softcap: float = 0.0
    _blocks: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @functools.cached_property
    def direction(self) -> int:
        """+1: K/V travel to rank r+1 (the ring of the papers); -1: to rank r-1. KV rotation takes
        the direction in which its blocks shrink more (kv_hops: fewer K/V and dK/dV rows moved;
        ties +1). Causal zigzag: -1 -- a block then visits the earlier ranks first, which need all
        of it, and the later ones after, which need only its first chunk (25% fewer K/V bytes in
        total; the busiest rank's are unchanged).
        Causal contiguous and windows (contiguous): +1. Non-causal without documents: +1."""
        if self.world_size <= 2 or (not self.causal and self.documents is None and self.window is None):
            return 1
        return ring_direction(self.layout, self.causal, self.documents, self.window)

    @property
    def next(self) -> int:
        """Where K/V go each step (rank r + direction)."""
        return (self.rank + self.direction) % self.world_size

    @property
    def prev(self) -> int:
        """Where K/V come from each step (rank r - direction)."""
        return (self.rank - self.direction) % self.world_size

    @functools.cached_property
    def ring_steps(self) -> int:
        """S: the last ring step (distance s = (q_owner - kv_owner) * direction mod W) at which any
        rank still has a block. KV rotation stops after step S: W - 1 for plain (causal) attention;
        less when a sliding window or short documents keep every rank's keys within S ranks of
        the queries that see them (contiguous layout, a window no longer than a chunk: 1)."""
        if self.documents is None and self.window is None:
            return self.world_size - 1  # every distance has a block (contiguous causal: the last rank's)
        return ring_steps(self.layout, self.causal, self.documents, self.window, self.direction)

    @functools.cached_property
    def kv_hops(self) -> tuple:
        """Per rank j, per hop h = 1..S (S = ring_steps): the (start, length) of j's K/V rows that
        hop h carries (to rank j + h*direction): the union of the rows the ranks it still reaches
        need (their blocks' kv rows), so a block shrinks as it passes the ranks that need it.
        Causal contiguous (+1): nothing after rank W-1 (earlier ranks see none of it); causal
        zigzag (-1): whole while earlier ranks are ahead, then only its first chunk (later ranks
        see only that); a window (contiguous, +1): the last w-1 rows, one hop. Non-causal without
        documents: whole, every hop."""
        S = self.ring_steps
        if not self.causal and self.documents is None and self.window is None:
            return tuple(((0, n),) * S for n in self.layout.local_lengths)
        return kv_hops(self.layout, self.causal, self.documents, self.window, self.direction)

    @functools.cached_property
    def kv_ranges(self) -> tuple:
        """(start, length) per rank j of the rows its K/V's first hop carries (kv_hops[j][0], the
        union over every receiver): the rows its dK/dV sums travel over; (0, 0) when S = 0."""
        return tuple(h[0] if h else (0, 0) for h in self.kv_hops)

    def block(self, q_owner: int, kv_owner: int) -> Block | None:
        key = (q_owner, kv_owner)
        if key not in self._blocks:
            blk = attention_block(self.layout, q_owner, kv_owner, self.causal)
            if self.documents is not None or self.window is not None:
                from ringattn.documents import document_block
                docs = self.documents if self.documents is not None else (0, self.layout.seq_len)
                blk = document_block(self.layout, docs, q_owner, kv_owner, self.causal, blk, self.window)
            self._blocks[key] = blk
        return self._blocks[key]


@functools.lru_cache(maxsize=32)
def _mask_plan(lay: SequenceLayout, causal: bool, documents, window) -> "RingPlan":
    """One RingPlan per mask whose block cache ring_steps / kv_hops / ring_direction share (the
    block cuts, O(W^2), are the expensive part: ~20-40 ms at W = 64 for a packing)."""
    return RingPlan(None, 0, lay.world_size, lay, causal, 1.0, "auto", documents, window)


@functools.lru_cache(maxsize=32)
def ring_steps(lay: SequenceLayout, causal: bool, documents, window, direction: int = 1) -> int:
    """RingPlan.ring_steps of a call with these masks, cached across calls (the layers of a model
    ask with the same): all W^2 block cuts, ~20-40 ms at W = 64 on the host, once."""
    plan = _mask_plan(lay, causal, documents, window)
    W = lay.world_size
    return max((s for s in range(1, W) for r in range(W) if plan.block(r, (r - direction * s) % W) is not None),
               default=0)


@functools.lru_cache(maxsize=32)
def kv_hops(lay: SequenceLayout, causal: bool, documents, window, direction: int = 1) -> tuple:
    """RingPlan.kv_hops of a call with these masks and K/V direction, cached across calls."""
    plan = _mask_plan(lay, causal, documents, window)
    W, S = lay.world_size, ring_steps(lay, causal, documents, window, direction)
    out = []
    for j in range(W):
        lo, hi, hops = lay.local_len(j), 0, []
        for h in range(S, 0, -1):  # the union over the receivers of hops h .. S, from the last one back
            b = plan.block((j + direction * h) % W, j)
            if b is not None:
                lo, hi = min(lo, b.kv_start), max(hi, b.kv_start + b.kv_len)
            hops.append((lo, hi - lo) if hi > lo else (0, 0))
        out.append(tuple(reversed(hops)))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def ring_direction(lay: SequenceLayout, causal: bool, documents, window) -> int:
    """RingPlan.direction: the K/V direction that moves fewer rows (K/V over its hops, counted
    twice for forward + backward, and the fp32 dK/dV sums, twice the bytes of bf16 K/V, over
    theirs: S + 1 hops of the first hop's rows); ties +1."""
    def rows(d):
        H, S = kv_hops(lay, causal, documents, window, d), ring_steps(lay, causal, documents, window, d)
        return 2 * sum(m for h in H for _, m in h) + 2 * (S + 1) * sum(h[0][1] for h in H if h)
    return -1 if rows(-1) < rows(1) else 1


def flat_view(flat: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous tensor of `shape` on the front of the 1-D buffer `flat` (uneven blocks share
    one max-sized buffer without torch.cat or narrow-induced strides)."""
    n = 1
    for s in shape:
        n *= s
    return flat[:n].view(shape)
