"""CudaIpcTransport: NCCL-style P2P over CUDA IPC between processes that share one GPU.

Two tiers (style rule 10):
- always (CPU): import and the documented errors without CUDA; the whole protocol (buffer
  offsets, sequence numbers and their u32 wraparound, slot acks, size/dtype headers, byte
  counters, every error) run by the host simulation backend over real gloo processes (2, 3, 4
  ranks); the header packing and the cyclic compare against int32 arithmetic.
- gpu (`pytest -m gpu tests/test_cuda_ipc.py`, run by scripts/gpu_check.sh, ideally under MPS):
  2 and 4 real processes on cuda:0 with the real backend: ring shifts, bidirectional pairs,
  back-to-back steps with varying sizes and dtypes and a collective reserve() growth, message
  numbers crossing 2^32, exact byte equality, byte counters, the errors, the host never blocking
  in wait(); memops must pass their probes on local and on IPC-mapped memory.

Every exchange compares bytes (random payloads, so NaN bit patterns compare exactly) and a
mismatch names the rank, step, peer, dtype, shape and first differing byte. Every multi-process
call has a deadline: `DistPool.run(timeout=...)` kills a hung world and `transport.synchronize`
raises TimeoutError with the flag state of the stuck rank.
"""
from __future__ import annotations

import os
import time
import types

import pytest
import torch
import torch.distributed as dist

from dist_pool import DistPool
from ringattn.transport import CudaIpcTransport
from ringattn.transport import cuda_ipc

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# One message per step and send: (dtype, shape); "CAP" = exactly the reserved capacity in bytes.
_SCHEDULE = [
    (torch.float32, (3, 5)),
    (torch.bfloat16, (1000,)),
    (torch.uint8, (1,)),
    (torch.int64, (7, 11)),
    (torch.float16, (64, 129)),
    (torch.bool, (33,)),
    (torch.float32, (0,)),
    (torch.complex64, (17,)),
    (torch.uint8, "CAP"),
    (torch.float64, (5, 3, 2)),
]
_CAP0 = 64 * 1024  # first reserve(); grown to _CAP1 half way
_CAP1 = 256 * 1024
# Deadlines, nested so that the innermost one reports a hang: the transport's host waits (they
# raise TimeoutError with the flag state) < DistPool.run (kills and respawns the world) < the
# pytest-timeout of scripts/gpu_check.sh (--timeout=180, which would leave a hung pool behind).
_HOST_WAIT_S = 30
_GPU_RUN_S = 150


# ---- helpers that run inside the worker processes ----------------------------------------------


def _make(backend: str, slots: int = 2, nbytes: int | None = None, check: str | None = None, sync: str | None = None):
    if backend == "cuda":
        torch.cuda.set_device(0)
        return CudaIpcTransport(device=torch.device("cuda", 0), slots=slots, nbytes=nbytes, check=check, sync=sync, timeout_s=_HOST_WAIT_S)
    return CudaIpcTransport(slots=slots, nbytes=nbytes, check=check, _backend="host-sim", timeout_s=60)


def _device(backend: str) -> torch.device:
    return torch.device("cuda", 0) if backend == "cuda" else torch.device("cpu")


