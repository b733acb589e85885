"""The one communication class under ring attention and TokenRing: P2PComm.

One P2PComm is one channel (one payload travelling in one direction) over one process group,
used in three visible phases per step:

    comm.send(k_cur, to=next_rank); comm.recv(k_next, frm=prev_rank)   # queue (group ranks)
    comm.commit()        # post every queued op at once (batch_isend_irecv of P2POps)
    ... block attention runs here, overlapping the transfer ...
    comm.wait()          # the batch is done: received buffers readable, sent ones writable

At most one batch per channel is in flight (commit while one is pending is an error), so each
algorithm's buffer reuse is easy to check against its loop. Peers are GROUP ranks; the class maps
them to global ranks for the transport (dist.get_global_rank), which is what P2POp wants.
Every posted message is counted in ringattn.accounting (by channel and peer global rank).

Transport: anything with `batch_isend_irecv(list[dist.P2POp]) -> list[work]` whose works have
`wait()`. The default is torch.distributed itself (NCCL on GPUs, gloo on CPU; NCCL's wait()
only orders the current stream, gloo's blocks the host -- CPU has no other way). Another
transport (e.g. ringattn.transport.CudaIpcTransport for ranks sharing one GPU) plugs in with
`set_transport_factory(fn)`, fn(group, channel) -> transport; it then sees exactly the
P2POps below. Messages per step and peer are small: ring sends 2 (k, v) per channel, TokenRing
up to 4 (q, dout, lse, delta) -- an IPC transport needs that many slots per channel.

Control group: the small metadata collectives every call starts with (the signature exchange,
gather_sequence's and the Hugging Face pre-hook's) run on `control_group(group)`: the group itself
when it has a CPU backend (gloo, "cpu:gloo,cuda:nccl"); for an NCCL-only group a gloo twin over the
same ranks (made once for a world-spanning group, or registered with register_control_group), so
the exchange runs on the host and never waits for the GPU queue to drain.

Second communicator: TokenRing's partial results travel against the Q direction while Q moves.
They use `reply_group(group)`, a second process group over the same ranks, so that on NCCL both
directions sit on different communicators/streams and overlap (see reply_group for when it is
made and the fallback). Every channel also has its own P2P tag (CHANNEL_TAGS), which keeps
channels that share a group apart on gloo.
"""
from __future__ import annotations

import collections
import datetime
import os
from typing import Callable

import torch
import torch.distributed as dist

from ringattn import accounting


# One P2P tag per channel: on gloo, messages of different channels between the same two ranks
# never match each other even on one group. NCCL ignores tags (it matches in posting order, which
# every algorithm here keeps identical on both ends of each pair).
CHANNEL_TAGS = {"fwd.kv": 11, "bwd.kv": 12, "bwd.dkv": 13, "fwd.q": 21, "fwd.partial": 22,
                "bwd.q": 23, "bwd.dq": 24, "fwd.a2a": 31, "fwd.out": 32, "bwd.dout": 33, "bwd.dqkv": 34}


