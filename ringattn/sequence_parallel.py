"""Sequence-parallel attention: the public entry points, input validation, the metadata exchange
and algorithm="auto".

    out = ring_attention(q, k, v, causal=True, group=None, layout="zigzag")        # KV rotation
    out = token_ring_attention(q, k, v, causal=True, layout="zigzag")              # Q rotation
    out = sequence_parallel_attention(q, k, v, causal=True, algorithm="auto")      # picks one
    out, lse = ring_attention(q, k, v, return_lse=True)

q: (batch, seq_local, heads_q, head_dim); k, v: (batch, seq_local, heads_kv, head_dim), heads_q a
multiple of heads_kv (GQA/MQA; K/V never repeated). Each rank passes its own tokens of the global
sequence in `layout` (ringattn.layout; shard_sequence cuts them). Returns out like q (and lse
(batch, heads_q, seq_local) fp32 with return_lse=True; lse carries no gradient unless lse_grad=True,
either algorithm: docs/sequence_parallel.md). Differentiable
in q, k, v.

Every call starts with ONE all_gather of a small int64 signature per rank over the group
(_Signature): shapes, dtypes, device type, head counts, causal, layout, algorithm, scale, group
size and ranks, whether a backward will follow, and this rank's local problems. Every rank then
runs the same checks on the same table, so a mismatch raises the same ValueError on every rank
within one collective's latency (never a hang in the ring, never garbage); the table also gives
every rank's seq_local, i.e. the chunk table of uneven layouts. The backward reuses it.
torch.distributed not initialised (and group=None): a world of one, no communication.
A rank left alone in that exchange (another rank passed a different group, or called in another
order) raises a RuntimeError after RINGATTN_SYNC_TIMEOUT_S seconds (default 120) instead of
hanging until the process-group timeout.
The exchange runs on the host: on the group itself when it has a CPU backend, else on its gloo
twin (comm.control_group), so it never waits for the GPU queue.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import struct
import time
import zlib

import torch
import torch.distributed as dist

from ringattn.accounting import CommStats, comm_stats  # noqa: F401  (re-exported)
from ringattn.block_attention import block_attn_forward, check_softcap
from ringattn import hardware as auto_hw
from ringattn.documents import (as_documents, documents_count, documents_crc, documents_length,
                                documents_rows_problem, packed, per_row)
from ringattn.layout import (LAYOUTS, RingPlan, SequenceLayout, collective_device, dtype_code,  # noqa: F401
                             gather_sequence, group_rank_and_size, no_autocast, seq_len_error, shard_sequence)
from ringattn.ring_attention import RingAttention, ring_comm_bytes
from ringattn.sinks import sink_lse, sinks_problem
from ringattn.token_ring import TokenRingAttention, token_ring_comm_bytes
from ringattn.ulysses import UlyssesAttention, heads_problem, ulysses_comm_bytes

# GPUs in one NVLink/NVSwitch node: the default topology of auto's cost model is "nvswitch" up to
# this world size and "inter_node" above it (ringattn.hardware, choose_algorithm).
MESH_MAX_WORLD = auto_hw.MESH_MAX_WORLD

ALGORITHMS = ("ring", "token_ring")

_MAGIC = 0x52494E47_08  # "RING", signature version 8 (2: lse_grad, 3: cu_seqlens, 4: sliding_window, 5: sinks,
#                          6: the hardware auto assumes, 7: v's head dim may differ from q/k's, 8: softcap)
_ALG_CODE = {"auto": 0, "ring": 1, "token_ring": 2, "ulysses": 3}
_LAYOUT_CODE = {"contiguous": 1, "zigzag": 2}
_DEVICE_CODE = {"cpu": 1, "cuda": 2, "meta": 3, "xpu": 4, "mps": 5}


# --------------------------------------------------------------------------------------------
# Local checks: each problem is one bit, so every rank can name every rank's problems.

_PROBLEMS = (
    "q, k and v must all be torch.Tensors",
    "q, k and v must be 4-D: q (batch, seq_local, heads_q, head_dim), k/v (batch, seq_local, heads_kv, head_dim)",
    "q, k and v must be floating point",
    "k and v must agree on batch, seq_local and heads_kv (v's head dim may differ: MLA)",
    "q and k/v must agree on batch and seq_local, and q and k on head_dim",
    "heads_q must be a positive multiple of heads_kv",
    "q, k and v must have the same dtype",
    "q, k and v must be on the same device",
    "the requested block-attention backend cannot run these inputs",
    "softmax_scale must be a finite number > 0",
    "unknown layout (choose 'contiguous' or 'zigzag')",
    "unknown algorithm (choose 'auto', 'ring', 'token_ring' or 'ulysses')",
    "batch, heads and head_dim must be > 0",
    "cu_seqlens must be the global document boundaries: 0, then strictly increasing ints (a list or a 1-D "
    "integer tensor; or one such row per batch row)",
    "sliding_window must be None or an int >= 1 (keys each query sees, itself included), with causal=True",
    "sinks must be None or a 1-D floating tensor of heads_q logits (one per query head) on q's device",
    "algorithm='auto' cannot use the hardware description set by RINGATTN_AUTO_PROFILE / "
    "RINGATTN_AUTO_TOPOLOGY (ringattn.hardware)",
    "softcap must be None, 0 (off) or a finite number > 0",
)
(_P_NOT_TENSOR, _P_NOT_4D, _P_NOT_FLOAT, _P_KV_SHAPE, _P_QK_SHAPE, _P_HEADS, _P_DTYPES, _P_DEVICES,
 _P_BACKEND, _P_SCALE, _P_LAYOUT, _P_ALGORITHM, _P_EMPTY, _P_DOCS, _P_WINDOW, _P_SINKS,
 _P_HARDWARE, _P_SOFTCAP) = (1 << i for i in range(len(_PROBLEMS)))


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


_FIELDS = ("magic", "algorithm", "layout", "causal", "group_size", "group_ranks",
           "q0", "q1", "q2", "q3", "k0", "k1", "k2", "k3", "v0", "v1", "v2", "v3",
           "q_dtype", "k_dtype", "v_dtype", "device", "scale", "grad", "lse_grad", "docs_n", "docs_crc",
           "window", "sinks", "hardware", "softcap", "problems")
_IX = {f: i for i, f in enumerate(_FIELDS)}


@dataclasses.dataclass
class _Local:
    sig: list            # len(_FIELDS) ints
    error: Exception | None  # the local detail behind the problem bits (raised as __cause__)
    documents: tuple | None = None  # cu_seqlens as a tuple (ringattn.documents), None: one sequence


@functools.lru_cache(maxsize=256)
def _ranks_crc(global_ranks: tuple) -> int:
    return zlib.crc32(",".join(map(str, global_ranks)).encode())


def window_problem(sliding_window, causal) -> str | None:
    """What is wrong with a sliding_window argument (None: fine)."""
    if sliding_window is None:
        return None
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
        return f"sliding_window must be None or an int >= 1, got {sliding_window!r}"
    if not causal:
        return "sliding_window needs causal=True (a causal sliding window: 0 <= q - k < sliding_window)"
    return None


def _local_signature(fn, q, k, v, *, algorithm, layout, causal, softmax_scale, backend, world,
                     global_ranks, grad=None, lse_grad=False, cu_seqlens=None, sliding_window=None,
                     sinks=None, softcap=None) -> _Local:
    sig = [-1] * len(_FIELDS)
    sig[_IX["magic"]] = _MAGIC
    sig[_IX["group_size"]] = world
    sig[_IX["group_ranks"]] = _ranks_crc(tuple(global_ranks))
    sig[_IX["causal"]] = int(bool(causal))
    sig[_IX["lse_grad"]] = int(bool(lse_grad))
    problems, error = 0, None
    docs, docs_problem = as_documents(cu_seqlens)
    if not docs_problem and isinstance(q, torch.Tensor) and q.dim() == 4:
        docs_problem = documents_rows_problem(docs, q.shape[0])
    if docs_problem:
        problems |= _P_DOCS
        error = ValueError(f"{fn}: {docs_problem}")
        docs = None
    elif docs is not None:
        sig[_IX["docs_n"]] = documents_count(docs)
        sig[_IX["docs_crc"]] = documents_crc(docs)
    w_problem = window_problem(sliding_window, causal)
    if w_problem:
        problems |= _P_WINDOW
        error = error or ValueError(f"{fn}: {w_problem}")
    elif sliding_window is not None:
        sig[_IX["window"]] = min(sliding_window, 1 << 62)  # (an int64 field; >= any sequence length)
    try:
        cap = check_softcap(fn, softcap)
        sig[_IX["softcap"]] = _float_bits(cap) if cap else -1
    except ValueError as e:
        cap = 0.0
        problems |= _P_SOFTCAP
        error = error or e
    if sinks is not None:
        four_d = isinstance(q, torch.Tensor) and q.dim() == 4
        s_problem = sinks_problem(sinks, q.shape[2] if four_d else None, q.device if four_d else None)
        if s_problem:
            problems |= _P_SINKS
            error = error or ValueError(f"{fn}: {s_problem}")
        else:
            sig[_IX["sinks"]] = sinks.shape[0]
    if algorithm in _ALG_CODE:
        sig[_IX["algorithm"]] = _ALG_CODE[algorithm]
        if algorithm == "auto" and world > 1:  # every rank must predict with the same hardware
            try:
                hw = auto_hw.current(q.device.type, q.device) if isinstance(q, torch.Tensor) else auto_hw.current("cpu")
                sig[_IX["hardware"]] = hw.fingerprint
                if cap:  # softcapped blocks are timed as what they run on here (flash_attn or math): alike too
                    blocks = _softcap_blocks(cap, q.device.type if isinstance(q, torch.Tensor) else "cpu", hw)
                    sig[_IX["hardware"]] = zlib.crc32(f"{hw.fingerprint}/{blocks}".encode())
            except ValueError as e:
                problems |= _P_HARDWARE
                error = error or ValueError(f"{fn}: {e}")
    else:
        problems |= _P_ALGORITHM
    if layout in _LAYOUT_CODE:
        sig[_IX["layout"]] = _LAYOUT_CODE[layout]
    else:
        problems |= _P_LAYOUT
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        problems |= _P_NOT_TENSOR
    else:
        for name, t in zip("qkv", tensors):
            if t.dim() == 4:
                for i in range(4):
                    sig[_IX[f"{name}{i}"]] = t.shape[i]
            sig[_IX[f"{name}_dtype"]] = dtype_code(t.dtype)
        sig[_IX["device"]] = _DEVICE_CODE.get(q.device.type, 99)
        if grad is None:  # the traced path (ringattn.compiled) passes it: autograd is off inside a custom op
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors + (
                (sinks,) if isinstance(sinks, torch.Tensor) else ()))
        sig[_IX["grad"]] = int(bool(grad))
        if any(t.dim() != 4 for t in tensors):
            problems |= _P_NOT_4D
        else:
            if k.shape[:3] != v.shape[:3]:
                problems |= _P_KV_SHAPE
            if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
                problems |= _P_QK_SHAPE
            if min(q.shape[0], q.shape[2], q.shape[3], k.shape[2], v.shape[3]) <= 0:
                problems |= _P_EMPTY
            elif q.shape[2] % k.shape[2] != 0:
                problems |= _P_HEADS
        if not all(t.is_floating_point() for t in tensors):
            problems |= _P_NOT_FLOAT
        if not (q.dtype == k.dtype == v.dtype):
            problems |= _P_DTYPES
        if not (q.device == k.device == v.device):
            problems |= _P_DEVICES
    scale = softmax_scale
    if scale is None and not problems & (_P_NOT_TENSOR | _P_NOT_4D | _P_EMPTY):
        scale = 1.0 / math.sqrt(q.shape[3])
    if scale is not None:
        try:
            scale = float(scale)
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError
            sig[_IX["scale"]] = _float_bits(scale)
        except (TypeError, ValueError):
            problems |= _P_SCALE
    if not problems & ~(_P_DOCS | _P_WINDOW | _P_SINKS | _P_SOFTCAP) and backend != "auto":
        try:  # zero-length probe: the backend's support checks run, nothing is computed
            block_attn_forward(q[:, :0], k[:, :0], v[:, :0], causal=bool(causal), softmax_scale=scale,
                               backend=backend, softcap=cap)
        except (ValueError, RuntimeError) as e:
            problems |= _P_BACKEND
            error = error or e
    if problems and error is None:
        error = ValueError(f"{fn}: " + "; ".join(p for i, p in enumerate(_PROBLEMS) if problems >> i & 1))
    sig[_IX["problems"]] = problems
    return _Local(sig, error, docs)


def _describe(field: str, value: int) -> str:
    if field == "scale":
        return f"{_bits_float(value):.6g}" if value != -1 else "?"
    if field == "softcap":
        return f"{_bits_float(value):.6g}" if value != -1 else "none"
    if field == "algorithm":
        return {v: k for k, v in _ALG_CODE.items()}.get(value, "?")
    if field == "layout":
        return {v: k for k, v in _LAYOUT_CODE.items()}.get(value, "?")
    if field == "device":
        return {v: k for k, v in _DEVICE_CODE.items()}.get(value, "other")
    if field in ("causal", "grad", "lse_grad"):
        return str(bool(value))
    if field == "hardware":
        name = auto_hw.builtin_name(value)  # (only the built-ins: every rank knows their names)
        return f"{value:#010x}" + (f" (built-in {name!r})" if name else
                                   " (set by the user, or with softcap= combined with the blocks' backend)")
    return str(value)


# What every rank must agree on: (description, fields). seq_local may differ (uneven layouts).
_AGREE = (
    ("the call (ranks called different ringattn functions or versions)", ("magic",)),
    ("algorithm", ("algorithm",)), ("layout", ("layout",)), ("causal", ("causal",)),
    ("group size", ("group_size",)), ("group ranks (crc32)", ("group_ranks",)),
    ("batch size", ("q0",)), ("heads_q", ("q2",)), ("heads_kv", ("k2",)), ("head_dim", ("q3",)),
    ("v's head_dim", ("v3",)),
    ("dtype (dtype codes q, k, v)", ("q_dtype", "k_dtype", "v_dtype")), ("device type", ("device",)),
    ("softmax_scale", ("scale",)),
    ("whether a backward follows (requires_grad with grad mode on)", ("grad",)),
    ("lse_grad", ("lse_grad",)),
    ("cu_seqlens (number of documents, crc32 of the boundaries; -1: none)", ("docs_n", "docs_crc")),
    ("sliding_window (-1: none)", ("window",)),
    ("sinks (number of sink logits; -1: none)", ("sinks",)),
    ("softcap", ("softcap",)),
    ("the hardware algorithm='auto' assumes (crc32 of its cost-model profile and topology: set it alike on "
     "every rank with ringattn.set_auto_hardware or RINGATTN_AUTO_PROFILE / RINGATTN_AUTO_TOPOLOGY; with softcap=, "
     "also whether the flash_attn package, which takes it, is installed)", ("hardware",)),
)


_AGREE_KEY = operator.itemgetter(*sorted({_IX[f] for _, fields in _AGREE for f in fields}))


def _check_table(fn: str, sigs: list[list[int]], layout: str,
                 documents: tuple | None = None) -> tuple[str | None, SequenceLayout | None]:
    """The one error message every rank raises (None if the table is consistent), and the layout."""
    W = len(sigs)
    lines = []
    for r, s in enumerate(sigs):
        bits = s[_IX["problems"]]
        if bits:
            lines.append(f"rank {r}: " + "; ".join(p for i, p in enumerate(_PROBLEMS) if bits >> i & 1)
                         + (f" (backend problem on q {_describe('device', s[_IX['device']])}, head_dim "
                            f"{s[_IX['q3']]})" if bits & _P_BACKEND else ""))
    if not lines and len({_AGREE_KEY(s) for s in sigs}) > 1:  # (one C-level pass when all agree)
        for what, fields in _AGREE:
            values = [tuple(s[_IX[f]] for f in fields) for s in sigs]
            if len(set(values)) > 1:
                shown = ", ".join(f"rank {r}: " + "/".join(_describe(f, x) for f, x in zip(fields, val))
                                  for r, val in enumerate(values))
                lines.append(f"ranks disagree on {what}: {shown}")
    if lines:
        return "\n  - ".join([f"{fn}: inconsistent inputs across the {W} ranks of the group "
                              "(nothing was computed)"] + lines), None
    lengths = [s[_IX["q1"]] for s in sigs]
    L = sum(lengths)
    problem = seq_len_error(L, W, layout)
    if problem:
        return f"{fn}: ranks hold {lengths} tokens: {problem}", None
    lay = SequenceLayout.build(L, W, layout)
    if tuple(lengths) != lay.local_lengths:
        return (f"{fn}: ranks hold {lengths} tokens (seq_local of ranks 0..{W - 1}), but layout={layout!r} "
                f"cuts a global sequence of {L} tokens into {list(lay.local_lengths)} (split_sizes: "
                f"earlier chunks take the extra tokens)"), None
    if documents is not None and documents_length(documents) != L:
        return (f"{fn}: cu_seqlens ends at {documents_length(documents)}, but the ranks hold {L} tokens in all ({lengths}): "
                "cu_seqlens are the GLOBAL document boundaries of the whole packed sequence, ending at its "
                "length (the same on every rank), not the local shard's"), None
    return None, lay


# How long a rank waits in the signature exchange for the other ranks of its group before it
# raises instead of hanging (seconds; env RINGATTN_SYNC_TIMEOUT_S). A rank that waits that long
# was left alone: another rank passed a different group, called the ranks' functions in another
# order, skipped a layer, or is stuck elsewhere -- none of which the exchange itself can see.
SYNC_TIMEOUT_S = 120.0
_CALLS: dict = {}  # group (id) -> calls this process made on it (for the timeout message)


def sync_timeout_s() -> float:
    raw = os.environ.get("RINGATTN_SYNC_TIMEOUT_S")
    if raw is None:
        return SYNC_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"RINGATTN_SYNC_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"RINGATTN_SYNC_TIMEOUT_S must be > 0, got {raw!r}")
    return value


def _left_alone(fn: str, global_ranks: list[int], call: int, timeout_s: float) -> str:
    return (f"{fn}: rank {dist.get_rank()} waited {timeout_s:.0f} s in the metadata exchange of call "
            f"#{call} on the group of global ranks {global_ranks}, and not every rank of that group "
            "joined. Every rank of the group must make the same sequence-parallel calls with the SAME "
            "group, in the same order: check that no rank passed a different group (or group=None for "
            "another), skipped a layer, or failed/stalled elsewhere. The exchange is left posted, so "
            "this group cannot be used again in this process. (Timeout: RINGATTN_SYNC_TIMEOUT_S.)")


def _wait_or_raise(work, *, fn: str, global_ranks: list[int], call: int, timeout_s: float) -> None:
    """Poll `work` until it completes; after timeout_s raise a RuntimeError naming the group.

    Polling (not work.wait()) because neither gloo nor NCCL gives up on a collective that some
    member never joins before the process-group timeout (10-30 minutes). The abandoned
    collective stays posted: the group is unusable afterwards (say so in the message)."""
    start = time.monotonic()
    while not work.is_completed():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise RuntimeError(_left_alone(fn, global_ranks, call, timeout_s))
        # Yield-spin for the first second (the usual wait: gloo's ~100 us, or NCCL's until the GPU
        # drained the queue -- a sleep here would leave the GPU idle after it), then 1 ms naps.
        time.sleep(0 if waited < 1.0 else 0.001)
    work.wait()  # raises the backend's own error, if the collective failed


def _exchange(fn: str, group, world: int, global_ranks: list[int], local: _Local,
              device: torch.device) -> list[list[int]]:
    if world == 1:
        return [local.sig]
    key = "WORLD" if group is None or group is dist.GroupMember.WORLD else id(group)
    _CALLS[key] = call = _CALLS.get(key, 0) + 1
    from ringattn.comm import ControlGroupTimeout, control_group

    try:
        cgroup, device = control_group(group, device)  # on the host: a gloo twin of an NCCL-only group
    except ControlGroupTimeout as e:
        raise RuntimeError(_left_alone(fn, global_ranks, call, sync_timeout_s())) from e
    mine = torch.tensor(local.sig, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(table, mine, group=cgroup, async_op=True)
    _wait_or_raise(work, fn=fn, global_ranks=global_ranks, call=call, timeout_s=sync_timeout_s())
    return [t.tolist() for t in table]


def effective_window(sliding_window, seq_len: int) -> int | None:
    """The window the plan uses: None when it reaches the whole sequence (plain causal attention)."""
    return None if sliding_window is None or sliding_window >= seq_len else int(sliding_window)


def _prepare(fn: str, q, k, v, *, algorithm, causal, softmax_scale, group, layout, backend, grad=None,
             lse_grad=False, cu_seqlens=None, sliding_window=None, sinks=None, softcap=None):
    """Validate across ranks; return (plan, q, k, v contiguous, requires backward)."""
    rank, world = group_rank_and_size(group)
    if world > 1:
        global_ranks = dist.get_process_group_ranks(group or dist.GroupMember.WORLD)
    else:
        global_ranks = [dist.get_rank() if dist.is_initialized() else 0]
    local = _local_signature(fn, q, k, v, algorithm=algorithm, layout=layout, causal=causal,
                             softmax_scale=softmax_scale, backend=backend, world=world,
                             global_ranks=global_ranks, grad=grad, lse_grad=lse_grad, cu_seqlens=cu_seqlens,
                             sliding_window=sliding_window, sinks=sinks, softcap=softcap)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    sigs = _exchange(fn, group, world, global_ranks, local,
                     collective_device(group, device) if world > 1 else device)
    # One prefix for every entry point: ranks that called different ones get the same message.
    message, lay = _check_table("ringattn sequence-parallel attention", sigs, layout, local.documents)
    if message:
        raise ValueError(message) from local.error
    if algorithm == "ulysses" and (problem := heads_problem(q.shape[2], k.shape[2], world)):
        raise ValueError(f"ringattn sequence-parallel attention: {problem}")  # (every rank: they agree on heads)
    scale = _bits_float(sigs[0][_IX["scale"]])
    docs = packed(local.documents)  # one document: plain attention
    cap = sigs[0][_IX["softcap"]]
    plan = RingPlan(group, rank, world, lay, bool(causal), scale, backend, docs,
                    effective_window(sliding_window, lay.seq_len), _bits_float(cap) if cap != -1 else 0.0)
    # Non-contiguous inputs (e.g. a transposed (B, H, S, D) view) are accepted: one copy here,
    # since what travels must be contiguous.
    return plan, q.contiguous(), k.contiguous(), v.contiguous(), bool(sigs[0][_IX["grad"]])


# --------------------------------------------------------------------------------------------
# Bytes and the auto rule


def _elem_size(dtype) -> int:
    return dtype.itemsize if isinstance(dtype, torch.dtype) else int(dtype)


def predict_comm_bytes(algorithm: str, *, seq_len: int, world_size: int, layout: str = "contiguous",
                       causal: bool = False, batch: int, heads_q: int, heads_kv: int, head_dim: int,
                       dtype=torch.bfloat16, backward: bool = True, lse_grad: bool = False,
                       cu_seqlens=None, sliding_window=None,
                       v_head_dim: int | None = None) -> list[dict[str, tuple[int, int]]]:
    """Bytes each rank sends and receives per channel in one call (forward, plus backward when
    `backward`): a list indexed by group rank of {channel: (sent, received)}. The formulas are
    ring_attention.ring_comm_bytes and token_ring.token_ring_comm_bytes (docs/sequence_parallel.md).
    dtype: of q/k/v (or its element size in bytes). lse_grad: the call had lse_grad=True.
    cu_seqlens: the call's packed-sequence boundaries (TokenRing skips pairs sharing no document).
    sliding_window: the call's causal sliding window (TokenRing skips pairs it never reaches).
    v_head_dim: v's head dim when it differs from q/k's head_dim (MLA): v, dv, out and dout
    travel with it."""
    lay = SequenceLayout.build(seq_len, world_size, layout)
    docs = _documents_arg(cu_seqlens, seq_len, batch)
    window = _window_arg(sliding_window, causal, seq_len)
    e = _elem_size(dtype)
    if algorithm == "ring":
        plan = RingPlan(None, 0, world_size, lay, bool(causal), 1.0, "auto", docs, window)
        hops = tuple(tuple(m for _, m in h) for h in plan.kv_hops)
        return [ring_comm_bytes(lay, r, batch=batch, heads_kv=heads_kv, head_dim=head_dim, elem_size=e,
                                backward=backward, steps=plan.ring_steps, hops=hops, direction=plan.direction,
                                v_head_dim=v_head_dim)
                for r in range(world_size)]
    if algorithm == "ulysses":
        problem = heads_problem(heads_q, heads_kv, world_size)
        if problem:
            raise ValueError(problem)
        return [ulysses_comm_bytes(lay, r, batch=batch, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                                   elem_size=e, backward=backward, lse_grad=lse_grad, v_head_dim=v_head_dim)
                for r in range(world_size)]
    if algorithm == "token_ring":
        return [token_ring_comm_bytes(lay, r, causal=causal, batch=batch, heads_q=heads_q, head_dim=head_dim,
                                      elem_size=e, backward=backward, lse_grad=lse_grad, documents=docs,
                                      window=window, v_head_dim=v_head_dim)
                for r in range(world_size)]
    raise ValueError(f"algorithm must be one of {ALGORITHMS + ('ulysses',)}, got {algorithm!r}")


def bottleneck_bytes(per_rank: list[dict[str, tuple[int, int]]]) -> int:
    """The busiest rank's traffic in predict_comm_bytes' per-rank {channel: (sent, received)}:
    max over ranks of max(bytes sent, bytes received) (0 for no ranks)."""
    return max((max(sum(s for s, _ in ch.values()), sum(r for _, r in ch.values())) for ch in per_rank), default=0)


def _window_arg(sliding_window, causal, seq_len: int) -> int | None:
    """sliding_window of a single-process helper, checked (ValueError), as the plan would use it."""
    problem = window_problem(sliding_window, causal)
    if problem:
        raise ValueError(problem)
    return effective_window(sliding_window, seq_len)


def _documents_arg(cu_seqlens, seq_len: int, batch: int | None = None) -> tuple | None:
    """cu_seqlens of a single-process helper, checked (ValueError); None for one document."""
    docs, problem = as_documents(cu_seqlens)
    if problem:
        raise ValueError(problem)
    if docs is not None and documents_length(docs) != seq_len:
        raise ValueError(f"cu_seqlens ends at {documents_length(docs)}, but seq_len is {seq_len}")
    if per_row(docs) and batch is not None and len(docs) != batch:
        raise ValueError(documents_rows_problem(docs, batch))
    return packed(docs)


# algorithm="auto" follows ringattn.cost_model; a predicted gap below this fraction is inside the
# model's own error (its compute fit reproduces the measured H100 block times only to within 5%,
# tests/test_cost_model.py), and bytes decide instead.
AUTO_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class AlgorithmChoice:
    algorithm: str          # "ring" | "token_ring" | "ulysses"
    predicted_bytes: dict   # algorithm -> bottleneck bytes: max over ranks of max(sent, received)
    reason: str
    predicted_s: dict = dataclasses.field(default_factory=dict)  # algorithm -> cost-model seconds (W > 1)
    topology: str = ""      # the cost-model topology the prediction assumed
    hardware: str = ""      # the ringattn.hardware.Hardware it assumed (its name)


# what auto may pick: the two rings always; Ulysses where the group size splits the heads
AUTO_CANDIDATES = ALGORITHMS + ("ulysses",)


def choose_algorithm(*, seq_len: int, world_size: int, layout: str = "contiguous", causal: bool = False,
                     batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype=torch.bfloat16,
                     backward: bool = True, topology=None, cu_seqlens=None, sliding_window=None,
                     candidates=AUTO_CANDIDATES, hardware=None, device="cuda",
                     v_head_dim: int | None = None, softcap=None) -> AlgorithmChoice:
    """algorithm="auto": the algorithm ringattn.cost_model predicts faster (docs/cost_model.md).

    hardware: what the prediction assumes (a ringattn.hardware.Hardware, or anything
    hardware.resolve_profile takes: "h100", "cpu", a calibration JSON, a ComputeProfile); None:
    what an auto call on a `device` ("cuda" | "cpu") tensor uses now (hardware.current:
    set_auto_hardware, else RINGATTN_AUTO_PROFILE / RINGATTN_AUTO_TOPOLOGY, else by device: the
    H100 profile for GPUs, the CPU one on CPU). topology: replaces the hardware's topology.

    candidates: what may be picked (default ring, token_ring and ulysses; ulysses only where the
    world size splits the heads, ulysses.heads_problem; under torch.compile auto passes the two
    rings only: the traced op must be fixed at trace time, before the global length is known).
    1. W == 1: ring (no communication either way).
    2. The cost model simulates the schedules step by step with the hardware's compute profile
       (default on GPUs cost_model.H100_BF16, fitted to the measured block-attention rows) on its
       topology (default: "nvswitch" for W <= MESH_MAX_WORLD, one 8-GPU NVSwitch node, and
       "inter_node", 8 GPUs per node and one NIC per GPU, above; or a cost_model.PRESETS name or
       a cost_model.Topology). Of the two rings, the one predicted faster by more than
       AUTO_MARGIN (5%) is chosen.
       (Predicted at seq_len rounded to a quarter octave, cost_model.auto_seq_len; not run for
       W > cost_model.AUTO_MAX_WORLD (64), where the simulation would take seconds: bytes decide
       between the rings and Ulysses is not considered.)
    3. Otherwise (a gap inside the model's error) the ring whose busiest rank moves fewer bytes
       (max over ranks of max(sent, received), forward + backward when `backward`); ties go to
       ring (one peer per step, fewer messages).
    4. Ulysses replaces that ring only when predicted faster than BOTH rings by more than
       AUTO_MARGIN: its all-to-alls are never hidden behind compute, so a near tie goes to a ring.
    Masks: sliding windows shorter than the sequence and packed sequences (cu_seqlens with > 1
    document) are simulated with the code's own trimmed, pieced blocks, KV rotation's early stop
    and TokenRing's skipped pairs (cost_model.predict's cu_seqlens / sliding_window). A window
    alone is predicted at the rounded length, like no mask. Packed documents bring new boundaries
    with every batch, so they are predicted at the exact length and only for
    W <= cost_model.AUTO_MAX_WORLD_DOCUMENTS (16; ~25 ms per new packing there), above which bytes
    decide (TokenRing's bytes count only the pairs that share a document / that the window
    reaches; O(W^2) block cuts, cached for the last 8 masks only).
    v_head_dim: v's head dim where it differs from head_dim (MLA): the bytes are exact
    (predict_comm_bytes); the time model, which has one head dim, runs at (D + Dv) / 2, rounded up
    (for an even D + Dv: the attention FLOPs and K/V bytes exactly; Q and partial-output bytes in sum).
    softcap: the call's logit softcap (Gemma 2). Its blocks cannot run on SDPA's kernels, so on GPUs
    the model times them as what they run on: the flash_attn package (2.6+) with the profile's
    "flash" curve (SDPA's flash backend is the same FlashAttention-2 kernels: an approximation), else
    the math backend, which the GPU profiles have not measured -- there bytes decide between the
    rings (the reason says so). On CPU the blocks are math with or without it.
    Deterministic in its arguments, so every rank picks the same. Cached per distinct set of
    arguments (it runs on every call: uncached, the per-rank byte formulas alone cost ~1 ms at
    W = 32, and the model's first run up to a second at W = 64).
    """
    cands = tuple(a for a in AUTO_CANDIDATES if a in tuple(candidates))
    if not set(ALGORITHMS) <= set(cands) or len(cands) != len(tuple(candidates)):
        raise ValueError(f"candidates must hold 'ring' and 'token_ring', and may add 'ulysses'; got {candidates!r}")
    if "ulysses" in cands and heads_problem(heads_q, heads_kv, world_size):
        cands = ALGORITHMS
    if world_size == 1:
        hw = None  # (no prediction: nothing travels)
    elif hardware is None:
        hw = auto_hw.current(getattr(device, "type", device))
    else:
        hw = auto_hw.resolve_profile(hardware)
    if hw is not None and topology is not None:
        hw = hw.with_topology(auto_hw.resolve_topology(topology))
    v_dim = None if v_head_dim in (None, head_dim) else int(v_head_dim)
    blocks = _softcap_blocks(softcap, getattr(device, "type", device), hw)
    args = (seq_len, world_size, layout, bool(causal), batch, heads_q, heads_kv, head_dim, _elem_size(dtype),
            bool(backward), hw, cands, v_dim, blocks)
    docs = _documents_arg(cu_seqlens, seq_len, batch)
    window = _window_arg(sliding_window, causal, seq_len)
    if docs is not None or window is not None:  # a small cache of its own: every packed batch brings new
        return _choose_algorithm_packed(*args, docs, window)  # boundaries, but one forward's layers ask the same
    return _choose_algorithm(*args)


def _softcap_blocks(softcap, device: str, hw) -> str:
    """The backend the cost model times softcapped blocks with ("auto": as without a softcap; "" :
    none of the profile's curves fits, so bytes decide). See choose_algorithm."""
    if not softcap or hw is None or device != "cuda":
        return "auto"
    from ringattn.block_attention import flash_attn_takes_softcap

    backend = "flash" if flash_attn_takes_softcap() else "math"  # (where block_attention's auto runs them)
    try:
        hw.profile.backend(backend)
    except ValueError:
        return ""
    return backend


def auto_rule(secs: dict, nbytes: dict) -> tuple[str, str]:
    """choose_algorithm's steps 2-4 on predicted seconds and bottleneck bytes per algorithm
    ({"ring", "token_ring"[, "ulysses"]}): (algorithm, why)."""
    t_ring, t_tr = secs["ring"], secs["token_ring"]
    if t_ring > (1 + AUTO_MARGIN) * t_tr:
        alg, why = "token_ring", f"TokenRing predicted {t_ring / t_tr:.2f}x faster than KV rotation"
    elif t_tr > (1 + AUTO_MARGIN) * t_ring:
        alg, why = "ring", f"KV rotation predicted {t_tr / t_ring:.2f}x faster than TokenRing"
    elif nbytes["token_ring"] < nbytes["ring"]:
        alg, why = "token_ring", f"rings within {AUTO_MARGIN:.0%}; TokenRing moves fewer bytes"
    else:
        alg, why = "ring", f"rings within {AUTO_MARGIN:.0%}; KV rotation moves fewer (or equal) bytes"
    if "ulysses" in secs:
        best = min(t_ring, t_tr)
        if best > (1 + AUTO_MARGIN) * secs["ulysses"]:
            alg, why = "ulysses", f"Ulysses predicted {best / secs['ulysses']:.2f}x faster than the faster ring"
        else:
            why += f"; Ulysses not {AUTO_MARGIN:.0%} faster than both"
    return alg, why


@functools.lru_cache(maxsize=4096)
def _choose_algorithm(seq_len, world_size, layout, causal, batch, heads_q, heads_kv, head_dim, elem_size, backward,
                      hw, candidates, v_head_dim=None, blocks="auto", documents=None, window=None) -> AlgorithmChoice:
    per_alg = {}
    for alg in candidates:
        ranks = predict_comm_bytes(alg, seq_len=seq_len, world_size=world_size, layout=layout, causal=causal,
                                   batch=batch, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                                   dtype=elem_size, backward=backward, cu_seqlens=documents, sliding_window=window,
                                   v_head_dim=v_head_dim)
        per_alg[alg] = bottleneck_bytes(ranks)
    if v_head_dim is not None:  # the time model has one head dim (see choose_algorithm)
        head_dim = (head_dim + v_head_dim + 1) // 2
    if world_size == 1:
        return AlgorithmChoice("ring", per_alg, "world size 1: no communication")
    from ringattn import cost_model  # pure Python; imported here to keep this module's imports as they are

    what = []  # the masks, for the reason
    if documents is not None:
        rows = f" in {len(documents)} row packings" if per_row(documents) else ""
        what.append(f"packed sequence ({documents_count(documents)} documents{rows})")
    if window is not None:
        what.append(f"sliding window {window}")
    mask = f"{', '.join(what)}; " if what else ""
    topo = hw.topology_for(world_size)
    name = topo if isinstance(topo, str) else topo.kind
    limit = cost_model.AUTO_MAX_WORLD if documents is None else cost_model.AUTO_MAX_WORLD_DOCUMENTS
    if not blocks:  # softcapped blocks on a backend the profile has not measured
        alg = "token_ring" if per_alg["token_ring"] < per_alg["ring"] else "ring"
        return AlgorithmChoice(alg, per_alg, f"{mask}softcap: its blocks run on math, which {hw.profile.name} has not "
                               "measured: cost model not run; fewer bottleneck bytes between the rings (ties: ring)",
                               {}, name, hw.name)
    if world_size > limit:  # the simulation would take seconds (documents: on every new packing)
        alg = "token_ring" if per_alg["token_ring"] < per_alg["ring"] else "ring"
        return AlgorithmChoice(alg, per_alg, f"{mask}world size {world_size} > {limit}: cost model not run; "
                               "fewer bottleneck bytes between the rings (ties: ring)", {}, name, hw.name)
    if documents is None:  # the rounded length: one prediction serves nearby lengths
        secs = cost_model.predicted_times(cost_model.auto_seq_len(seq_len, world_size, layout), world_size,
                                          layout, causal, batch, heads_q, heads_kv, head_dim,
                                          elem_size, backward, topo, window, None, hw, blocks)
    else:  # the boundaries fix the length
        secs = cost_model.predicted_times_packed(seq_len, world_size, layout, causal, batch, heads_q,
                                                 heads_kv, head_dim, elem_size, backward, topo, window, documents, hw,
                                                 blocks)
    secs = {a: t for a, t in secs.items() if a in candidates}
    alg, why = auto_rule(secs, per_alg)
    on = f", softcap blocks timed as {blocks!r}" if blocks != "auto" else ""
    return AlgorithmChoice(alg, per_alg, f"{mask}cost model ({hw.profile.name}, {name}{on}): {why}", secs, name, hw.name)


_choose_algorithm_packed = functools.lru_cache(maxsize=8)(_choose_algorithm.__wrapped__)


# --------------------------------------------------------------------------------------------
# Public entry points


def _resolve_algorithm(algorithm: str, plan: RingPlan, q, k, grad: bool, candidates=AUTO_CANDIDATES, v=None) -> str:
    if algorithm != "auto":
        return algorithm
    return choose_algorithm(
        seq_len=plan.layout.seq_len, world_size=plan.world_size, layout=plan.layout.layout, causal=plan.causal,
        batch=q.shape[0], heads_q=q.shape[2], heads_kv=k.shape[2], head_dim=q.shape[3], dtype=q.dtype,
        backward=grad, cu_seqlens=plan.documents, sliding_window=plan.window, candidates=candidates,
        device=q.device.type, v_head_dim=None if v is None else v.shape[3], softcap=plan.softcap).algorithm


def _autocast(q, k, v):
    """Under torch.autocast, cast q, k, v as autocast casts scaled_dot_product_attention's inputs
    (its lower-precision list: every floating tensor but float64 -> the autocast dtype), so this
    is a drop-in for SDPA inside autocast regions (e.g. q from an autocast linear, k/v fp32)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v
    dev = q.device.type
    if dev not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(dev):
        return q, k, v
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype not in (dt, torch.float64) else t for t in (q, k, v))


def _run(fn, q, k, v, *, algorithm, causal, softmax_scale, group, layout, backend, return_lse, lse_grad=False,
         cu_seqlens=None, sliding_window=None, sinks=None, softcap=None):
    q, k, v = _autocast(q, k, v)
    if isinstance(sinks, torch.Tensor) and sinks.dtype in (torch.bfloat16, torch.float16):
        # One fp32 copy for both uses (the Function's rescale and finish's lse'): their gradients
        # then add in fp32 and are rounded to the sinks' dtype once, by this cast's backward.
        sinks = sinks.float()
    if torch.compiler.is_compiling():  # under torch.compile: one opaque custom op (ringattn.compiled)
        from ringattn.compiled import traced_attention
        return traced_attention(fn, q, k, v, algorithm=algorithm, causal=causal, softmax_scale=softmax_scale,
                                group=group, layout=layout, backend=backend, return_lse=return_lse,
                                lse_grad=lse_grad, cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks,
                                softcap=softcap)
    lse_grad = bool(lse_grad)
    plan, q, k, v, grad = _prepare(fn, q, k, v, algorithm=algorithm, causal=causal, softmax_scale=softmax_scale,
                                   group=group, layout=layout, backend=backend, lse_grad=lse_grad,
                                   cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks, softcap=softcap)
    algorithm = _resolve_algorithm(algorithm, plan, q, k, grad, v=v)
    # The kernels run with autocast off: their fp32 accumulation (math backend, merges, deltas)
    # must not be cast down by an enclosing autocast region (the backward does the same).
    with no_autocast(q.device):
        # sinks (ringattn.sinks): the Functions rescale their rows and fold the sinks into the backward
        if algorithm == "ring":
            out, lse = RingAttention.apply(q, k, v, plan, lse_grad, sinks)
        elif algorithm == "ulysses":
            out, lse = UlyssesAttention.apply(q, k, v, plan, lse_grad, sinks)
        else:
            out, lse = TokenRingAttention.apply(q, k, v, plan, lse_grad, sinks)
    return finish(out, lse, sinks=sinks, lse_grad=lse_grad, return_lse=return_lse)


def finish(out, lse, *, sinks, lse_grad, return_lse):
    """The public result from the Functions' (out', lse): lse' = logaddexp(lse, s_h) with sinks
    (ringattn.sinks), detached unless lse_grad."""
    if return_lse and sinks is not None:
        with no_autocast(out.device):
            lse = sink_lse(lse, sinks)
        if not lse_grad:
            lse = lse.detach()
    return (out, lse) if return_lse else out


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, group=None, layout="contiguous",
                   backend="auto", return_lse=False, lse_grad=False, cu_seqlens=None, sliding_window=None,
                   sinks=None, softcap=None):
    """Ring Self-Attention: K/V rotate one hop per step, Q stays (ringattn.ring_attention).
    lse_grad=True: the returned lse is differentiable (docs/sequence_parallel.md).
    cu_seqlens: packed sequences, the GLOBAL document boundaries (0, ..., L), the same on every rank:
    tokens attend only within their document (ringattn.documents).
    sliding_window=w (causal only): each query sees its w most recent keys, itself included
    (0 <= q - k < w, Hugging Face's config.sliding_window); blocks the window never reaches are
    skipped, and K/V rotation stops once no rank has a block further back (RingPlan.ring_steps).
    sinks: (heads_q,) attention-sink logits, one per query head, that join every row's softmax
    (gpt-oss; ringattn.sinks); differentiable, returned lse includes them.
    softcap=c: logit softcapping, every score s -> c * tanh(s / c) after softmax_scale (Gemma 2's
    attn_logit_softcapping); the returned lse is of the capped scores. The blocks then run on the
    math backend or the flash_attn package (SDPA's kernels have no softcap; backend="auto" picks)."""
    return _run("ringattn.ring_attention", q, k, v, algorithm="ring", causal=causal,
                softmax_scale=softmax_scale, group=group, layout=layout, backend=backend, return_lse=return_lse,
                lse_grad=lse_grad, cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks,
                softcap=softcap)


def token_ring_attention(q, k, v, *, causal=False, softmax_scale=None, group=None, layout="contiguous",
                         backend="auto", return_lse=False, lse_grad=False, cu_seqlens=None, sliding_window=None,
                         sinks=None, softcap=None):
    """TokenRing: K/V stay, Q travels one way and partials come straight back (ringattn.token_ring).
    lse_grad=True: the returned lse is differentiable (docs/sequence_parallel.md).
    cu_seqlens: packed sequences, as in ring_attention; Q rows travel only to ranks holding keys of
    their documents. sliding_window: as in ring_attention; Q rows travel only to ranks holding
    keys inside their window. sinks: as in ring_attention."""
    return _run("ringattn.token_ring_attention", q, k, v, algorithm="token_ring", causal=causal,
                softmax_scale=softmax_scale, group=group, layout=layout, backend=backend, return_lse=return_lse,
                lse_grad=lse_grad, cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks,
                softcap=softcap)


def ulysses_attention(q, k, v, *, causal=False, softmax_scale=None, group=None, layout="contiguous",
                      backend="auto", return_lse=False, lse_grad=False, cu_seqlens=None, sliding_window=None,
                      sinks=None, softcap=None):
    """Ulysses (DeepSpeed-Ulysses' schedule, ringattn.ulysses): all-to-all from sequence shards to
    head shards, one attention over the whole sequence per rank for heads_q/W heads, all-to-all
    back. Same inputs, layouts, lengths, masks (cu_seqlens, sliding_window, sinks), lse and
    gradients as ring_attention; the group size must divide heads_q, and heads_kv must divide or
    be a multiple of it (a KV head is then sent to the W/heads_kv ranks whose query heads use it).
    Its all-to-alls move (W-1)/W of q, k, v and out per call, which does not grow with W; they are
    not overlapped with compute. Under torch.compile it is one traced op pair
    (ringattn::ulysses_attention, ringattn.compiled)."""
    return _run("ringattn.ulysses_attention", q, k, v, algorithm="ulysses", causal=causal,
                softmax_scale=softmax_scale, group=group, layout=layout, backend=backend, return_lse=return_lse,
                lse_grad=lse_grad, cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks,
                softcap=softcap)


def sequence_parallel_attention(q, k, v, *, causal=False, softmax_scale=None, group=None, layout="contiguous",
                                backend="auto", return_lse=False, algorithm="auto", lse_grad=False,
                                cu_seqlens=None, sliding_window=None, sinks=None, softcap=None):
    """ring_attention, token_ring_attention or ulysses_attention (algorithm="ulysses"); "auto"
    picks by ringattn.cost_model (choose_algorithm): the ring or token_ring predicted faster,
    bytes deciding inside its 5% margin, and Ulysses instead where the group size splits the
    heads and it is predicted more than 5% faster than both rings (under torch.compile: the
    rings only)."""
    return _run("ringattn.sequence_parallel_attention", q, k, v, algorithm=algorithm, causal=causal,
                softmax_scale=softmax_scale, group=group, layout=layout, backend=backend, return_lse=return_lse,
                lse_grad=lse_grad, cu_seqlens=cu_seqlens, sliding_window=sliding_window, sinks=sinks,
                softcap=softcap)