def _shape(entry, capacity: int):
    dtype, shape = entry
    if shape == "CAP":
        return dtype, (capacity // torch.empty((), dtype=dtype).element_size(),)
    return dtype, shape


def _payload(seed: int, src: int, dst: int, step: int, k: int, dtype, shape) -> torch.Tensor:
    """Random bytes (CPU), a function of who sends what when, so the receiver can regenerate them."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + src * 10_007 + dst * 101 + step) * 7 + k)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw %= 2  # only 0/1 are valid bools
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu()


def _assert_same_bytes(got: torch.Tensor, want: torch.Tensor, ctx: str) -> None:
    g, w = _bytes(got), _bytes(want)
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), f"{ctx}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    if not torch.equal(g, w):
        bad = (g != w).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(
            f"{ctx}: {bad.numel()} of {g.numel()} bytes differ; first at byte {i}: "
            f"got {g[i:i + 8].tolist()} want {w[i:i + 8].tolist()}"
        )


def _peers(pattern: str, rank: int, world: int):
    """(send destinations, recv sources) in post order; the k-th send to a rank pairs with its k-th recv."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if pattern == "ring":
        return [nxt], [prv]
    if pattern == "bidir":  # TokenRing: Q one way, partial results the other way, at once
        return [nxt, prv], [prv, nxt]
    if pattern == "self":
        return [rank, nxt], [rank, prv]
    raise ValueError(pattern)


def _start_sequences_at(t: CudaIpcTransport, base: int) -> None:
    """Put the transport in the state it has after `base` messages each way per ordered pair (all
    drained): the sequence counters, and the ready/ack words of this rank's buffer (slot k holds
    the last message m <= base with (m - 1) % slots == k). Collective (barrier)."""
    L, S = t._layout, t.slots
    for j in range(t.world_size):
        t._send_seq[j] = t._recv_seq[j] = base
        for k in range(S):
            m = base - ((base - 1 - k) % S)
            for off in (L.ready(j, k), L.ack(j, k)):
                t._buf[off : off + 4].view(torch.int32).fill_(cuda_ipc._i32(m))
    if t._buf.is_cuda:
        torch.cuda.synchronize()
    dist.barrier()


def _exchange_worker(backend: str, pattern: str, steps: int, slots: int, seed: int, sync: str | None = None,
                     grow: bool = True, seq_base: int | None = None):
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _device(backend)
    t = _make(backend, slots=slots, nbytes=_CAP0 - 100 * rank, sync=sync)  # ranks disagree: the max wins
    assert t.capacity == _CAP0, t.capacity
    if seq_base is not None:  # the u32 sequence numbers wrap around during this run
        assert not grow, "reserve() restarts the sequence numbers"
        _start_sequences_at(t, seq_base)
    dsts, srcs = _peers(pattern, rank, world)

    def plan(step, capacity):
        return _shape(_SCHEDULE[(step + seed) % len(_SCHEDULE)], capacity)

    # Payloads are generated up front so the loop never synchronises the host.
    caps = [(_CAP1 if grow and step >= steps // 2 else _CAP0) for step in range(steps)]
    send_data = [
        [_payload(seed, rank, d, step, k, *plan(step, caps[step])).to(dev) for k, d in enumerate(dsts)]
        for step in range(steps)
    ]
    send_bufs = [torch.empty(_CAP1, dtype=torch.uint8, device=dev) for _ in dsts]  # reused every step
    received = []
    expect_sent = {g: 0 for g in range(world)}
    expect_recv = {g: 0 for g in range(world)}
    for step in range(steps):
        if grow and step == steps // 2:
            assert t.reserve(_CAP1) == _CAP1  # collective, mid-run
        dtype, shape = plan(step, caps[step])
        ops, views = [], []
        for k, d in enumerate(dsts):
            nbytes = send_data[step][k].numel() * send_data[step][k].element_size()
            v = send_bufs[k][:nbytes].view(dtype).view(shape)
            v.copy_(send_data[step][k])  # on the current stream: the send must wait for it
            ops.append(dist.P2POp(dist.isend, v, d))
            expect_sent[d] += nbytes
        recv_step = []
        for k, s in enumerate(srcs):
            r = torch.empty(shape, dtype=dtype, device=dev)
            r.view(-1).view(torch.uint8).fill_(0xA5)  # garbage the transport must overwrite
            ops.append(dist.P2POp(dist.irecv, r, s))
            recv_step.append(r)
            expect_recv[s] += r.numel() * r.element_size()
        works = t.batch_isend_irecv(ops)
        assert len(works) == len(ops)
        for w in works:
            w.wait()
        for b in send_bufs:
            b.fill_(step & 0xFF)  # overwrite right after wait(): a late send read would show it
        received.append(recv_step)
    t.synchronize(timeout_s=_HOST_WAIT_S)
    for step in range(steps):
        for k, s in enumerate(srcs):
            dtype, shape = plan(step, caps[step])
            want = _payload(seed, s, rank, step, k, dtype, shape)
            _assert_same_bytes(
                received[step][k], want,
                f"[{backend} {pattern} world={world} slots={slots} sync={t.sync}] rank {rank} step {step} "
                f"recv #{k} from rank {s} ({dtype}, {tuple(shape)})",
            )
    assert t.bytes_sent == expect_sent, (rank, t.bytes_sent, expect_sent)
    assert t.bytes_received == expect_recv, (rank, t.bytes_received, expect_recv)
    assert sum(t.messages_sent.values()) == steps * len(dsts)
    stats = t.stats()
    t.close()
    return stats


def _errors_worker(backend: str):
    """Every documented error, raised before anything is posted, leaves the transport usable."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _device(backend)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    t = _make(backend, slots=2)
    x = torch.arange(16, dtype=torch.float32, device=dev)
    with pytest.raises(RuntimeError, match=r"reserve\(max_message_bytes\)"):
        t.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt)])
    cap = t.reserve(4096)
    assert cap == 4096
    too_big = torch.zeros(cap + 1, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match=r"4097 bytes .* exceeds the reserved capacity of 4096 bytes; call transport.reserve\(4097\)"):
        t.batch_isend_irecv([dist.P2POp(dist.irecv, x, prv), dist.P2POp(dist.isend, too_big, nxt)])
    with pytest.raises(ValueError, match="not contiguous"):
        t.batch_isend_irecv([dist.P2POp(dist.isend, x.view(4, 4).t(), nxt)])
    wrong = torch.zeros(4) if backend == "cuda" else torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match=f"tensor is on {wrong.device}, but this transport moves tensors on {dev}"):
        t.batch_isend_irecv([dist.P2POp(dist.isend, wrong, nxt)])
    with pytest.raises(ValueError, match=f"peer {world + 5} is not a rank of this transport's group"):
        t.batch_isend_irecv([types.SimpleNamespace(op=dist.isend, tensor=x, peer=world + 5)])
    with pytest.raises(ValueError, match="must be torch.distributed.isend or irecv"):
        t.batch_isend_irecv([types.SimpleNamespace(op=dist.all_reduce, tensor=x, peer=nxt)])
    # Nothing was posted: a plain ring step still matches up.
    y = torch.empty_like(x)
    for w in t.batch_isend_irecv([dist.P2POp(dist.isend, x + rank, nxt), dist.P2POp(dist.irecv, y, prv)]):
        w.wait()
    t.synchronize(timeout_s=_HOST_WAIT_S)
    _assert_same_bytes(y, (torch.arange(16, dtype=torch.float32) + prv), f"rank {rank} ring step after errors")
    assert t.bytes_sent[nxt] == 64 and t.bytes_received[prv] == 64
    t.close()
    return "ok"


def _outstanding_worker(backend: str):
    """Rank 0 posts `slots` un-waited sends to rank 1; one more is refused; then all drain."""
    rank = dist.get_rank()
    dev = _device(backend)
    slots = 2
    t = _make(backend, slots=slots, nbytes=1024)
    msgs = [torch.full((8,), float(i + 1), device=dev) for i in range(slots)]
    if rank == 0:
        works = [t.batch_isend_irecv([dist.P2POp(dist.isend, m, 1)])[0] for m in msgs]
        with pytest.raises(RuntimeError, match=r"3 sends to rank 1 would be outstanding .* slots=2"):
            t.batch_isend_irecv([dist.P2POp(dist.isend, msgs[0], 1)])
        for w in works:
            w.wait()
        # waited -> the slots count as free again on the host side (the receiver drains them)
        extra = t.batch_isend_irecv([dist.P2POp(dist.isend, msgs[0] * 10, 1)])
        extra[0].wait()
    elif rank == 1:
        got = [torch.empty(8, device=dev) for _ in range(slots + 1)]
        for w in t.batch_isend_irecv([dist.P2POp(dist.irecv, g, 0) for g in got]):
            w.wait()
        t.synchronize(timeout_s=_HOST_WAIT_S)
        for i in range(slots):
            _assert_same_bytes(got[i], torch.full((8,), float(i + 1)), f"rank 1 message {i}")
        _assert_same_bytes(got[slots], torch.full((8,), 10.0), "rank 1 message after the refusal")
    t.synchronize(timeout_s=_HOST_WAIT_S)
    t.close()
    return "ok"


def _mismatch_worker(backend: str, kind: str):
    """A recv whose size or dtype differs from the matching send raises (check='host')."""
    rank = dist.get_rank()
    dev = _device(backend)
    t = _make(backend, nbytes=1024, check="host")
    msg = None
    if rank == 0:
        x = torch.arange(4, dtype=torch.float32, device=dev) if kind == "dtype" else torch.zeros(12, dtype=torch.uint8, device=dev)
        for w in t.batch_isend_irecv([dist.P2POp(dist.isend, x, 1)]):
            w.wait()
    elif rank == 1:
        y = torch.empty(8, dtype=torch.float16, device=dev) if kind == "dtype" else torch.empty(16, dtype=torch.uint8, device=dev)
        pattern = (
            r"message #1 from rank 0 carries 16 bytes of float32, but the matching recv \(op 0\) expects 16 bytes of float16"
            if kind == "dtype"
            else r"carries 12 bytes of uint8, but the matching recv \(op 0\) expects 16 bytes of uint8"
        )
        with pytest.raises(ValueError, match=pattern) as e:
            t.batch_isend_irecv([dist.P2POp(dist.irecv, y, 0)])
        msg = str(e.value)
    t.synchronize(timeout_s=_HOST_WAIT_S)
    t.close()
    return msg


def _memops_worker():
    """Which flag mechanism works here: the stream memory ops are the intended one, on local
    memory (construction probe) and on the peers' IPC-mapped buffers (reserve's probe)."""
    try:
        t = _make("cuda", sync="memops", nbytes=4096)
    except RuntimeError as e:
        return f"memops unavailable: {e}"
    detail = t.sync_detail
    t.close()
    return f"memops ok: {detail}"


def _host_never_blocks_worker():
    """wait() returns at once although the peer sends a second later (device-side wait only)."""
    rank = dist.get_rank()
    t = _make("cuda", nbytes=1 << 20)
    dev = torch.device("cuda", 0)
    x = torch.randn(1 << 18, device=dev)
    (x * 2).sum().item()  # load the kernels used below before a recv is parked (lazy module loading)
    if rank == 0:
        y = torch.empty_like(x)
        t0 = time.monotonic()
        works = t.batch_isend_irecv([dist.P2POp(dist.irecv, y, 1)])
        for w in works:
            w.wait()
        z = y * 2  # queued behind the recv on the current stream
        host_s = time.monotonic() - t0
        assert not works[0].is_completed(), "the recv completed before rank 1 sent"
        dist.barrier()  # tell rank 1 to send
        t.synchronize(timeout_s=_HOST_WAIT_S)
        assert host_s < 0.5, f"posting + wait() blocked the host for {host_s:.3f} s"
        got = [torch.empty_like(x)]
        for w in t.batch_isend_irecv([dist.P2POp(dist.irecv, got[0], 1)]):
            w.wait()
        t.synchronize(timeout_s=_HOST_WAIT_S)
        _assert_same_bytes(z, got[0] * 2, "rank 0 y*2 after a late send")
    else:
        dist.barrier()
        time.sleep(0.5)
        for _ in range(2):
            for w in t.batch_isend_irecv([dist.P2POp(dist.isend, x, 0)]):
                w.wait()
        t.synchronize(timeout_s=_HOST_WAIT_S)
    t.close()
    return "ok"


# ---- CPU tier -----------------------------------------------------------------------------------


def test_import_and_cpu_device_error():
    with pytest.raises(ValueError, match="moves CUDA tensors between processes that share a GPU; got device=cpu"):
        CudaIpcTransport(device="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where CUDA is missing")
def test_no_cuda_error():
    with pytest.raises(RuntimeError, match=r"needs CUDA: torch.cuda.is_available\(\) is False"):
        CudaIpcTransport()


def test_sequence_and_layout_arithmetic():
    assert cuda_ipc._seq_reached(5, 5) and cuda_ipc._seq_reached(6, 5) and not cuda_ipc._seq_reached(4, 5)
    assert cuda_ipc._seq_reached(0, 0xFFFFFFFF) and not cuda_ipc._seq_reached(0xFFFFFFFF, 0)  # wraparound
    assert cuda_ipc._seq_reached(0, 0) and not cuda_ipc._seq_reached(0, 1)  # zeroed flags wait for message 1
    assert cuda_ipc._i32(0xFFFFFFF0) == -16 and cuda_ipc._i32(7) == 7 and cuda_ipc._i32(1 << 32) == 0
    for w, s, c in [(1, 1, 512), (2, 2, 4096), (4, 3, 1 << 20)]:
        L = cuda_ipc._Layout(w, s, c)
        spans = []
        for r in range(w):
            for k in range(s):
                spans += [(L.ready(r, k), 4), (L.ack(r, k), 4), (L.hdr(r, k), 8), (L.data(r, k), c)]
            spans.append((L.probe(r), 8))
        spans.sort()
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), "regions overlap"
        assert spans[-1][0] + spans[-1][1] == L.total
        assert all(L.hdr(r, k) % 8 == 0 and L.data(r, k) % 512 == 0 for r in range(w) for k in range(s))
        assert all(L.probe(r) % 8 == 0 and L.probe(r) + 8 <= L.flags_bytes for r in range(w))
        flags = [x for x in spans if x[0] < L.flags_bytes]  # share() zeroes exactly these bytes
        assert all(a + n <= L.flags_bytes for a, n in flags) and len(flags) == w * (3 * s + 1)
    h = cuda_ipc._header(12345, torch.bfloat16)
    assert cuda_ipc._describe_header(h) == "12345 bytes of bfloat16"
    codes = [cuda_ipc._dtype_code(d) for d in cuda_ipc._KNOWN_DTYPES]
    assert len(set(codes)) == len(codes), "two dtypes share a header code"


def test_triton_fallback_kernels_compile_for_hopper():
    """The fallback flag kernels compile for sm_90 (no GPU needed) with system-scope ordering."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget compile API")
    write, wait = cuda_ipc._triton_kernels()
    ptx = {}
    for name, fn in [("write", write), ("wait", wait)]:
        src = ASTSource(fn=fn, signature={"flag_ptr": "*i32", "value": "i32"}, constexprs={})
        ptx[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "sys.release" in ptx["write"] and "exch" in ptx["write"], ptx["write"]
    assert "sys.acquire" in ptx["wait"] and "sub.s32" in ptx["wait"], ptx["wait"]  # cyclic int32 compare


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern", ["ring", "bidir"])
def test_sim_exchange(dist_pool, world_size, pattern):
    stats = dist_pool(world_size).run(_exchange_worker, "host-sim", pattern, 12, 2, 7, timeout=240)
    assert all(s["capacity"] == _CAP1 for s in stats)


def test_sim_slots1_and_self_send(dist_pool):
    dist_pool(3).run(_exchange_worker, "host-sim", "self", 8, 1, 3, timeout=240)


@pytest.mark.parametrize("world_size,pattern,slots", [(3, "ring", 1), (2, "bidir", 3)])
def test_sim_sequence_wraparound(dist_pool, world_size, pattern, slots):
    """Message numbers cross 2^32 (u32 flags, cyclic >=): slot reuse and acks stay right."""
    stats = dist_pool(world_size).run(_exchange_worker, "host-sim", pattern, 12, slots, 5, None, False, (1 << 32) - 5, timeout=240)
    assert all(s["capacity"] == _CAP0 for s in stats)


def test_header_packing_and_cyclic_compare():
    """The 64-bit header as the two u32 flag writes land, and the wait's cyclic compare."""
    for d in cuda_ipc._KNOWN_DTYPES:
        for n in (0, 1, 12345, (1 << 48) - 1):
            h = cuda_ipc._header(n, d)
            assert 0 <= h < (1 << 63), (d, n, h)  # the device compares it as a signed int64
            word = torch.zeros(8, dtype=torch.uint8)
            word[0:4].view(torch.int32).fill_(cuda_ipc._i32(h & cuda_ipc._MASK32))
            word[4:8].view(torch.int32).fill_(cuda_ipc._i32(h >> 32))
            assert int(word.view(torch.int64).item()) == h
            assert cuda_ipc._describe_header(h) == f"{n} bytes of {str(d).replace('torch.', '')}"
    # _seq_reached is what the Triton kernel computes: int32 subtraction, sign test.
    vals = [0, 1, 2, 5, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, (1 << 32) - 2, (1 << 32) - 1]
    for cur in vals:
        for target in vals:
            d = torch.tensor([cuda_ipc._i32(cur)], dtype=torch.int32) - cuda_ipc._i32(target)  # wraps
            assert cuda_ipc._seq_reached(cur, target) == bool(d.item() >= 0), (cur, target)
    # A slot's flag still holds message s - slots (or s - 1 in the other slot): never ">= s".
    for s in [1 << 32, (1 << 32) + 1, (1 << 32) + 7]:
        for back in (1, 2, 4):
            assert not cuda_ipc._seq_reached((s - back) & cuda_ipc._MASK32, s & cuda_ipc._MASK32)
        assert cuda_ipc._seq_reached(s & cuda_ipc._MASK32, s & cuda_ipc._MASK32)


def test_choice_validation(monkeypatch):
    with pytest.raises(ValueError, match=r"sync='bogus' \(from argument\)"):
        cuda_ipc._env_choice("bogus", "RINGATTN_IPC_SYNC", "auto", cuda_ipc._SYNC_KINDS, "sync")
    monkeypatch.setenv("RINGATTN_IPC_CHECK", "loud")
    with pytest.raises(ValueError, match=r"check='loud' \(from RINGATTN_IPC_CHECK\)"):
        cuda_ipc._env_choice(None, "RINGATTN_IPC_CHECK", "device", cuda_ipc._CHECK_KINDS, "check")
    assert cuda_ipc._env_choice(None, "RINGATTN_IPC_SYNC_UNSET", "auto", cuda_ipc._SYNC_KINDS, "sync") == "auto"


def test_sim_errors(dist_pool):
    assert dist_pool(3).run(_errors_worker, "host-sim", timeout=120) == ["ok"] * 3


def test_sim_outstanding_limit(dist_pool):
    assert dist_pool(2).run(_outstanding_worker, "host-sim", timeout=120) == ["ok"] * 2


@pytest.mark.parametrize("kind", ["dtype", "size"])
def test_sim_mismatch(dist_pool, kind):
    out = dist_pool(2).run(_mismatch_worker, "host-sim", kind, timeout=120)
    assert out[0] is None and "transport is unusable" in out[1]


# ---- GPU tier: real processes on ONE GPU ---------------------------------------------------------

_GPU_POOLS: dict[int, DistPool] = {}


@pytest.fixture(scope="module")
def gpu_pool():
    """Pools of their own, so the CPU tests' workers never create CUDA contexts."""

    def get(world_size: int) -> DistPool:
        # More hardware queues than streams in use, before the workers start CUDA (see the
        # module docstring of ringattn.transport.cuda_ipc, "Hardware queues").
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
        if world_size not in _GPU_POOLS:
            _GPU_POOLS[world_size] = DistPool(world_size, pg_timeout_s=120)
        return _GPU_POOLS[world_size]

    yield get
    for p in _GPU_POOLS.values():
        p.close()
    _GPU_POOLS.clear()


@gpu
@needs_cuda
def test_gpu_stream_memops_work(gpu_pool):
    """cuStreamWaitValue32/WriteValue32 through ctypes pass the probe (else "auto" uses Triton)."""
    out = gpu_pool(2).run(_memops_worker, timeout=_GPU_RUN_S)
    assert all(o.startswith("memops ok") for o in out), out
    print(out[0])


@gpu
@needs_cuda
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("pattern", ["ring", "bidir"])
def test_gpu_exchange(gpu_pool, world_size, pattern):
    stats = gpu_pool(world_size).run(_exchange_worker, "cuda", pattern, 40, 2, 11, timeout=_GPU_RUN_S)
    assert all(s["capacity"] == _CAP1 for s in stats)
    print(f"world={world_size} {pattern}: sync={stats[0]['sync']} ({stats[0]['sync_detail']}) bytes_sent(rank0)={stats[0]['bytes_sent']}")


@gpu
@needs_cuda
def test_gpu_slots1_and_self_send(gpu_pool):
    gpu_pool(2).run(_exchange_worker, "cuda", "self", 20, 1, 5, timeout=_GPU_RUN_S)


@gpu
@needs_cuda
def test_gpu_sequence_wraparound(gpu_pool):
    """Message numbers cross 2^32 on the device (cuStreamWaitValue32's cyclic >=, or Triton's)."""
    gpu_pool(2).run(_exchange_worker, "cuda", "bidir", 12, 2, 9, None, False, (1 << 32) - 5, timeout=_GPU_RUN_S)


@gpu
@needs_cuda
def test_gpu_triton_fallback(gpu_pool):
    pytest.importorskip("triton")
    stats = gpu_pool(2).run(_exchange_worker, "cuda", "bidir", 12, 2, 13, "triton", timeout=_GPU_RUN_S)
    assert stats[0]["sync"] == "triton"


@gpu
@needs_cuda
@pytest.mark.parametrize("world_size", [2, 4])
def test_gpu_errors(gpu_pool, world_size):
    assert gpu_pool(world_size).run(_errors_worker, "cuda", timeout=_GPU_RUN_S) == ["ok"] * world_size


@gpu
@needs_cuda
def test_gpu_outstanding_limit(gpu_pool):
    assert gpu_pool(2).run(_outstanding_worker, "cuda", timeout=_GPU_RUN_S) == ["ok"] * 2


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["dtype", "size"])
def test_gpu_mismatch(gpu_pool, kind):
    out = gpu_pool(2).run(_mismatch_worker, "cuda", kind, timeout=_GPU_RUN_S)
    assert out[0] is None and "transport is unusable" in out[1]


@gpu
@needs_cuda
def test_gpu_wait_never_blocks_host(gpu_pool):
    assert gpu_pool(2).run(_host_never_blocks_worker, timeout=_GPU_RUN_S) == ["ok"] * 2