class P2PComm:
    """Queued sends/recvs of one channel over one group; commit posts them, wait completes them."""

    def __init__(self, group, channel: str, max_message_bytes: int, transport=None):
        """max_message_bytes: the largest single tensor this channel will move (a transport with
        fixed inboxes, e.g. CudaIpcTransport, is `reserve`d for it here -- a collective, so every
        rank of the group constructs the same channels in the same order, which the algorithms do)."""
        self.group = group
        self.channel = channel
        self.tag = CHANNEL_TAGS.get(channel, 0)
        self.transport = transport if transport is not None else _transport_for(group, channel)
        if hasattr(self.transport, "reserve"):
            self.transport.reserve(int(max_message_bytes))
        self._global = {}
        self._queued: list = []
        self._pending: list = []
        self._keepalive: list = []

    def _global_rank(self, group_rank: int) -> int:
        g = self._global.get(group_rank)
        if g is None:
            g = group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)
            self._global[group_rank] = g
        return g

    def send(self, tensor: torch.Tensor, to: int) -> None:
        """Queue a send of `tensor` (contiguous; not written until wait()) to group rank `to`."""
        if not tensor.is_contiguous():
            raise ValueError(f"P2PComm[{self.channel}]: send buffer must be contiguous, got strides "
                             f"{tensor.stride()} for shape {tuple(tensor.shape)}")
        peer = self._global_rank(to)
        self._queued.append(dist.P2POp(dist.isend, tensor, peer, self.group, self.tag))
        accounting.record(self.channel, peer, tensor.numel() * tensor.element_size(), True)

    def recv(self, tensor: torch.Tensor, frm: int) -> None:
        """Queue a receive into `tensor` (contiguous; not read until wait()) from group rank `frm`."""
        if not tensor.is_contiguous():
            raise ValueError(f"P2PComm[{self.channel}]: recv buffer must be contiguous, got strides "
                             f"{tensor.stride()} for shape {tuple(tensor.shape)}")
        peer = self._global_rank(frm)
        self._queued.append(dist.P2POp(dist.irecv, tensor, peer, self.group, self.tag))
        accounting.record(self.channel, peer, tensor.numel() * tensor.element_size(), False)

    def commit(self) -> None:
        """Post everything queued since the last commit as one batch (no-op when nothing is)."""
        if self._pending:
            raise RuntimeError(f"P2PComm[{self.channel}]: commit() while the previous batch is not "
                               "wait()ed (one batch in flight per channel)")
        if not self._queued:
            return
        ops, self._queued = self._queued, []
        self._pending = list(self.transport.batch_isend_irecv(ops))
        self._keepalive = [op.tensor for op in ops]  # buffers must outlive the transfer

    def wait(self) -> None:
        """Complete the batch in flight (no-op when none)."""
        if self._queued:
            raise RuntimeError(f"P2PComm[{self.channel}]: wait() with ops queued but not committed")
        for work in self._pending:
            work.wait()
        self._pending = []
        self._keepalive = []


# --------------------------------------------------------------------------------------------
# Transport selection


class _TorchDistributed:
    """torch.distributed's batch_isend_irecv (NCCL / gloo)."""

    @staticmethod
    def batch_isend_irecv(ops):
        return dist.batch_isend_irecv(ops)


_TORCH = _TorchDistributed()
_factory: Callable | None = None


def set_transport_factory(factory: Callable | None) -> None:
    """Use factory(group, channel) -> transport for every P2PComm made from now on (None: the
    default, torch.distributed). Every rank of a group must use the same kind of transport."""
    global _factory
    _factory = factory


def _transport_for(group, channel: str):
    if _factory is None:
        return _TORCH
    return _factory(group, channel)


# --------------------------------------------------------------------------------------------
# Second communicator over the same ranks (TokenRing's return direction)

_REPLY_GROUPS: dict = {}


def _group_key(group):
    return ("WORLD",) if group is None or group is dist.GroupMember.WORLD else (id(group),)


def register_reply_group(group, reply) -> None:
    """Use `reply` (a process group over the same ranks as `group`, made by the caller, e.g. with
    dist.new_group on every rank at setup) as the second communicator of `group`."""
    if dist.get_process_group_ranks(reply) != dist.get_process_group_ranks(group or dist.GroupMember.WORLD):
        raise ValueError("register_reply_group: the reply group must hold the same ranks as the group")
    _REPLY_GROUPS[_group_key(group)] = (group, reply)


def reply_group(group, device: torch.device):
    """The second communicator of `group`: the registered one; else, for a group spanning the
    whole world, one made here (dist.new_group over all ranks: every rank of the world is in this
    call, so the creation is collective as torch requires); else `group` itself -- the channels
    then stay apart by P2P tag (gloo) and by matching order (NCCL, which ignores tags), but on NCCL
    the two directions share one stream.

    Not made for sub-groups on purpose: new_group needs every rank of the world (non-members
    would have to call it too), and torch 2.14's use_local_synchronization=True names groups
    from a per-process counter that diverges once different sub-groups made groups, which
    deadlocks (seen in tests/test_sequence_parallel.py::test_sub_groups).
    """
    key = _group_key(group)
    hit = _REPLY_GROUPS.get(key)
    if hit is not None and (hit[0] is group or key == ("WORLD",)):
        return hit[1]
    ranks = dist.get_process_group_ranks(group or dist.GroupMember.WORLD)
    if len(ranks) != dist.get_world_size():
        return group
    reply = dist.new_group(ranks)
    # Warm-up collective: the first op on a fresh NCCL communicator must involve every member.
    warm = torch.zeros(1, device=device)
    dist.all_reduce(warm, group=reply)
    _REPLY_GROUPS[key] = (group, reply)  # keeps `group` alive so its id() is not reused
    return reply


