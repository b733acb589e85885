"""DeepSpeed integration: the 2-D (Ulysses x ring) attention and DeepSpeed-engine helpers.

2-D sequence parallelism (algorithm="ulysses+ring" or "ulysses+token_ring" in
ringattn.integrations.huggingface.apply_sequence_parallel): W = U x R ranks. Rank g of the group
is Ulysses index i = g % U inside Ulysses group j = g // U (U consecutive ranks: the all-to-all
stays inside a node) and ring index j inside ring group i (ranks i, i+U, i+2U, ...).

    tokens:   ring layout (contiguous / zigzag) over R ring ranks gives segment Z_j;
              Z_j split contiguously into U pieces (earlier ones bigger); rank (j, i) holds piece i
    forward:  all-to-all inside the Ulysses group: (B, piece_i, H, D) -> (B, Z_j, H/U, D)
              ring / TokenRing attention over the ring group on Z_j, for those H/U heads
              all-to-all back: (B, Z_j, H/U, D) -> (B, piece_i, H, D)

The all-to-all is DeepSpeed-Ulysses' `deepspeed.sequence.layer.DistributedAttention` when
DeepSpeed is installed (pip install 'ringattn[deepspeed]'), otherwise ringattn's own
torch.distributed.all_to_all_single version below (same math; also used when use_deepspeed=False).
DeepSpeed's all-to-all needs equal pieces, so uneven pieces are padded to the longest before it
and the padding rows are dropped before the ring (never attended to).

DeepSpeed engines (ZeRO stage 1, 2 and 3) train a model wrapped by apply_sequence_parallel unchanged;
the engine averages gradients over its data-parallel ranks, which here include the sequence-
parallel ranks, so compute the loss with
`sequence_parallel_loss(logits, labels, grad_allreduce="mean")`. `deepspeed_config()` below
gives a minimal config; launch/deepspeed.sh runs the demo under the `deepspeed` launcher.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

_GROUPS: dict = {}
# Bytes this rank sent to other ranks in Ulysses all-to-alls (forward and backward), process-wide.
# ringattn.accounting counts the ring's point-to-point traffic; these collectives are counted here.
_A2A_SENT = [0]


def a2a_bytes_sent() -> int:
    return _A2A_SENT[0]


class _CountBackwardBytes(torch.autograd.Function):
    """Identity; its backward records the bytes the backward all-to-alls send (the same sizes as
    the forward's: dout travels the output's path back, dq/dk/dv the inputs')."""

    @staticmethod
    def forward(ctx, x, nbytes):
        ctx.nbytes = nbytes
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _A2A_SENT[0] += ctx.nbytes
        return g, None


def stale_jit_locks(max_age_s: float = 600.0) -> list[str]:
    """`lock` files older than max_age_s in torch's JIT extension directory (TORCH_EXTENSIONS_DIR,
    default ~/.cache/torch_extensions/py<ver>_<cuda>/<op>/lock).

    DeepSpeed JIT-builds ops there (on a CPU-only machine, at every `init_distributed`, its
    shared-memory comm op). torch.utils.cpp_extension serialises builds with that file: it is
    created before a build and removed after. A build that is killed (a timeout, Ctrl-C, OOM)
    leaves it behind, and from then on EVERY later load of that op on every rank waits for it
    forever, even when nothing needs building: a silent hang at start-up. Seen in this project's
    CI (a rank pool killed mid-build). An old lock with no build running can be deleted."""
    try:
        from torch.utils.cpp_extension import get_default_build_root
    except ImportError:  # pragma: no cover
        return []
    import glob
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    roots = [root] if root else glob.glob(os.path.join(get_default_build_root(), "*"))
    now = time.time()
    out = []
    for r in roots:
        for lock in glob.glob(os.path.join(r, "*", "lock")):
            try:
                if now - os.path.getmtime(lock) > max_age_s:
                    out.append(lock)
            except OSError:  # removed meanwhile: a build finished
                pass
    return sorted(out)


def _warn_stale_jit_locks() -> None:
    import warnings

    if torch.compiler.is_compiling():  # file-system probing is not traceable; eager calls warn
        return
    for lock in stale_jit_locks():
        warnings.warn(
            f"ringattn: {lock} is an old torch JIT-extension build lock; if no build is running it was "
            "left by a killed build, and DeepSpeed's next op load will wait for it forever (every rank "
            "hangs in init_distributed). Delete it and restart.", RuntimeWarning, stacklevel=3)


@torch.compiler.disable(reason="DeepSpeed's communication set-up (version checks, JIT op loads) is "
                        "not traceable; apply_sequence_parallel runs it eagerly first")
def init_deepspeed_comm() -> None:
    """deepspeed.comm over the torch.distributed world already initialised, once (idempotent).
    apply_sequence_parallel calls it eagerly for the 2-D mode with DeepSpeed's all-to-all, so a
    compiled model never traces it (torch 2.11's dynamo raised an internal error tracing DeepSpeed's
    `packaging` version parse)."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():  # wraps the torch.distributed world already initialised
        _warn_stale_jit_locks()
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.sequence.layer import DistributedAttention  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken accelerator probe
        return False
    return True


def make_ulysses_ring_groups(ulysses_size: int, group=None):
    """(ulysses_group, ring_group) of this rank for a 2-D split of `group` (default: the world).
    Collective over the DEFAULT group: every process must call it (torch.distributed.new_group
    requires it), in the same order. Groups are cached per (ranks, ulysses_size)."""
    ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    w = len(ranks)
    if ulysses_size < 1 or w % ulysses_size:
        raise ValueError(f"ringattn: ulysses_size={ulysses_size} must divide the group's {w} ranks")
    key = (tuple(ranks), ulysses_size)
    if key not in _GROUPS:
        u, r = ulysses_size, w // ulysses_size
        me = dist.get_rank()
        mine_u = mine_r = None
        # Every process creates every group (new_group is collective), keeps its own.
        for j in range(r):
            members = ranks[j * u:(j + 1) * u]
            g = dist.new_group(members)
            if me in members:
                mine_u = g
        # NCCL-only default backend: every ring group also gets a gloo twin for its per-call
        # metadata exchange (ringattn.comm.control_group: on the host, no GPU sync per layer).
        backend = str(dist.get_backend()).lower()
        twins = ("nccl" in backend and "cpu:" not in backend) or os.environ.get("RINGATTN_CONTROL_GROUP") == "gloo"
        mine_t = None
        for i in range(u):
            members = ranks[i::u]
            g = dist.new_group(members)
            t = dist.new_group(members, backend="gloo") if twins else None
            if me in members:
                mine_r, mine_t = g, t
        if mine_t is not None:
            from ringattn.comm import register_control_group
            register_control_group(mine_r, mine_t)
        _GROUPS[key] = (mine_u, mine_r)
    return _GROUPS[key]


# ----------------------------------------------------------------------------------------------
# ringattn's own Ulysses all-to-all (uneven pieces supported), differentiable.
# ----------------------------------------------------------------------------------------------
def _seq_to_heads(x: torch.Tensor, group, piece_lens: list[int]) -> torch.Tensor:
    """(B, piece_i, H, D) on Ulysses rank i -> (B, sum(piece_lens), H/U, D): head block i of
    every rank's piece, concatenated in rank order."""
    u = len(piece_lens)
    b, s, h, d = x.shape
    hl = h // u
    send = x.reshape(b, s, u, hl, d).permute(2, 0, 1, 3, 4).contiguous()  # (U, B, s, H/U, D): block c -> rank c
    recv = x.new_empty(b * sum(piece_lens) * hl * d)
    dist.all_to_all_single(recv, send.reshape(-1), output_split_sizes=[b * n * hl * d for n in piece_lens],
                           input_split_sizes=[b * s * hl * d] * u, group=group)
    parts = recv.split([b * n * hl * d for n in piece_lens])
    return torch.cat([p.view(b, n, hl, d) for p, n in zip(parts, piece_lens)], dim=1)


def _heads_to_seq(y: torch.Tensor, group, piece_lens: list[int], rank: int) -> torch.Tensor:
    """Inverse of _seq_to_heads: (B, sum(piece_lens), H/U, D) -> (B, piece_rank, H, D)."""
    u = len(piece_lens)
    b, _, hl, d = y.shape
    s = piece_lens[rank]
    send = torch.cat([p.reshape(-1) for p in y.split(piece_lens, dim=1)])  # piece c -> rank c
    recv = y.new_empty(u * b * s * hl * d)
    dist.all_to_all_single(recv, send, output_split_sizes=[b * s * hl * d] * u,
                           input_split_sizes=[b * n * hl * d for n in piece_lens], group=group)
    return recv.view(u, b, s, hl, d).permute(1, 2, 0, 3, 4).reshape(b, s, u * hl, d)


# The two all-to-alls as custom ops (differentiable: each one's backward is the other), so that
# torch.compile keeps them out of the graph as single nodes (no graph break) and each counts the
# bytes it really sends when it runs, forward or backward (uneven pieces included).
@torch.library.custom_op("ringattn::ulysses_seq_to_heads", mutates_args=())
def seq_to_heads_op(x: torch.Tensor, group_name: str, piece_lens: list[int], rank: int) -> torch.Tensor:
    """(B, piece_rank, H, D) -> (B, sum(piece_lens), H/U, D) over the Ulysses group."""
    from ringattn.compiled import resolve_group

    x = x.contiguous()
    _A2A_SENT[0] += x.numel() * x.element_size() * (len(piece_lens) - 1) // len(piece_lens)
    return _seq_to_heads(x, resolve_group(group_name), list(piece_lens)).contiguous()


@seq_to_heads_op.register_fake
def _(x, group_name, piece_lens, rank):
    b, _, h, d = x.shape
    return x.new_empty((b, sum(piece_lens), h // len(piece_lens), d))


@torch.library.custom_op("ringattn::ulysses_heads_to_seq", mutates_args=())
def heads_to_seq_op(y: torch.Tensor, group_name: str, piece_lens: list[int], rank: int) -> torch.Tensor:
    """(B, sum(piece_lens), H/U, D) -> (B, piece_rank, H, D) over the Ulysses group."""
    from ringattn.compiled import resolve_group

    y = y.contiguous()
    b, _, hl, d = y.shape
    _A2A_SENT[0] += (sum(piece_lens) - piece_lens[rank]) * b * hl * d * y.element_size()
    # contiguous, as the fake says (with one head per rank the final reshape is a strided view)
    return _heads_to_seq(y, resolve_group(group_name), list(piece_lens), rank).contiguous()


@heads_to_seq_op.register_fake
def _(y, group_name, piece_lens, rank):
    b, _, hl, d = y.shape
    return y.new_empty((b, piece_lens[rank], hl * len(piece_lens), d))


def _a2a_setup(ctx, inputs, output):
    _, ctx.group_name, ctx.piece_lens, ctx.rank = inputs


seq_to_heads_op.register_autograd(
    lambda ctx, g: (heads_to_seq_op(g, ctx.group_name, ctx.piece_lens, ctx.rank), None, None, None),
    setup_context=_a2a_setup)
heads_to_seq_op.register_autograd(
    lambda ctx, g: (seq_to_heads_op(g, ctx.group_name, ctx.piece_lens, ctx.rank), None, None, None),
    setup_context=_a2a_setup)


# ----------------------------------------------------------------------------------------------
# The 2-D attention.
# ----------------------------------------------------------------------------------------------
def _piece_lengths(plan, seg_len_local: int) -> list[int]:
    """Lengths of the U pieces of this rank's ring segment (one tiny all-gather of lengths)."""
    n = torch.tensor([seg_len_local], dtype=torch.int64,
                     device="cuda" if dist.get_backend(plan.ulysses_group) == "nccl" else "cpu")
    ns = [torch.zeros_like(n) for _ in range(plan.ulysses_size)]
    dist.all_gather(ns, n, group=plan.ulysses_group)
    return [int(t) for t in ns]


def ulysses_ring_attention(q, k, v, *, plan, causal: bool = True, softmax_scale: float | None = None,
                           use_deepspeed: bool | None = None, cu_seqlens=None, sliding_window: int | None = None,
                           sinks=None, softcap=None):
    """2-D sequence-parallel attention. q: (batch, piece, heads_q, head_dim); k, v: (batch, piece,
    heads_kv, head_dim), this rank's piece as laid out by plan.shard. Returns (batch, piece,
    heads_q, head_dim). Differentiable. `plan` is a SequenceParallelPlan with ulysses_size > 1.

    cu_seqlens: packed sequences, the GLOBAL document boundaries (default: the ones the model's
    pre-hook took from its cu_seqlens= kwarg). The all-to-all rebuilds ring segment Z_j in token
    order, so the ring group's sequence is the global one laid out over the R ring ranks and the
    same global boundaries hold there unchanged: the ring / TokenRing call masks by document.
    sliding_window: a causal window in global positions, the same way.
    sinks: (heads_q,) attention-sink logits (ringattn.sinks); Ulysses rank i runs head block i, so
    it passes the ring sinks[i * heads_q/U : (i + 1) * heads_q/U] (a differentiable slice)."""
    from ringattn.integrations.huggingface import _sp_module

    sequence_parallel_attention, _, _ = _sp_module()
    u = plan.ulysses_size
    hq, hkv = q.shape[2], k.shape[2]
    if hq % u or hkv % u:
        raise ValueError(
            f"ringattn: Ulysses over {u} ranks splits heads: heads_q={hq} and heads_kv={hkv} must both be "
            f"multiples of {u} (choose ulysses_size dividing {hkv})"
        )
    if plan._seq_len is not None:
        piece_lens = [plan.local_lengths(plan._seq_len)[plan.ring_rank * u + i] for i in range(u)]
    else:
        piece_lens = _piece_lengths(plan, q.shape[1])
    if q.shape[1] != piece_lens[plan.ulysses_rank]:
        raise ValueError(f"ringattn: got {q.shape[1]} tokens, expected {piece_lens[plan.ulysses_rank]} for this rank")

    docs = plan._documents if cu_seqlens is None else cu_seqlens
    if sinks is not None:
        from ringattn.sinks import sinks_problem

        if sinks_problem(sinks, hq, q.device) is None:  # (else passed on whole: the ring's check names it
            hl = hq // u                                    # on every rank instead of this rank alone)
            sinks = sinks[plan.ulysses_rank * hl:(plan.ulysses_rank + 1) * hl]  # this rank's head block

    def ring(qs, ks, vs):  # (B, Z_j, H/U, D) -> same, over the ring group
        return sequence_parallel_attention(
            qs, ks, vs, causal=causal, softmax_scale=softmax_scale, group=plan.ring_group,
            layout=plan.layout, backend=plan.backend, algorithm=plan.ring_algorithm, cu_seqlens=docs,
            sliding_window=sliding_window, sinks=sinks, softcap=softcap,
        )

    want_ds = plan.use_deepspeed if use_deepspeed is None else use_deepspeed
    if want_ds is None:
        want_ds = deepspeed_available()
    if not want_ds:  # ringattn's all-to-alls: custom ops that count their own bytes
        from ringattn.compiled import group_name

        args = (group_name(plan.ulysses_group), piece_lens, plan.ulysses_rank)
        qs, ks, vs = (seq_to_heads_op(t, *args) for t in (q, k, v))
        return heads_to_seq_op(ring(qs, ks, vs), *args)
    # DeepSpeed's: each all-to-all keeps 1/U of a tensor (pieces padded to the longest) and sends
    # the rest: q, k, v, then the output (q's shape); the backward sends the same again.
    per_row = (2 * q[0, 0].numel() + k[0, 0].numel() + v[0, 0].numel()) * q.shape[0] * q.element_size()
    nbytes = max(piece_lens) * per_row * (u - 1) // u
    _A2A_SENT[0] += nbytes
    out = _ulysses_deepspeed(q, k, v, plan, piece_lens, ring)
    # (under torch.compile the backward's share is not counted: a counter inside an autograd
    # Function is a side effect Dynamo cannot trace, a graph break per layer)
    return _CountBackwardBytes.apply(out, nbytes) if out.requires_grad and not torch.compiler.is_compiling() else out


def _ulysses_deepspeed(q, k, v, plan, piece_lens, ring):
    """The same 2-D attention with DeepSpeed-Ulysses' DistributedAttention doing the all-to-all
    (batch-first: scatter heads = dim 2, gather sequence = dim 1)."""
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():  # (apply_sequence_parallel did it already: no graph break here)
        init_deepspeed_comm()
    pad = max(piece_lens)
    s = q.shape[1]
    if s < pad:  # DeepSpeed's all-to-all needs equal pieces: pad, and drop the pads below
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad - s)) for t in (q, k, v))
    valid = torch.cat([torch.arange(c * pad, c * pad + n) for c, n in enumerate(piece_lens)]).to(q.device)

    def local_attention(qs, ks, vs, *args, **kwargs):  # (B, U*pad, H/U, D), pads inside
        if len(valid) != qs.shape[1]:
            qs, ks, vs = (t.index_select(1, valid) for t in (qs, ks, vs))
            out = ring(qs, ks, vs)
            return out.new_zeros(out.shape[0], pad * len(piece_lens), *out.shape[2:]).index_copy(1, valid, out)
        return ring(qs.contiguous(), ks.contiguous(), vs.contiguous())

    attn = DistributedAttention(local_attention, plan.ulysses_group, scatter_idx=2, gather_idx=1)
    run = attn if _TRACE_DEEPSPEED_A2A else _eager_under_compile(attn)
    out = run(q, k, v, 0)  # batch_dim_idx=0
    return out[:, :s]


