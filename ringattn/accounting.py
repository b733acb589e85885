"""Byte counters for the sequence-parallel point-to-point traffic.

Every message the communication class (ringattn.comm.P2PComm) posts is recorded here, at post
time, with its channel (what travels in which direction, e.g. "fwd.kv", "bwd.dq"; see
docs/sequence_parallel.md for the list and the formulas) and its peer (GLOBAL rank):

    with ringattn.comm_stats() as st:
        out = ringattn.ring_attention(q, k, v, causal=True)
        out.backward(dout)
    st.sent_bytes, st.recv_bytes            # this rank, in total
    st.sent_by_channel["fwd.kv"]            # by channel (= direction and payload)
    st.recv_by_peer[3]                      # by peer global rank

Contexts nest (each active one records). `bytes_sent()` / `bytes_received()` are process-wide
running totals since import or the last `reset()`. The small metadata all_gather at the start of
each call (26 int64 per rank) is a collective, not P2P traffic, and is not counted.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses


@dataclasses.dataclass
class CommStats:
    """Bytes and messages this rank sent and received while the context was active."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    sent_messages: int = 0
    recv_messages: int = 0
    sent_by_channel: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    recv_by_channel: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sent_by_peer: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    recv_by_peer: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def record(self, channel: str, peer: int, nbytes: int, is_send: bool) -> None:
        if is_send:
            self.sent_bytes += nbytes
            self.sent_messages += 1
            self.sent_by_channel[channel] += nbytes
            self.sent_by_peer[peer] += nbytes
        else:
            self.recv_bytes += nbytes
            self.recv_messages += 1
            self.recv_by_channel[channel] += nbytes
            self.recv_by_peer[peer] += nbytes

    def as_dict(self) -> dict:
        return {
            "sent_bytes": self.sent_bytes, "recv_bytes": self.recv_bytes,
            "sent_messages": self.sent_messages, "recv_messages": self.recv_messages,
            "sent_by_channel": dict(self.sent_by_channel), "recv_by_channel": dict(self.recv_by_channel),
            "sent_by_peer": dict(self.sent_by_peer), "recv_by_peer": dict(self.recv_by_peer),
        }


_TOTAL = CommStats()
_ACTIVE: list[CommStats] = []


def record(channel: str, peer: int, nbytes: int, is_send: bool) -> None:
    """Called by the communication class for every posted message."""
    _TOTAL.record(channel, peer, nbytes, is_send)
    for st in _ACTIVE:
        st.record(channel, peer, nbytes, is_send)


@contextlib.contextmanager
def comm_stats():
    """Collect this rank's P2P bytes inside the block (forward and backward alike)."""
    st = CommStats()
    _ACTIVE.append(st)
    try:
        yield st
    finally:
        # by identity: nested contexts holding equal counts compare equal (a dataclass)
        del _ACTIVE[next(i for i, x in enumerate(_ACTIVE) if x is st)]


def totals() -> CommStats:
    """The process-wide running totals (a live object; see reset)."""
    return _TOTAL


def bytes_sent() -> int:
    return _TOTAL.sent_bytes


def bytes_received() -> int:
    return _TOTAL.recv_bytes


def reset() -> None:
    global _TOTAL
    _TOTAL = CommStats()