# --------------------------------------------------------------------------------------------
# Control group: where the per-call metadata collectives run (on the host, never on a GPU stream)

_CONTROL_GROUPS: dict = {}
# How often control_group handed out a gloo twin instead of the group itself (tests read it).
CONTROL_TWIN_USES: collections.Counter = collections.Counter()


class ControlGroupTimeout(RuntimeError):
    """The default group's gloo twin could not be made: not every rank made the same call."""


def register_control_group(group, control) -> None:
    """Use `control` (a gloo process group over the same ranks as `group`, made by the caller with
    dist.new_group(ranks, backend="gloo") on every rank at setup) for `group`'s metadata exchanges."""
    if dist.get_process_group_ranks(control) != dist.get_process_group_ranks(group or dist.GroupMember.WORLD):
        raise ValueError("register_control_group: the control group must hold the same ranks as the group")
    if "gloo" not in str(dist.get_backend(control)).lower():
        raise ValueError(f"register_control_group: the control group must have a gloo backend, got "
                         f"{dist.get_backend(control)!r}")
    _CONTROL_GROUPS[_group_key(group)] = (group, control)


def control_group(group, like: torch.device):
    """(process group, device) for a small metadata collective of `group` whose result the host reads.

    A group with a CPU backend: itself, on the CPU. An NCCL-only group: its gloo twin on the CPU --
    the registered one, else, for the default group (group=None / WORLD), one made here on first
    use (every rank of the world is in this call) -- so the CPU never waits for the GPU to drain its
    queue before the call's kernels are queued. Any other group without a registered twin: itself
    on the GPU (an NCCL all_gather and a device-to-host copy, i.e. one host synchronisation per
    call). Not made for other groups, even world-spanning ones: a rank that passed another group
    than its peers must still end up alone in a collective (the timeout names it), which twins
    made here for two different groups would paper over (their creations would match each other).
    A rank whose peers never make the default group's twin raises ControlGroupTimeout after
    RINGATTN_SYNC_TIMEOUT_S. RINGATTN_CONTROL_GROUP=group: always the group itself; =gloo: a
    twin even for CPU groups (how the CPU tests exercise the twin)."""
    from ringattn.layout import collective_device  # (layout imports this module's users lazily)

    mode = os.environ.get("RINGATTN_CONTROL_GROUP", "auto")
    if mode not in ("auto", "group", "gloo"):
        raise ValueError(f"RINGATTN_CONTROL_GROUP must be auto, group or gloo, got {mode!r}")
    dev = collective_device(group, like)
    if mode == "group" or (dev.type == "cpu" and mode != "gloo"):
        return group, dev
    key = _group_key(group)
    hit = _CONTROL_GROUPS.get(key)
    if hit is not None and (hit[0] is group or key == ("WORLD",)):
        CONTROL_TWIN_USES[key] += 1
        return hit[1], torch.device("cpu")
    if key != ("WORLD",):  # only the default group's twin is made here (see the docstring)
        return group, dev
    from ringattn.sequence_parallel import sync_timeout_s

    timeout = sync_timeout_s()
    try:
        twin = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - gloo's rendezvous: some rank never made the same call
        raise ControlGroupTimeout(f"making the gloo control group of the default group failed: {e}") from e
    _CONTROL_GROUPS[key] = (group, twin)
    CONTROL_TWIN_USES[key] += 1
    return twin, torch.device("cpu")