# torch.compile traces DeepSpeed's all-to-all (its autograd.Function around dist.all_to_all_single)
# correctly on torch 2.12, 2.13 and 2.14 (tested: gradients equal the single-process model's). On
# torch 2.11 the traced model's forward was right but q/k/v got NO gradient (zeros; 2026-12-02,
# DeepSpeed 0.19.8, tests/test_compile.py): a silent wrong answer. On 2.11 the DeepSpeed all-to-all
# and the ring inside it therefore run eagerly: one graph break per attention layer.
_TRACE_DEEPSPEED_A2A = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


def _eager_under_compile(fn):
    return torch.compiler.disable(fn, reason="DeepSpeed's all-to-all loses its gradients when traced by "
                                             "torch 2.11 (ringattn.integrations.deepspeed)")


# ----------------------------------------------------------------------------------------------
# DeepSpeed engine helpers.
# ----------------------------------------------------------------------------------------------
def deepspeed_config(zero_stage: int = 1, micro_batch: int = 1, **extra) -> dict:
    """Minimal DeepSpeed config for training a sequence-parallel model (fp32, client optimizer).

    Every rank of the sequence-parallel group is also a data-parallel rank to DeepSpeed (which
    averages gradients over them), hence sequence_parallel_loss(..., grad_allreduce="mean")."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0; off unless asked for
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    return cfg


def initialize_engine(model, optimizer, zero_stage: int = 1, config: dict | None = None):
    """deepspeed.initialize on an already-initialised torch.distributed world (any launcher:
    torchrun, mpirun, the deepspeed launcher). Returns the engine."""
    import deepspeed

    if not dist.is_initialized():
        raise RuntimeError("ringattn: initialise torch.distributed first (ringattn.distributed.init_distributed())")
    # DeepSpeed's engine insists on LOCAL_RANK (torchrun and its own launcher set it; mpirun sets
    # OMPI_COMM_WORLD_LOCAL_RANK; a process pool or a plain script sets neither).
    if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(dist.get_rank() % max(torch.cuda.device_count(), 1)
                                       if torch.cuda.is_available() else dist.get_rank())
    init_deepspeed_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=config or deepspeed_config(zero_stage))
    return engine
